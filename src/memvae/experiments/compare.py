"""The study's experiment as one call: train several models alike, then measure and draw them.

Layout of the output directory::

    runs/<model>-seed<s>/   one run directory per model and seed (see memvae.training.runs)
    convergence.png         training NMSE (log) and perplexity against update
    reconstructions.png     the same test images, original and every model's reads
    results.json            every measured number, per model, per read, per seed
    results.md              the same as a table (mean ± std over seeds)
    rate_distortion.md/.png with --slots (the rate sweep): one table per K, NMSE against rate
    logs/<model>-seed<s>.log  what each run printed, when runs train side by side (jobs > 1)
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from memvae.config import schema as C

from memvae.config import presets
from memvae.training.checkpoint import latest_checkpoint
from memvae.data import ImageData, load_array_images, load_data
from memvae.errors import MemvaeError, os_error
from memvae.training.evaluate import evaluate_model, is_gap, reads_of, reconstructions
from memvae.networks.autoencoder import Autoencoder
from memvae.training.metrics import BAR_FORMAT, progress_line, rate_text, read_metrics
from memvae.experiments.plots import convergence_figure, rate_distortion_figure, reconstruction_grid
from memvae.training.runlock import run_lock
from memvae.training.runs import load_run
from memvae.experiments.sweep import at_slots, collect, is_discrete, rate_tables
from memvae.training.train import train

NMSE_LEVELS = (0.20, 0.10, 0.08, 0.06)
# Trainings at once. Measured on the 2-core development machine (docs/benchmarks.md): two
# 1-thread runs side by side finish a comparison faster than one 2-thread run at a time.
DEFAULT_JOBS = "auto"
DEFAULT_MODELS = ("vq", "vq_ema", "memory_l2", "memory_cosine", "memory_l2_write")


def updates_to_reach(records: list[dict], levels=NMSE_LEVELS) -> dict[str, int | None]:
    """For each NMSE level, the first logged update whose training NMSE (the average over
    the log interval ending there) is at or below it; None when never reached."""
    result = {}
    for level in levels:
        hit = next((r["step"] for r in sorted(records, key=lambda r: r["step"]) if r["train_nmse"] <= level), None)
        result[f"{level:g}"] = hit
    return result


def _model_config(model: str, config_dir: Path | None, steps: int, seed: int, overrides: list[str]) -> C.Config:
    """The config of ``model`` for one seed: a TOML path, or a name looked up in
    ``config_dir`` when one is given, else among the packaged configs (memvae.config.presets)."""
    overrides = [*overrides, f"train.steps={steps}", f"train.seed={seed}"]
    if config_dir is None:
        return presets.load(model, overrides)
    if model.endswith(".toml"):
        return C.load_config(model, overrides)  # a missing file fails with its own message
    if not config_dir.is_dir():
        raise MemvaeError(f"config folder {config_dir} does not exist")
    path = config_dir / f"{model}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in config_dir.glob("*.toml"))) or f"none ({config_dir} holds no .toml files)"
        raise MemvaeError(f"no config for model {model!r} ({path}); known: {known}")
    return C.load_config(path, overrides)


def _run_state(run_dir: Path, cfg: C.Config, extend: bool = False) -> tuple[str, int]:
    """(state, newest checkpoint's update): state "new", "resume" (interrupted), "extend"
    (finished at fewer updates than asked; only with ``extend``), "done", or "collected": a
    finished run's small files without its checkpoints (config.toml, metrics.jsonl and
    eval.json, as experiments/collect_results.sh keeps them in docs/results), reported from
    its eval.json. A run made with another config is refused, and so is a longer
    ``--steps`` without ``extend``."""
    found = latest_checkpoint(run_dir / "checkpoints") if run_dir.exists() else None
    if found is None:
        if not (run_dir / "eval.json").exists():
            return "new", 0
        _check_same_config(run_dir, cfg)
        step = json.loads((run_dir / "eval.json").read_text())["step"]
        if step != cfg.train.steps:
            raise MemvaeError(f"{run_dir} holds the results of {step} updates, not {cfg.train.steps}, and no checkpoint "
                              "to continue from; remove it or choose another --out")
        return "collected", step
    saved_steps = _check_same_config(run_dir, cfg)
    step = found[1]["step"]
    if step > cfg.train.steps:
        raise MemvaeError(f"{run_dir} is already trained past {cfg.train.steps} updates (to {step}); choose another --out")
    if step == cfg.train.steps:
        return "done", step
    if saved_steps < cfg.train.steps:
        if not extend:
            raise MemvaeError(f"{run_dir} was trained for {saved_steps} updates, not {cfg.train.steps}; add --extend "
                              f"to continue it (and the other runs) to {cfg.train.steps}, or choose another --out")
        return "extend", step
    return "resume", step


def _check_same_config(run_dir: Path, cfg: C.Config) -> int:
    """Refuse a run directory made with another config than ``cfg``; returns its ``steps``.
    The thread count may differ (train() keeps the count a run was trained with unless
    train.threads asks for another, and then says in one line from which update the
    numbers differ), and so may the steps (a shorter run may be extended: resuming is
    exact); everything else must match."""
    saved, wanted = C.to_dict(C.load_config(run_dir / "config.toml", saved=True)), C.to_dict(cfg)
    saved_steps = saved["train"]["steps"]
    for d in (saved, wanted):
        d["train"].pop("threads")
        d["train"].pop("steps")
    if saved != wanted:
        raise MemvaeError(f"{run_dir} was trained with a different config; remove it or choose another --out")
    return saved_steps


def _say_plan(states: list[tuple[Path, str, int]], steps: int) -> None:
    """One line per run that is not new: skipped (finished), resumed or extended."""
    for run_dir, state, step in states:
        if state == "done":
            print(f"{run_dir.name}: skipped, finished ({step} updates)", file=sys.stderr)
        elif state == "collected":
            print(f"{run_dir.name}: skipped, reported from its eval.json ({step} updates; no checkpoint here)", file=sys.stderr)
        elif state == "resume":
            print(f"{run_dir.name}: resuming from update {step}", file=sys.stderr)
        elif state == "extend":
            print(f"{run_dir.name}: extending from update {step} to {steps}", file=sys.stderr)


def _mean_std(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else 0.0 if present else None,
        "values": values,
        "n": len(present),
    }


def _summarise(per_seed: list[dict]) -> dict:
    """Nested dicts of numbers, one per seed -> the same shape with mean/std/values leaves."""
    first = per_seed[0]
    out = {}
    for key, value in first.items():
        items = [s.get(key) for s in per_seed]
        if isinstance(value, dict):
            out[key] = _summarise(items)
        elif isinstance(value, (int, float)) or value is None:
            out[key] = _mean_std(items)
    return out


def compare(
    out: str | os.PathLike,
    models=DEFAULT_MODELS,
    steps: int = 25000,
    seeds: int = 1,
    data_dir: str | None = None,
    config_dir: str | os.PathLike | None = None,
    lossless: str | None = None,
    overrides: list[str] = (),
    images_shown: int = 10,
    show_progress: bool = True,
    test_images: int | None = None,
    jobs: int | str | None = None,
    report_only: bool = False,
    slots: list[int] | None = None,
    extend: bool = False,
    first_seed: int = 0,
    launcher: str = "local",
    launcher_options=None,
    wait: bool = True,
    plan_file: str | os.PathLike | None = None,
    poll_seconds: float = 10.0,
) -> dict:
    """Train every model × seed (skipping finished runs, resuming partial ones), evaluate
    each on the whole test set (or its first ``test_images``, for a quick look), and write
    the figures and tables; returns results.json's dict.

    ``jobs``: how many runs train at once. 1 trains them one after another in this
    process; more start each run in its own process, ``jobs`` at a time, and split the
    CPU cores between them: each run's ``train.threads`` = cores // jobs, recorded in its
    config.toml. A run's numbers depend on its thread count, not on what trains beside
    it: trained alone with that count it logs the same numbers. "auto": one run per
    core, up to the number of runs to train. None: ``DEFAULT_JOBS``.

    ``report_only``: train nothing; evaluate and tabulate the runs of the plan that have
    finished (a partial comparison while the rest still trains elsewhere) and name the others.

    ``slots``: the rate sweep. Every discrete model is trained at each K in ``slots``
    (:func:`memvae.experiments.sweep.at_slots`: runs ``<model>-k<K>-seed<s>``), every continuous one
    once; rate_distortion.md (one table per K) and rate_distortion.png are written too.

    ``first_seed``: the seeds are ``first_seed .. first_seed + seeds - 1`` (e.g. the later
    seeds of a sweep, on a second machine, while the first trains elsewhere).

    ``extend``: continue finished runs trained for fewer than ``steps`` updates (without
    it, such a run is refused: a larger ``steps`` is more often a typo than a wish).

    Runs train seed by seed (every model's seed 0 first), so that a sweep cut short still
    holds one of everything.

    ``launcher``: "local" (the runs train here, ``jobs`` at a time) or "submitit": each
    unfinished run is one job of submitit (Slurm, or its local executor), with the
    resources of ``launcher_options`` (:class:`memvae.experiments.cluster_options.LauncherOptions`);
    a job stopped by its time limit or preemption checkpoints and is requeued, and
    continues from that checkpoint (:mod:`memvae.experiments.cluster`). Its progress is one line per
    run and change (every ``poll_seconds``); ``wait`` False returns once the jobs are
    submitted (collect later with ``report_only``). Runs whose jobs fail are named in
    results.json and results.md ("unfinished") beside the report of the others; calling
    compare again resubmits only them.

    ``plan_file``: train nothing; write one shell command per unfinished run into this
    file (:mod:`memvae.experiments.plan`: the run's ``memvae train ... --resume``, the same run
    directory), for a Slurm array, GNU parallel or bash; returns {"plan": path, "runs": names}.
    """
    out = Path(out)
    config_dir = None if config_dir is None else Path(config_dir)  # None: the packaged configs
    _check_launcher(launcher, launcher_options, jobs, wait, report_only, plan_file)
    plan, sources = [], {}
    if first_seed < 0 or seeds < 1:
        raise MemvaeError(f"seeds must be >= 1 and first seed >= 0, got {seeds} from {first_seed}")
    for seed in range(first_seed, first_seed + seeds):
        for model in models:
            cfg = _model_config(model, config_dir, steps, seed, list(overrides))
            variants = [at_slots(cfg, k) for k in slots] if slots and is_discrete(cfg) else [cfg]
            plan += [(v, out / "runs" / f"{v.name}-seed{seed}") for v in variants]
            sources.update({out / "runs" / f"{v.name}-seed{seed}": _config_source(model, config_dir) for v in variants})
    names = [cfg.name for cfg, _ in plan]
    if len(set(names)) * seeds != len(names):
        raise MemvaeError(f"two models share a config name: {sorted(names)}")

    states = [(cfg, run_dir, *_run_state(run_dir, cfg, extend)) for cfg, run_dir in plan]
    if not report_only:
        _say_plan([(run_dir, state, step) for _, run_dir, state, step in states], steps)
    todo = [(cfg, run_dir, state) for cfg, run_dir, state, _ in states if state not in ("done", "collected")]
    if report_only:
        missing = {run_dir for _, run_dir, _ in todo}
        if missing:
            print(f"not finished, left out: {', '.join(sorted(p.name for p in missing))}", file=sys.stderr)
        plan = [(cfg, run_dir) for cfg, run_dir in plan if run_dir not in missing]
        if not plan:
            raise MemvaeError(f"no run of {', '.join(models)} in {out / 'runs'} has finished its {steps} updates")
    if not report_only and (plan_file is not None or launcher == "submitit"):
        from memvae.experiments.plan import run_command, write_plan

        commands = [run_command(cfg, sources[run_dir], run_dir, data_dir) for cfg, run_dir, _ in todo]
        if plan_file is not None:
            path = write_plan(plan_file, commands)
            print(f"wrote {path}: {len(commands)} command{'s' * (len(commands) != 1)}, one per unfinished run "
                  f"(of {len(plan)})", file=sys.stderr)
            return {"plan": str(path), "runs": [run_dir.name for _, run_dir, _ in todo]}
        return _launch_submitit(out, plan, todo, commands, launcher_options, wait, poll_seconds, data_dir, lossless,
                                images_shown, test_images, bool(slots))
    first = plan[0][0].data
    data = load_data(first.source, data_dir or first.dir or None, first.image_size)  # once for all runs
    if report_only:
        return report(out, plan, data, lossless, images_shown, test_images, sweep=bool(slots))
    workers = resolve_jobs(DEFAULT_JOBS if jobs is None else jobs, len(todo))
    started = time.perf_counter()
    if workers > 1:
        threads = max(1, cpu_cores() // workers)
        todo = [(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads)), run_dir, state)
                for cfg, run_dir, state in todo]
        _train_side_by_side(todo, workers, data_dir, out / "logs", show_progress)
    else:
        for cfg, run_dir, state in todo:  # each run shows its own bar (or plain lines)
            train(cfg, run_dir, resume=state != "new", data=data, show_progress=show_progress)
    training = {"jobs": workers, "runs_trained": len(todo), "wall_seconds": time.perf_counter() - started}
    return report(out, plan, data, lossless, images_shown, test_images, training=training, sweep=bool(slots))


def _config_source(model: str, config_dir: Path | None) -> str:
    """What a run's command names as its config (see :func:`_model_config`): the packaged
    name or file given, or the file of ``config_dir``."""
    if config_dir is None or model.endswith(".toml"):
        return model
    return str(config_dir / f"{model}.toml")


def _check_launcher(launcher: str, options, jobs, wait: bool, report_only: bool, plan_file) -> None:
    """Refuse a launcher option that the chosen launcher (or --plan, --report-only) would ignore."""
    if launcher not in ("local", "submitit"):
        raise MemvaeError(f"launcher must be 'local' or 'submitit', got {launcher!r}")
    if plan_file is not None and (launcher != "local" or report_only or jobs is not None or not wait):
        raise MemvaeError("--plan trains nothing: it takes no --launcher submitit, --jobs, --no-wait or --report-only")
    if launcher == "submitit":
        if jobs is not None:
            raise MemvaeError("--jobs is for the local launcher; with --launcher submitit every run is one job")
        if not report_only:
            from memvae.experiments.cluster import require_submitit

            require_submitit()  # the one line that says what to install, before anything else
        return
    if options is not None:
        raise MemvaeError("launcher options (partition, time, CPUs, GPUs, memory, account, sbatch) are for "
                          "--launcher submitit")
    if not wait:
        raise MemvaeError("--no-wait is for --launcher submitit (local runs train in this process or its children)")


def _launch_submitit(out: Path, plan, todo, commands, options, wait: bool, poll_seconds: float, data_dir, lossless,
                     images_shown: int, test_images: int | None, sweep: bool) -> dict:
    """:func:`compare` with the submitit launcher: submit (or follow) one job per
    unfinished run, wait, report the finished runs and name the others."""
    from memvae.experiments.cluster import Run, follow, launch
    from memvae.experiments.cluster_options import LauncherOptions

    options = options if options is not None else LauncherOptions().check()
    started = time.perf_counter()
    runs = [Run(run_dir.name, command, cfg.train.steps) for (cfg, run_dir, _), command in zip(todo, commands)]
    watched, cluster = launch(runs, out, options) if runs else ([], None)
    if not wait:
        if runs:
            print(f"submitted; collect with the same command and --report-only, or run it again to wait "
                  f"(logs: {out / 'logs'}, submitit: {out / 'submitit'})", file=sys.stderr)
        return {"submitted": {w.run.name: str(w.job.job_id) for w in watched}}
    try:
        failed = follow(watched, poll_seconds)
    except KeyboardInterrupt:
        # Slurm's jobs are not this terminal's; the local executor's are, and Ctrl-C reaches them too.
        raise KeyboardInterrupt("stopped waiting (Slurm jobs go on; local ones stop with a checkpoint): run the same "
                                "compare again to wait for or resubmit them, or add --report-only to collect what "
                                "has finished") from None
    finished = [(cfg, run_dir) for cfg, run_dir in plan if run_dir.name not in failed]
    if not finished:
        raise MemvaeError("no run finished: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))
    first = finished[0][0].data
    data = load_data(first.source, data_dir or first.dir or None, first.image_size)
    training = {"launcher": "submitit", "cluster": cluster, "runs_trained": len(runs),
                "wall_seconds": time.perf_counter() - started}
    results = report(out, finished, data, lossless, images_shown, test_images, training=training, sweep=sweep)
    if failed:
        results["unfinished"] = failed
        (out / "results.json").write_text(json.dumps(results, indent=1))
        with open(out / "results.md", "a") as f:
            f.write("\nNot finished, left out (their jobs failed; the same compare resubmits them): "
                    + "; ".join(f"{name}: {why}" for name, why in failed.items()) + "\n")
    return results


def cpu_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: int | str, runs: int) -> int:
    """``jobs`` (a positive number or "auto": one per core) -> runs at once, at most ``runs``."""
    if jobs == "auto":
        wanted = cpu_cores()
    elif isinstance(jobs, int) and not isinstance(jobs, bool):
        wanted = jobs
    elif isinstance(jobs, str) and jobs.strip().isdigit():
        wanted = int(jobs)
    else:
        wanted = 0
    if wanted < 1:
        raise MemvaeError(f"jobs must be a whole number >= 1 or 'auto', got {jobs!r}")
    return max(1, min(wanted, runs))


def _logged_step(run_dir: Path) -> int:
    """The last update a run has logged (0 before its first record): progress read from its log."""
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return max((r["step"] for r in records), default=0)


class _StopOnTerm:
    """While side-by-side runs train, SIGTERM to this process stops them as Ctrl-C does
    (each run saves a checkpoint), instead of leaving them training on their own."""

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class RunProgress:
    """The progress of one side-by-side run, read from its metrics.jsonl: a bar that moves
    with its logged updates and shows its latest training NMSE, or (``bar`` False) one plain
    line per log record. Rate and time left come from the run's own clock (the training
    seconds it logs), not from the compare's."""

    def __init__(self, run_dir: Path, total: int, position: int, bar: bool):
        self.run_dir, self.total, self.position = run_dir, total, position
        self.shown = self.start = _logged_step(run_dir)
        self.start_seconds = None
        self.bar = tqdm(total=total, initial=self.start, desc=run_dir.name, position=position, dynamic_ncols=True,
                        leave=False, bar_format=BAR_FORMAT) if bar else None

    def refresh(self) -> None:
        records = [r for r in read_metrics(self.run_dir) if r["step"] > self.shown] if (self.run_dir / "metrics.jsonl").exists() else []
        for record in records:
            # The first record of this process starts the run's own clock.
            self.start_seconds = self.start_seconds or (record["step"], record["train_seconds"])
            if self.bar is not None:
                self.bar.update(record["step"] - self.bar.n)
                self.bar.set_postfix_str(f"NMSE {record['train_nmse']:.4f}" + rate_text(record, self.total, self.start_seconds))
            else:
                print(progress_line(self.run_dir.name, record, self.total, self.start_seconds), flush=True)
            self.shown = record["step"]

    def close(self, returncode: int | None) -> None:
        self.refresh()
        if self.bar is not None:
            self.bar.close()
        if returncode == 0:
            (tqdm.write if self.bar is not None else print)(f"{self.run_dir.name}: finished ({self.shown} updates)")


