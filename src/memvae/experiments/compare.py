"""The study's experiment as one call: train several models alike, then measure and draw them.

Layout of the output directory::

    runs/<model>-seed<s>/   one run directory per model and seed (see memvae.training.runs)
    convergence.png         training NMSE (log) and perplexity against update
    reconstructions.png     the same test images, original and every model's reads
    results.json            every measured number, per model, per read, per seed
    results.md              the same as a table (mean ± std over seeds)
    rate_distortion.md/.png with --slots (the rate sweep): one table per K, NMSE against rate
    logs/<model>-seed<s>.log  what each run printed, when runs train side by side (jobs > 1)

The parts: this module plans the runs (which train, resume, extend or are done) and
launches them; :mod:`memvae.experiments.side_by_side` trains them locally, ``jobs`` at a
time; :mod:`memvae.experiments.compare_progress` says the plan, the time left in all and how
far unfinished runs have got; :mod:`memvae.experiments.cluster` submits them as jobs;
:mod:`memvae.experiments.report` measures them and writes the figures and tables.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from memvae.config import presets
from memvae.config import schema as C
from memvae.data import load_data
from memvae.errors import MemvaeError
from memvae.experiments import plan as plan_lines  # a module: tests route its run_command through a stand-in
from memvae.experiments.compare_progress import logged_step, measured_rate, plan_text, progress_text, time_left, total_text
from memvae.experiments.report import report
from memvae.experiments.side_by_side import compare_command, cpu_cores, resolve_jobs, stop_reason, train_side_by_side
from memvae.experiments.sweep import at_slots, is_discrete
from memvae.training.checkpoint import latest_checkpoint
from memvae.training.train import train

# Trainings at once. Measured on the 2-core development machine (docs/benchmarks.md): two
# 1-thread runs side by side finish a comparison faster than one 2-thread run at a time.
DEFAULT_JOBS = "auto"
DEFAULT_MODELS = ("vq", "vq_ema", "memory_l2", "memory_cosine", "memory_l2_write")


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
        names = sorted(p.stem for p in config_dir.glob("*.toml"))
        known = ", ".join(names) or f"none ({config_dir} holds no .toml files)"
        raise MemvaeError(f"no config for model {model!r} ({path});{presets.did_you_mean(model, names)} known: {known}")
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
    saved, wanted = C.training_dict(C.load_config(run_dir / "config.toml", saved=True)), C.training_dict(cfg)
    saved_steps = saved["train"]["steps"]
    for d in (saved, wanted):
        d["train"].pop("steps")
    if saved != wanted:
        raise MemvaeError(f"{run_dir} was trained with a different config; remove it or choose another --out")
    return saved_steps


def _complete_rows(plan: list[tuple[C.Config, Path]], data, lossless: str | None, data_dir: str | None) -> None:
    """Complete the row of every run of ``plan`` that has its checkpoint here (a collected
    run, small files only, is reported as it is)."""
    from memvae.experiments.row import complete_row

    sets = ("test", "lossless") if lossless else ("test",)
    for cfg, run_dir in plan:
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            complete_row(run_dir, cfg, data, sets, lossless, data_dir, say=lambda text: print(text, file=sys.stderr))


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


def compare(out: str | os.PathLike, models=DEFAULT_MODELS, steps: int = 25000, seeds: int = 1,
            data_dir: str | None = None, config_dir: str | os.PathLike | None = None, lossless: str | None = None,
            overrides: list[str] = (), images_shown: int = 10, show_progress: bool = True,
            test_images: int | None = None, jobs: int | str | None = None, report_only: bool = False,
            slots: list[int] | None = None, extend: bool = False, first_seed: int = 0, launcher: str = "local",
            launcher_options=None, wait: bool = True, plan_file: str | os.PathLike | None = None,
            poll_seconds: float = 10.0, rows: bool = False) -> dict:
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
    finished (a partial comparison while the rest still trains elsewhere) and name the
    others, each with the update it has got to.

    ``slots``: the rate sweep. Every discrete model is trained at each K in ``slots``
    (:func:`memvae.experiments.sweep.at_slots`: runs ``<model>-k<K>-seed<s>``), every continuous one
    once; rate_distortion.md (one table per K) and rate_distortion.png are written too.

    ``first_seed``: the seeds are ``first_seed .. first_seed + seeds - 1`` (e.g. the later
    seeds of a sweep, on a second machine, while the first trains elsewhere).

    ``extend``: continue finished runs trained for fewer than ``steps`` updates (without
    it, such a run is refused: a larger ``steps`` is more often a typo than a wish).

    Runs train seed by seed (every model's seed 0 first), so that a sweep cut short still
    holds one of everything. The local launcher first prints its plan (runs, updates,
    runs at once, the time it expects in all) and revises the time left in all as the
    runs' rates come in (:mod:`memvae.experiments.compare_progress`).

    ``launcher``: "local" (the runs train here, ``jobs`` at a time) or "submitit": each
    unfinished run is one job of submitit (Slurm, or its local executor), with the
    resources of ``launcher_options`` (:class:`memvae.experiments.cluster_options.LauncherOptions`);
    a job stopped by its time limit or preemption checkpoints and is requeued, and
    continues from that checkpoint (:mod:`memvae.experiments.cluster`). Its progress is one line per
    run and change (every ``poll_seconds``); ``wait`` False returns once the jobs are
    submitted (collect later with ``report_only``). Runs whose jobs fail are named in
    results.json and results.md ("unfinished") beside the report of the others; calling
    compare again resubmits only them.

    ``rows``: before reporting, complete each trained run's row
    (:func:`memvae.experiments.row.complete_row`: the whole test set and ``lossless``, and for
    a discrete model with ``prior.fit`` its prior and bits/dim), so that a run counts as
    finished only with all of it; a run cut off between these steps continues from the
    missing one. Not with ``test_images`` (a quick look) or ``report_only``.

    ``plan_file``: train nothing; write one shell command per unfinished run into this
    file (:mod:`memvae.experiments.plan`: the run's ``memvae train ... --resume --start-if-new``,
    the same run directory), for a Slurm array, GNU parallel or bash; returns {"plan": path, "runs": names}.
    """
    out = Path(out)
    _check_launcher(launcher, launcher_options, jobs, wait, report_only, plan_file)
    plan, sources = _plan_runs(out, models, steps, seeds, first_seed, config_dir, overrides, slots)
    states = [(cfg, run_dir, *_run_state(run_dir, cfg, extend)) for cfg, run_dir in plan]
    todo = [(cfg, run_dir, state) for cfg, run_dir, state, _ in states if state not in ("done", "collected")]
    training, failed = None, {}
    if report_only:
        plan = _finished_only(states, models, out, steps)
    else:
        _say_plan([(run_dir, state, step) for _, run_dir, state, step in states], steps)
    if not report_only and (plan_file is not None or launcher == "submitit"):
        commands = [plan_lines.run_command(cfg, sources[run_dir], run_dir, data_dir) for cfg, run_dir, _ in todo]
        if plan_file is not None:
            return _write_plan(plan_file, commands, todo, len(plan))
        failed, launched = _launch_submitit(out, todo, commands, launcher_options, wait, poll_seconds)
        if failed is None:
            return launched  # submitted, not waited for: collect later with report_only
        training = launched
        plan = [(cfg, run_dir) for cfg, run_dir in plan if run_dir.name not in failed]
        if not plan:
            raise MemvaeError("no run finished: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))
    first = plan[0][0].data
    data = load_data(first.source, data_dir or first.dir or None, first.image_size)  # once for all runs
    if not report_only and launcher == "local":
        training = _train_here(todo, [run_dir for _, run_dir in plan], steps, jobs, data, data_dir, out, show_progress)
    if rows and not report_only and test_images is None:
        _complete_rows(plan, data, lossless, data_dir)
    # The one place where the finished runs (trained here, by jobs, or before) are handed to report().
    results = report(out, plan, data, lossless, images_shown, test_images, training=training, sweep=bool(slots))
    if failed:
        _name_unfinished(out, results, failed)
    return results


def _plan_runs(out: Path, models, steps: int, seeds: int, first_seed: int, config_dir, overrides,
               slots: list[int] | None) -> tuple[list[tuple[C.Config, Path]], dict[Path, str]]:
    """The runs of a compare, seed by seed: (config, run directory) each, and each run
    directory's config source (what its command names, :func:`_config_source`)."""
    config_dir = None if config_dir is None else Path(config_dir)  # None: the packaged configs
    if first_seed < 0 or seeds < 1:
        raise MemvaeError(f"seeds must be >= 1 and first seed >= 0, got {seeds} from {first_seed}")
    plan, sources = [], {}
    for seed in range(first_seed, first_seed + seeds):
        for model in models:
            cfg = _model_config(model, config_dir, steps, seed, list(overrides))
            variants = [at_slots(cfg, k) for k in slots] if slots and is_discrete(cfg) else [cfg]
            plan += [(v, out / "runs" / f"{v.name}-seed{seed}") for v in variants]
            sources.update({out / "runs" / f"{v.name}-seed{seed}": _config_source(model, config_dir) for v in variants})
    names = [cfg.name for cfg, _ in plan]
    if len(set(names)) * seeds != len(names):
        raise MemvaeError(f"two models share a config name: {sorted(names)}")
    return plan, sources


def _finished_only(states, models, out: Path, steps: int) -> list[tuple[C.Config, Path]]:
    """``report_only``: the finished runs of the plan; the others are named, each with how
    far it has got (:func:`memvae.experiments.compare_progress.progress_text`)."""
    unfinished = sorted((run_dir.name, progress_text(run_dir, step, cfg.train.steps))
                        for cfg, run_dir, state, step in states if state not in ("done", "collected"))
    if unfinished:
        print(f"not finished, left out: {', '.join(text for _, text in unfinished)}", file=sys.stderr)
    plan = [(cfg, run_dir) for cfg, run_dir, state, _ in states if state in ("done", "collected")]
    if not plan:
        raise MemvaeError(f"no run of {', '.join(models)} in {out / 'runs'} has finished its {steps} updates")
    return plan


def _write_plan(plan_file, commands, todo, runs: int) -> dict:
    """``plan_file``: one shell command per unfinished run (:func:`memvae.experiments.plan.write_plan`)."""
    from memvae.experiments.plan import write_plan

    path = write_plan(plan_file, commands)
    print(f"wrote {path}: {len(commands)} command{'s' * (len(commands) != 1)}, one per unfinished run "
          f"(of {runs})", file=sys.stderr)
    return {"plan": str(path), "runs": [run_dir.name for _, run_dir, _ in todo]}


def _train_here(todo, run_dirs: list[Path], steps: int, jobs, data, data_dir, out: Path, show_progress: bool) -> dict:
    """The local launcher: say the plan (:func:`memvae.experiments.compare_progress.plan_text`,
    its time in all from the rates the plan's runs have logged before, if any), then train
    ``todo`` here, ``jobs`` at a time; returns what results.json records of the training."""
    workers = resolve_jobs(DEFAULT_JOBS if jobs is None else jobs, len(todo))
    left = [cfg.train.steps - logged_step(run_dir) for cfg, run_dir, _ in todo]
    rates = [rate for run_dir in run_dirs if (rate := measured_rate(run_dir))]
    print(plan_text(len(run_dirs), steps, left, workers, time_left([], left, workers, rates)), file=sys.stderr)
    started = time.perf_counter()
    if workers > 1:
        threads = max(1, cpu_cores() // workers)
        todo = [(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads)), run_dir, state)
                for cfg, run_dir, state in todo]
        train_side_by_side(todo, workers, data_dir, out / "logs", show_progress)
    else:
        for i, (cfg, run_dir, state) in enumerate(todo):  # each run shows its own bar (or plain lines)
            if i:  # the whole compare's time left, at the rates measured so far
                print(total_text(i, len(todo), time_left([], left[i:], 1, rates)), flush=True)
            _train_one(cfg, run_dir, state, data, show_progress)
            rates += [rate] if (rate := measured_rate(run_dir)) else []
    return {"jobs": workers, "runs_trained": len(todo), "wall_seconds": time.perf_counter() - started}


