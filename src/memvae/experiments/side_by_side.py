"""The local launcher's side-by-side training: the runs of a compare, ``workers`` at a time,
each in a fresh interpreter (:func:`train_child`) that writes to its own log, with one
progress bar (or plain line) per running run read from its metrics.jsonl; the first failure
or a stop (Ctrl-C, SIGTERM) stops the others, each with a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from memvae.config import schema as C
from memvae.errors import MemvaeError, os_error
from memvae.training.metrics import progress_line, rate_since, read_metrics
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
                        leave=False) if bar else None

    def refresh(self) -> None:
        records = [r for r in read_metrics(self.run_dir) if r["step"] > self.shown] if (self.run_dir / "metrics.jsonl").exists() else []
        for record in records:
            # The first record of this process starts the run's own clock.
            self.start_seconds = self.start_seconds or (record["step"], record["train_seconds"])
            if self.bar is not None:
                rate = rate_since(self.start_seconds, record)
                self.bar.update(record["step"] - self.bar.n)
                self.bar.set_postfix_str(f"NMSE {record['train_nmse']:.4f}" + (f", {rate:.2f} updates/s" if rate else ""))
            else:
                print(progress_line(self.run_dir.name, record, self.total, self.start_seconds), flush=True)
            self.shown = record["step"]

    def close(self, returncode: int | None) -> None:
        self.refresh()
        if self.bar is not None:
            self.bar.close()
        if returncode == 0:
            (tqdm.write if self.bar is not None else print)(f"{self.run_dir.name}: finished ({self.shown} updates)")


def train_side_by_side(todo: list[tuple[C.Config, Path, str]], workers: int, data_dir: str | None, log_dir: Path,
                        show_progress: bool, poll_seconds: float = 1.0) -> None:
    """Train ``todo`` (config, run directory, state), ``workers`` runs at a time, each in a
    fresh interpreter (:func:`train_child`) whose output goes to ``log_dir/<run>.log``.
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
                    proc = subprocess.Popen([sys.executable, "-c", "from memvae.experiments.side_by_side import train_child; train_child()"],
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
        # The compare stopped it (Ctrl-C, SIGTERM or another run's failure): the way back is that compare.
        print(f"stopped: {str(exc).split(';')[0]}; run the same memvae compare again to resume", flush=True)