def _train_side_by_side(todo: list[tuple[C.Config, Path, str]], workers: int, data_dir: str | None, log_dir: Path,
                        show_progress: bool, poll_seconds: float = 1.0) -> None:
    """Train ``todo`` (config, run directory, state), ``workers`` runs at a time, each in a
    fresh interpreter (:func:`_train_child`) whose output goes to ``log_dir/<run>.log``.
    Progress: one :class:`RunProgress` per running run. The first run that fails
    stops the others (each saves a checkpoint) and raises its one-line error."""
    log_dir.mkdir(parents=True, exist_ok=True)
    bars: dict[Path, RunProgress] = {}
    pending, running, failure = list(todo), {}, None

    def stop_all() -> None:
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # train() saves a checkpoint and stops
        for proc in running:
            proc.wait()

    try:
        with _StopOnTerm():
            while (pending and failure is None) or running:
                while pending and failure is None and len(running) < workers:
                    cfg, run_dir, state = pending.pop(0)
                    log = open(log_dir / f"{run_dir.name}.log", "a")
                    job = {"config": C.to_dict(cfg), "run_dir": str(run_dir), "resume": state != "new",
                           "data_dir": data_dir, "parent": os.getpid(), "argv": sys.argv}
                    proc = subprocess.Popen([sys.executable, "-c", "from memvae.experiments.compare import _train_child; _train_child()"],
                                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True)
                    proc.stdin.write(json.dumps(job))
                    proc.stdin.close()
                    running[proc] = (run_dir, log)
                    free = min(set(range(workers)) - {b.position for b in bars.values()})
                    bars[run_dir] = RunProgress(run_dir, cfg.train.steps, free, show_progress)
                time.sleep(poll_seconds)
                for proc, (run_dir, log) in list(running.items()):
                    finished = proc.poll() is not None  # before reading the log, so that its last records are shown
                    bars[run_dir].refresh()
                    if not finished:
                        continue
                    bars.pop(run_dir).close(proc.returncode)
                    log.close()
                    del running[proc]
                    if proc.returncode and failure is None:
                        lines = [ln for ln in (log_dir / f"{run_dir.name}.log").read_text().splitlines() if ln.strip()]
                        said = lines[-1].removeprefix("error: ") if lines and lines[-1].startswith("error: ") else None
                        failure = f"{run_dir.name}: {said}" if said else (
                            f"{run_dir.name} failed (exit status {proc.returncode}); see {log_dir / run_dir.name}.log")
                        stop_all()
    except KeyboardInterrupt:
        stop_all()
        raise KeyboardInterrupt("stopped; every unfinished run saved a checkpoint: run the same compare again to resume")
    finally:
        for bar in bars.values():
            bar.close(None)
    if failure is not None:
        raise MemvaeError(failure)


