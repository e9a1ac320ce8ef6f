"""The local launcher's side-by-side training: the runs of a compare, ``workers`` at a time,
each in a fresh interpreter (:func:`train_child`) that writes to its own log, with one
progress bar (or plain line) per running run read from its metrics.jsonl; the first failure
or a stop (Ctrl-C, SIGTERM) stops the others, each with a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from memvae.config import schema as C
from memvae.errors import MemvaeError, os_error
from memvae.experiments.compare_progress import logged_step, time_left, total_text
from memvae.training.checkpoint import latest_checkpoint
from memvae.training.loop import StopRequest
from memvae.training.metrics import BAR_FORMAT, progress_line, rate_since, rate_text, read_metrics
from memvae.training.train import train


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


def compare_command() -> str:
    """The command that resumes this compare: the same command line when this process is
    ``memvae compare ...`` (a finished run is skipped, a stopped one resumes from its
    checkpoint), else (compare called from Python) the same call."""
    if sys.argv[1:2] == ["compare"]:
        return shlex.join(["memvae", *sys.argv[1:]])
    return "the same compare call"


def stop_reason(signum: int) -> str:
    """Who stopped the compare, in the user's words: SIGINT is almost always Ctrl-C."""
    return "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped ({signal.Signals(signum).name} to the compare)"


class RunProgress:
    """The progress of one side-by-side run, read from its metrics.jsonl: a bar that moves
    with its logged updates and shows its latest training NMSE, or (``bar`` False) one plain
    line per log record. Rate and time left come from the run's own clock (the training
    seconds it logs), not from the compare's."""

    def __init__(self, run_dir: Path, total: int, position: int, bar: bool):
        self.run_dir, self.total, self.position = run_dir, total, position
        self.shown = self.start = logged_step(run_dir)
        self.start_seconds = self.rate = None  # rate: updates/s since this process's first record
        self.bar = tqdm(total=total, initial=self.start, desc=run_dir.name, position=position, dynamic_ncols=True,
                        leave=False, bar_format=BAR_FORMAT) if bar else None

    def refresh(self) -> int:
        """Show the records logged since the last refresh; returns how many there were."""
        records = [r for r in read_metrics(self.run_dir) if r["step"] > self.shown] if (self.run_dir / "metrics.jsonl").exists() else []
        for record in records:
            # The first record of this process starts the run's own clock.
            self.start_seconds = self.start_seconds or (record["step"], record["train_seconds"])
            self.rate = rate_since(self.start_seconds, record) or self.rate
            if self.bar is not None:
                self.bar.update(record["step"] - self.bar.n)
                self.bar.set_postfix_str(f"NMSE {record['train_nmse']:.4f}" + rate_text(record, self.total, self.start_seconds))
            else:
                print(progress_line(self.run_dir.name, record, self.total, self.start_seconds), flush=True)
            self.shown = record["step"]
        return len(records)

    def close(self, returncode: int | None) -> None:
        self.refresh()
        if self.bar is not None:
            self.bar.close()
        if returncode == 0:
            (tqdm.write if self.bar is not None else print)(f"{self.run_dir.name}: finished ({self.shown} updates)")


class TotalLine:
    """The compare's own line under the runs' bars: runs trained and the time left in all
    (:func:`memvae.experiments.compare_progress.time_left`), revised as the runs log; without
    bars (``bar`` False), one plain line after each round of records that changes it."""

    def __init__(self, runs: int, position: int, bar: bool):
        self.runs, self.finished, self.said = runs, 0, None
        self.line = tqdm(bar_format="{desc}", position=position, leave=False, dynamic_ncols=True) if bar else None

    def update(self, seconds: float | None, logged: bool) -> None:
        """Show the estimate ``seconds``; ``logged``: a run logged since the last update."""
        text = total_text(self.finished, self.runs, seconds)
        if self.line is not None:
            self.line.set_description_str(text)
        elif logged and text != self.said:
            print(text, flush=True)
        self.said = text

    def close(self) -> None:
        if self.line is not None:
            self.line.close()


