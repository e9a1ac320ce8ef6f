"""``memvae compare --launcher submitit``: each run of a comparison is one job (Slurm, or submitit's local executor).

A job runs the run's own command (:mod:`memvae.experiments.plan`: ``memvae train ... --resume``, under
torchrun when it has several GPUs) as a child process whose output goes to
``OUT/logs/<run>.log``, as with the local launcher. Nothing of the training lives in the
job's own process, so that stopping it is memvae's ordinary stop:

- **Time limit or preemption.** submitit sends the job its signal (USR2, ``--signal``
  90 s before Slurm's time limit) and calls :meth:`RunJob.checkpoint`: the child gets
  SIGTERM, saves a checkpoint at the update it is at and exits (memvae's own stop,
  :class:`memvae.training.loop.StopRequest`); the job is requeued, and the requeued job runs the
  same command, which continues from that checkpoint (``--resume``): the run ends with
  the numbers an unbroken run ends with. The child itself ignores the job's signal
  (Slurm signals every process of a job step), so that it is stopped only this way.
- **A job that ends without finishing its run** (an error, a SIGTERM of preemption
  without requeue, a kill) is named with the last line of its log; calling the same
  ``compare`` again resubmits exactly the runs that have not finished, each from its
  newest checkpoint, and waits for the jobs of runs still queued or running instead of
  submitting them twice (their job ids are kept in ``OUT/submitit/jobs.json``).

submitit is optional (``pip install 'memvae[cluster]'``); it is imported only here, and
only when this launcher is chosen.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from memvae.training.checkpoint import latest_checkpoint
from memvae.experiments.cluster_options import LauncherOptions
from memvae.errors import MemvaeError
from memvae.experiments.compare_progress import logged_step
from memvae.experiments.plan import RunCommand

INSTALL = "pip install 'memvae[cluster]' (or: pip install 'submitit>=1.5')"
# A stopped child has this long to save its checkpoint before it is killed: within the
# time between the job's signal and its end (submitit: 30 s with its local executor, 90 s on Slurm).
STOP_SECONDS = 25
# Slurm states of a job that may still train its run (squeue/sacct names).
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING"}
QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}


def require_submitit():
    """The submitit module, or the one line that says what to install."""
    try:
        import submitit
    except ImportError:
        raise MemvaeError(f"--launcher submitit needs the submitit package: {INSTALL}") from None
    return submitit


def _preempt_signal() -> signal.Signals:
    """The signal submitit stops a job with (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def last_line(path: Path) -> str | None:
    """The last non-empty line of a log, without memvae's "error: " prefix; None if none."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1].strip().removeprefix("error: ") if lines else None


class RunFailed(RuntimeError):
    """A run's command ended without finishing the run (its job's exception)."""


class RunJob:
    """One run as a submitit job: ``job()`` runs ``command`` (on ``processes`` processes)
    to its end; :meth:`checkpoint` (submitit calls it on the job's signal) stops it with a
    checkpoint and returns the job that continues it."""

    def __init__(self, name: str, command: RunCommand, log: str, processes: int = 1, threads: int | None = None):
        self.name, self.command, self.log = name, command, log
        self.processes, self.threads = processes, threads  # threads: OMP_NUM_THREADS of each process
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}  # a process handle does not travel with the job

    def __call__(self) -> int:
        """Train the run; returns its last update. RunFailed with the log's last line when
        the command ends otherwise."""
        env = {**os.environ, **self.command.env}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        argv = self.command.argv(self.processes)
        print(f"memvae: {self.name} on {socket.gethostname()}: {' '.join(argv)} (output: {self.log})", flush=True)
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_setup)
        try:
            # Poll rather than wait(): the job's signal runs checkpoint() in this thread,
            # and Popen.wait() would hold the lock that its own wait needs.
            while (code := self._proc.poll()) is None:
                time.sleep(0.5)
        finally:
            self._stop_child()  # this process ends (an error, Ctrl-C): its run stops with a checkpoint
        if code != 0:
            said = last_line(Path(self.log)) or f"exit status {code}"
            raise RunFailed(f"{self.name}: {said}")
        return _finished_step(Path(self.command.run_dir))

    def checkpoint(self):
        """On the job's signal: the child saves a checkpoint and exits; the returned
        submission (a fresh RunJob of the same run) resumes from it when requeued."""
        self._stop_child()
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.name, self.command, self.log, self.processes, self.threads))

    def _stop_child(self) -> None:
        """SIGTERM (memvae's stop: a checkpoint, then exit) and wait for the child; kill it
        after STOP_SECONDS. Waits with waitpid, not the Popen's lock (see __call__)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_SECONDS
        while True:
            try:
                pid, _ = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already: it has ended
                return
            if pid:
                return
            if time.monotonic() > deadline:
                proc.kill()
                return
            time.sleep(0.1)


def _child_setup() -> None:
    """In the child, before it starts: ignore the job's stop signal (the job stops the child
    with SIGTERM when it has received it), and get SIGTERM if the job's process dies."""
    signal.signal(_preempt_signal(), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _finished_step(run_dir: Path) -> int:
    found = latest_checkpoint(run_dir / "checkpoints")
    return int(found[1]["step"]) if found else 0


# ------------------------------------------------------------------ submitting
@dataclass
class Run:
    """One run to train: its name (the run directory's), command, total updates."""

    name: str
    command: RunCommand
    steps: int

    @property
    def run_dir(self) -> Path:
        return self.command.run_dir


def executor_parameters(options: LauncherOptions, cluster: str) -> dict:
    """submitit's AutoExecutor parameters for ``options`` on ``cluster`` ("slurm" or "local")."""
    params: dict = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": options.gpus}
    if options.time_min is not None:
        params["timeout_min"] = options.time_min
    elif cluster == "local":
        params["timeout_min"] = 10 * 24 * 60  # the local executor's own default (2 minutes) would stop every run
    if options.cpus_per_task is not None:
        params["cpus_per_task"] = options.cpus_per_task
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.account:
        params["slurm_account"] = options.account
    extra = {k: True if v is None else v for k, v in options.sbatch_parameters().items()}
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def make_executor(folder: Path, options: LauncherOptions):
    """An AutoExecutor on ``options.cluster`` ("auto": Slurm where it is installed, else local)."""
    submitit = require_submitit()
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=None if options.cluster == "auto" else options.cluster)
    except RuntimeError as exc:  # e.g. no executor available
        raise MemvaeError(f"submitit could not start an executor: {exc}") from None
    try:
        executor.update_parameters(**executor_parameters(options, executor.cluster))
    except (NameError, ValueError, AssertionError) as exc:
        raise MemvaeError(f"submitit refused the launcher options: {' '.join(str(exc).split())}") from None
    return executor


class Watched:
    """A run's job as compare follows it: submitted by this process (``ours``) or found
    in jobs.json still queued or running."""

    def __init__(self, run: Run, job, cluster: str, log: Path, ours: bool):
        self.run, self.job, self.cluster, self.log, self.ours = run, job, cluster, log, ours

    def active(self) -> bool:
        if self.cluster == "local":
            # A local job of another process cannot be polled by submitit: its controller's pid can.
            return not self.job.done() if self.ours else _local_controller_alive(self.job.job_id)
        return self.job.state in ACTIVE

    def queued(self) -> bool:
        return self.cluster != "local" and self.job.state in QUEUED

    def status(self) -> tuple[str, bool, str | None]:
        """(progress text, ended, failure reason or None)."""
        active = self.active()  # before the files, so that the last records are read after the end
        step = logged_step(self.run.run_dir)
        if active:
            if self.queued():
                return "queued", False, None
            return (f"running at update {step} of {self.run.steps}" if step else "running"), False, None
        if _finished_step(self.run.run_dir) >= self.run.steps:
            return f"done ({self.run.steps} updates)", True, None
        reason = last_line(self.log) or self._job_error() or f"job {self.job.job_id} ended ({self.job.state})"
        return f"failed: {reason}", True, reason

    def _job_error(self) -> str | None:
        try:
            error = self.job.exception()
        except Exception:  # noqa: BLE001 - no result pickle, a job of another cluster: nothing more to say
            return None
        lines = [ln for ln in str(error or "").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else None


def _local_controller_alive(job_id: str) -> bool:
    try:
        return b"submitit.local._local" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _jobs_file(folder: Path) -> Path:
    return folder / "jobs.json"


def _read_jobs(folder: Path) -> dict:
    try:
        return json.loads(_jobs_file(folder).read_text())
    except (OSError, ValueError):
        return {}


def _write_jobs(folder: Path, jobs: dict) -> None:
    path = _jobs_file(folder)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jobs, indent=1))
    os.replace(tmp, path)


def _recorded(entry: dict | None, cluster: str, folder: Path, submitit):
    """The job of a jobs.json entry if it is of this cluster and may still train, else None."""
    if not entry or entry.get("cluster") != cluster:
        return None
    job_id = str(entry["job_id"])
    if cluster == "local":
        return submitit.LocalJob(folder, job_id) if _local_controller_alive(job_id) else None
    job = submitit.SlurmJob(folder, job_id)
    return job if job.state in ACTIVE else None


def launch(runs: list[Run], out: Path, options: LauncherOptions) -> tuple[list[Watched], str]:
    """Submit one job per run (or find its job still queued or running); returns the jobs
    to follow and the cluster's name. Prints one line per run."""
    submitit = require_submitit()
    folder = out / "submitit"
    executor = make_executor(folder, options)
    cluster = executor.cluster
    jobs = _read_jobs(folder)
    processes = max(1, options.gpus)
    threads = max(1, options.cpus_per_task // processes) if options.cpus_per_task else None
    watched = []
    for run in runs:
        log = out / "logs" / f"{run.name}.log"
        job = _recorded(jobs.get(run.name), cluster, folder, submitit)
        if job is not None:
            print(f"{run.name}: job {job.job_id} is still queued or running; following it", flush=True)
            watched.append(Watched(run, job, cluster, log, ours=False))
            continue
        executor.update_parameters(name=f"memvae-{run.name}")
        job = executor.submit(RunJob(run.name, run.command, str(log), processes, threads))
        jobs[run.name] = {"job_id": str(job.job_id), "cluster": cluster, "submitted": time.time()}
        _write_jobs(folder, jobs)
        print(f"{run.name}: submitted (job {job.job_id}, {cluster})", flush=True)
        watched.append(Watched(run, job, cluster, log, ours=True))
    return watched, cluster


def follow(watched: list[Watched], poll_seconds: float = 10.0, update_seconds: float = 30.0) -> dict[str, str]:
    """Wait for every job; one line per run when its state changes (queued, running, done,
    failed), and while it runs, when its logged update has moved, at most every
    ``update_seconds``. Returns {run name: failure reason} of the runs that did not finish."""
    shown: dict[str, tuple[str, float]] = {}
    failures: dict[str, str] = {}
    pending = list(watched)
    while pending:
        for w in list(pending):
            text, ended, reason = w.status()
            last = shown.get(w.run.name)
            kind = text.split(" ")[0]
            if last is None or (last[0] != text and (ended or kind != last[0].split(" ")[0]
                                                     or time.monotonic() - last[1] >= update_seconds)):
                print(f"{w.run.name}: {text}", flush=True)
                shown[w.run.name] = (text, time.monotonic())
            if ended:
                pending.remove(w)
                if reason is not None:
                    failures[w.run.name] = reason
        if pending:
            time.sleep(poll_seconds)
    return failures