def _train_child() -> None:
    """One run of a side-by-side compare, in a fresh interpreter: the job (config, run
    directory, resume, data directory, parent's pid) comes as JSON on standard input."""
    job = json.loads(sys.stdin.read())
    sys.argv = job["argv"]  # meta.json records the compare command that trains this run, not "-c"
    if sys.platform.startswith("linux"):
        # Stop (SIGTERM: a checkpoint, then exit) when the compare that started us dies,
        # even by SIGKILL, instead of training on unseen; PR_SET_PDEATHSIG = 1.
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if os.getppid() != job["parent"]:  # it died before prctl took effect
            sys.exit(130)
    try:
        cfg = C.validate(C.from_dict(job["config"]))
        train(cfg, job["run_dir"], resume=job["resume"], data_dir=job["data_dir"], show_progress=False)
    except MemvaeError as exc:
        print(f"error: {exc}", flush=True)
        sys.exit(2)
    except OSError as exc:  # a folder or a disk that refuses: one line, as bad input is
        print(f"error: {os_error(exc)}", flush=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        # The compare stopped it (Ctrl-C, SIGTERM or another run's failure): the way back is that compare.
        print(f"stopped: {str(exc).split(';')[0]}; run the same memvae compare again to resume", flush=True)
        sys.exit(130)


BPD_FILE = "bits_per_dim.json"  # memvae.prior.bits_per_dim.BPD_FILE, named here without importing the measurement
BPD_KEYS = ("test", "test_uniform", "lossless", "lossless_uniform")


BPD_CAPTION = (
    "bits / dim: `memvae bpd RUN_DIR` (its bits_per_dim.json): the prior's bits of the image's codes plus the "
    "image's bits under a discretised Gaussian around the decoder's output (σ per channel fitted on training "
    "images), over 3·H·W, on the images that command scored (the whole test set unless told otherwise; lossless: "
    "the lossless originals, σ fitted on their own training images). '(not a bound)': a continuous model's "
    "decoder term alone.")


def run_bits_per_dim(run_dir: Path, step: int) -> tuple[dict, bool] | None:
    """A run's bits per dimension from the RUN_DIR/bits_per_dim.json that ``memvae bpd``
    wrote: ({"test", "test_uniform", "lossless", "lossless_uniform": bits/dim or None},
    whether it is a bound), or None when there is none, or it is of another update than
    ``step`` (the run trained on since: said on stderr, and left out)."""
    path = run_dir / BPD_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("model_step") != step:
        print(f"{run_dir.name}: {BPD_FILE} is of update {saved.get('model_step')}, not {step}: left out "
              f"(run `memvae bpd {run_dir}` again)", file=sys.stderr)
        return None
    numbers = {}
    for key in BPD_KEYS:
        scored = saved.get(key.removesuffix("_uniform")) or {}
        numbers[key] = scored.get("uniform_bits_per_dim" if key.endswith("_uniform") else "bits_per_dim")
    return numbers, bool(saved.get("bound"))


def bits_per_dim_cell(stat: dict | None, bound: bool = True) -> str:
    """A bits/dim mean ± std (3 decimals), marked when it is the decoder term alone."""
    if not stat or stat.get("mean") is None:
        return "—"
    text = f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["n"] > 1 else "")
    missed = stat["n"] < len(stat["values"])
    return text + (f" ({stat['n']}/{len(stat['values'])} runs)" if missed else "") + ("" if bound else " (not a bound)")