def train_side_by_side(todo: list[tuple[C.Config, Path, str]], workers: int, data_dir: str | None, log_dir: Path,
                       show_progress: bool, poll_seconds: float = 1.0) -> None:
    """Train ``todo`` (config, run directory, state), ``workers`` runs at a time, each in a
    fresh interpreter (:func:`train_child`) whose output goes to ``log_dir/<run>.log``.
    Progress: one :class:`RunProgress` per running run. The first run that fails
    stops the others (each saves a checkpoint) and raises its one-line error.

    Ctrl-C (or SIGTERM) to the compare stops every run with a checkpoint: the runs live in
    their own sessions, so the terminal's SIGINT reaches this process alone, which closes
    the bars first (the terminal is left clean), passes the same signal on with a line in
    each run's log that says why, waits for their checkpoints and raises KeyboardInterrupt
    naming the interrupt, where each run stopped and the command that resumes them."""
    log_dir.mkdir(parents=True, exist_ok=True)
    bars: dict[Path, RunProgress] = {}
    pending, running, failure = list(todo), {}, None
    resume = compare_command()
    # The whole compare's time left: the runs' measured rates, and the updates each run still to start has left.
    total, ended = TotalLine(len(todo), workers, show_progress), []
    left = {run_dir: cfg.train.steps - logged_step(run_dir) for cfg, run_dir, _ in todo}

    def stop_all(signum: int, why: str) -> None:
        for proc, (run_dir, log) in running.items():
            log.write(f"compare: {why}: stopping this run (it saves a checkpoint)\n")
            log.flush()
            proc.send_signal(signum)  # train() saves a checkpoint and stops
        for proc in running:
            proc.wait()

    def close_bars() -> None:
        for bar in bars.values():
            bar.close(None)
        bars.clear()
        total.close()

    # A flag, not an exception: Ctrl-C never lands in the middle of a bar's write.
    with StopRequest() as stop:
        try:
            while ((pending and failure is None) or running) and stop.signal is None:
                while pending and failure is None and len(running) < workers:
                    cfg, run_dir, state = pending.pop(0)
                    proc, log = _start_run(cfg, run_dir, state, log_dir, data_dir, resume)
                    running[proc] = (run_dir, log)
                    free = min(set(range(workers)) - {b.position for b in bars.values()})
                    bars[run_dir] = RunProgress(run_dir, cfg.train.steps, free, show_progress)
                time.sleep(poll_seconds)
                logged = 0
                for proc, (run_dir, log) in list(running.items()):
                    finished = proc.poll() is not None  # before reading the log, so that its last records are shown
                    logged += bars[run_dir].refresh()
                    if not finished:
                        continue
                    bar = bars.pop(run_dir)
                    bar.close(proc.returncode)
                    total.finished += int(proc.returncode == 0)
                    ended += [bar.rate] if bar.rate else []
                    log.close()
                    del running[proc]
                    if proc.returncode and failure is None:
                        lines = [ln for ln in (log_dir / f"{run_dir.name}.log").read_text().splitlines() if ln.strip()]
                        said = lines[-1].removeprefix("error: ") if lines and lines[-1].startswith("error: ") else None
                        failure = f"{run_dir.name}: {said}" if said else (
                            f"{run_dir.name} failed (exit status {proc.returncode}); see {log_dir / run_dir.name}.log")
                        stop_all(signal.SIGTERM, f"{run_dir.name} failed")  # their bars close as they end
                total.update(time_left([(b.total - b.shown, b.rate) for b in bars.values()],
                                       [left[d] for _, d, _ in pending], workers, ended), logged > 0)
        except BaseException:  # a bug or a refusing disk here: the runs must not train on unseen
            close_bars()
            stop_all(signal.SIGTERM, "the compare failed")
            raise
        close_bars()
        if stop.signal is not None:
            why = stop_reason(stop.signal)
            if running:
                print(f"{why}: stopping {len(running)} run{'s' * (len(running) > 1)}, each at its next update "
                      "with a checkpoint ...", file=sys.stderr, flush=True)
            stopped = [run_dir for run_dir, _ in running.values()]
            stop_all(stop.signal, why)
            at = [f"{d.name} at update {step} (checkpoint saved)" if (step := _checkpoint_step(d)) is not None
                  else f"{d.name} before its first checkpoint" for d in stopped]
            raise KeyboardInterrupt(f"{why}: stopped {', '.join(at) or 'between runs'}; resume with: {resume}")
    if failure is not None:
        raise MemvaeError(failure)


def _start_run(cfg: C.Config, run_dir: Path, state: str, log_dir: Path, data_dir: str | None,
               resume: str) -> tuple[subprocess.Popen, object]:
    """Start one run in a fresh interpreter (:func:`train_child`) writing to
    ``log_dir/<run>.log``; returns the process and the open log."""
    log = open(log_dir / f"{run_dir.name}.log", "a")
    job = {"config": C.to_dict(cfg), "run_dir": str(run_dir), "resume": state != "new",
           "data_dir": data_dir, "parent": os.getpid(), "argv": sys.argv, "resume_command": resume}
    # Its own session: the terminal's Ctrl-C reaches the compare only, which decides.
    proc = subprocess.Popen([sys.executable, "-c", "from memvae.experiments.side_by_side import train_child; train_child()"],
                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    return proc, log


def _checkpoint_step(run_dir: Path) -> int | None:
    """The update of a run's newest checkpoint (None before its first)."""
    found = latest_checkpoint(run_dir / "checkpoints")
    return None if found is None else found[1]["step"]


def train_child() -> None:
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
        # The compare stopped it (its line above says why) or died: the way back is that compare,
        # not train()'s own `memvae train --resume` hint.
        stopped = str(exc).split(";")[0].partition(": ")[2] or "stopped before its training began"
        died = " (its compare ended)" if os.getppid() != job["parent"] else ""
        print(f"{stopped}{died}; resume with: {job.get('resume_command', 'the same memvae compare')}", flush=True)