def _train_one(cfg: C.Config, run_dir: Path, state: str, data, show_progress: bool) -> None:
    """Train one run in this process; a stop names the command that resumes the whole compare."""
    try:
        train(cfg, run_dir, resume=state != "new", data=data, show_progress=show_progress)
    except KeyboardInterrupt as exc:  # train()'s "SIGINT: stopped at update N, ..."; resuming is this compare
        name, _, stopped = str(exc).split(";")[0].partition(": ")
        why = stop_reason(signal.Signals[name]) if name in ("SIGINT", "SIGTERM") else "stopped"
        raise KeyboardInterrupt(f"{why}: {run_dir.name} {stopped or 'stopped'}; resume with: "
                                f"{compare_command()}") from None


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


def _launch_submitit(out: Path, todo, commands, options, wait: bool, poll_seconds: float) -> tuple[dict | None, dict]:
    """:func:`compare` with the submitit launcher: submit (or follow) one job per
    unfinished run and wait -> (failed: run name -> why, what results.json records of the
    training); with ``wait`` False, (None, the job ids submitted) at once."""
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
        return None, {"submitted": {w.run.name: str(w.job.job_id) for w in watched}}
    try:
        failed = follow(watched, poll_seconds)
    except KeyboardInterrupt:
        # Slurm's jobs are not this terminal's; the local executor's are, and Ctrl-C reaches them too.
        raise KeyboardInterrupt("stopped waiting (Slurm jobs go on; local ones stop with a checkpoint): run the same "
                                "compare again to wait for or resubmit them, or add --report-only to collect what "
                                "has finished") from None
    return failed, {"launcher": "submitit", "cluster": cluster, "runs_trained": len(runs),
                    "wall_seconds": time.perf_counter() - started}


def _name_unfinished(out: Path, results: dict, failed: dict[str, str]) -> None:
    """Name the runs whose jobs failed in results.json and results.md, beside the report of the others."""
    results["unfinished"] = failed
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with open(out / "results.md", "a") as f:
        f.write("\nNot finished, left out (their jobs failed; the same compare resubmits them): "
                + "; ".join(f"{name}: {why}" for name, why in failed.items()) + "\n")