def report(out: Path, plan: list[tuple[C.Config, Path]], data: ImageData, lossless, images_shown: int,
           test_images: int | None = None, training: dict | None = None, sweep: bool = False) -> dict:
    """Evaluate the finished runs of ``plan`` and write figures and tables into ``out``;
    ``training`` (jobs, runs trained, wall seconds of this call's training) is recorded too;
    ``sweep``: also the rate sweep's tables and figure (see :func:`compare`)."""
    variance = data.train_variance()
    test = data.test[:test_images] if test_images else data.test
    lossless_images = load_array_images(lossless) if lossless else None
    shown = data.test[:images_shown]
    by_model: dict[str, list] = {}
    about: dict[str, dict] = {}  # per model: its own read, whether discrete, K and base name in a sweep
    run_dirs: dict[str, list[Path]] = {}
    grid = [("original", shown)]
    curves: dict[str, list] = {}
    for cfg, run_dir in plan:
        eval_path = run_dir / "eval.json"
        cached = json.loads(eval_path.read_text()) if eval_path.exists() else None
        collected = latest_checkpoint(run_dir / "checkpoints") is None  # small files only: see _run_state
        # A collected run's untrained model only answers what its bottleneck declares.
        if collected:
            model, state = Autoencoder.from_config(cfg), cached
        else:
            model, _, state = load_run(run_dir)
        stale = (cached is None or cached.get("step") != state["step"] or ("lossless" in cached) != bool(lossless)
                 or cached["test"][reads_of(model)[0]]["images"] != len(test))
        if stale and collected:
            raise MemvaeError(f"{run_dir} holds no checkpoint to evaluate again, and its eval.json is not of "
                              f"{len(test)} test images{' with --lossless' if lossless else ''}")
        if stale:
            with run_lock(run_dir, create=False):  # eval.json goes into the run: one writer (memvae.training.runlock)
                cached = {"run_dir": str(run_dir), "step": int(state["step"]), "train_variance": variance,
                          "test": evaluate_model(model, test, variance)}
                if lossless_images is not None:
                    cached["lossless"] = evaluate_model(model, lossless_images, variance)
                eval_path.write_text(json.dumps(cached, indent=1))
        records = read_metrics(run_dir)
        last = records[-1]
        seed_result = {
            "test": cached["test"],
            "updates_to_nmse": updates_to_reach(records),
            "seconds_per_update": last["train_seconds"] / last["step"],
            "final_train_nmse": last["train_nmse"],
        }
        if "lossless" in cached:
            seed_result["lossless"] = cached["lossless"]
        bpd = run_bits_per_dim(run_dir, int(state["step"]))
        if bpd is not None:
            seed_result["bits_per_dim"], bound = bpd
        by_model.setdefault(cfg.name, []).append(seed_result)
        if cfg.name not in about:
            own = model.bottleneck.eval_read
            about[cfg.name] = {"read": own, "discrete": bool(model.bottleneck.discrete), "k": model.bottleneck.num_slots
                               if sweep and model.bottleneck.discrete else None, "base": cfg.name.rsplit("-k", 1)[0]
                               if sweep and model.bottleneck.discrete else cfg.name}
        if bpd is not None:
            about[cfg.name].setdefault("bits_per_dim_bound", bound)
        run_dirs.setdefault(cfg.name, []).append(run_dir)
        curves.setdefault(cfg.name, []).append(records)
        if cfg.train.seed == plan[0][0].train.seed and not collected:  # the grid shows the first seed's models
            for read, recon in reconstructions(model, shown).items():
                grid.append((cfg.name if read == "nearest" else f"{cfg.name} ({read})", recon))

    for runs in by_model.values():  # bits/dim of some seeds only: the others' count as missing
        if any("bits_per_dim" in r for r in runs):
            for r in runs:
                r.setdefault("bits_per_dim", dict.fromkeys(BPD_KEYS))
    steps = plan[0][0].train.steps
    seeds = max(map(len, by_model.values()))  # report_only may find fewer for some models
    title = f"CIFAR-10, {steps} updates, {seeds} seed{'s' if seeds > 1 else ''}"
    convergence_figure(curves, out / "convergence.png", title=title)
    if len(grid) > 1:  # collected runs (no model here) leave a grid drawn earlier in place
        reconstruction_grid(grid, out / "reconstructions.png", title=f"test images 0..{images_shown - 1}, {steps} updates")
    results = {
        "steps": steps,
        "seeds": seeds,
        "nmse_levels": list(NMSE_LEVELS),
        "test_images": len(test),
        "models": {name: {**about[name], "seeds": runs, "summary": _summarise(runs)} for name, runs in by_model.items()},
    }
    if training is not None:
        results["training"] = training
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    if sweep:
        rows = collect(results, run_dirs)
        (out / "rate_distortion.md").write_text(rate_tables(rows, steps, len(test)))
        rate_distortion_figure(rows, out / "rate_distortion.png", steps, f"first {len(test):,} test images"
                               if len(test) < len(data.test) else f"whole test set, {len(test):,} images")
    return results


def _fmt(stat: dict | None, digits: int = 4) -> str:
    """mean (± std over seeds) with ``digits`` significant digits; 0 digits: a whole number."""
    if not stat or not stat.get("values"):
        return "—"
    if stat["mean"] is None:
        return "not reached"
    if digits == 0:
        text = f"{stat['mean']:.0f}" + (f" ± {stat['std']:.0f}" if stat["n"] > 1 else "")
    else:
        text = f"{stat['mean']:.{digits}g}" + (f" ± {stat['std']:.2g}" if stat["n"] > 1 else "")
    missed = stat["n"] < len(stat["values"])
    return text + (f" ({stat['n']}/{len(stat['values'])} runs)" if missed else "")


def results_table(results: dict) -> str:
    """results.json's dict -> a markdown table, one row per model and read."""
    levels = [f"{x:g}" for x in results["nmse_levels"]]
    # The bottlenecks' own numbers (entropy, β, ...) follow the common ones, as they appear.
    common = {"images", "mse", "nmse", "psnr", "perplexity", "slots_used"}
    extra = list({key: None for m in results["models"].values() for read, metrics in m["summary"]["test"].items()
                  if not is_gap(read) for key in metrics if key not in common})
    header = ["model", "seeds", "read", "test NMSE", "PSNR dB", "perplexity", "slots used"] + [k.replace("_", " ") for k in extra]
    header += [f"updates to {x}" for x in levels] + ["s / update"]
    has_lossless = any("lossless" in m["summary"] for m in results["models"].values())
    bpd_sets = [which for which in ("test", "lossless") if any(
        (m["summary"].get("bits_per_dim", {}).get(which) or {}).get("mean") is not None for m in results["models"].values())]
    header += [f"{which} bits / dim" for which in bpd_sets]
    if has_lossless:
        header.insert(4, "lossless NMSE")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, model in results["models"].items():
        summary = model["summary"]
        for read, metrics in summary["test"].items():
            if is_gap(read):
                continue
            first_read = read == next(iter(summary["test"]))
            row = [name, str(len(model["seeds"])) if first_read else "", read, _fmt(metrics.get("nmse")), _fmt(metrics.get("psnr")), _fmt(metrics.get("perplexity"), 3),
                   _fmt(metrics.get("slots_used"), 0)] + [_fmt(metrics.get(k), 3) for k in extra]
            # Convergence and speed belong to the run, not to a read: shown once per model.
            row += [_fmt(summary["updates_to_nmse"].get(x), 0) if first_read else "" for x in levels]
            row.append(_fmt(summary["seconds_per_update"], 3) if first_read else "")
            # Bits per dimension are of the model's own read (the one its codes decode to), on its row.
            own = read == model.get("read", next(iter(summary["test"])))
            bound = model.get("bits_per_dim_bound", True)
            row += [bits_per_dim_cell(summary.get("bits_per_dim", {}).get(which), bound) if own else ""
                    for which in bpd_sets]
            if has_lossless:
                row.insert(4, _fmt(summary.get("lossless", {}).get(read, {}).get("nmse")))
            lines.append("| " + " | ".join(row) + " |")
    caption = (
        f"\n{results['steps']} updates, mean ± std over each model's seeds. Test metrics on "
        f"{results['test_images']} test images; perplexity and slots used from slot counts over the whole set. 'updates to x': first "
        "logged update whose training NMSE (average over the log interval) is ≤ x. s / update: training time only, "
        "on the machine named in the run's meta.json.\n"
    )
    if bpd_sets:
        caption = caption[:-1] + " " + BPD_CAPTION + "\n"
    return "\n".join(lines) + "\n" + caption
