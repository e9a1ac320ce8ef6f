"""``python -m tests.trainee WHEN ARGS...``: ``memvae ARGS`` that stops itself (SIGSTOP) at one
known point of its loop, so that a test signals it there and nowhere else.

WHEN is ``update:K`` (right after update K, before anything of update K is logged or
saved) or ``checkpoint:K`` (right after the checkpoint of update K is on disk). The
process then waits, stopped, for the test: a SIGKILL kills it at exactly that point, and a
SIGTERM or SIGINT followed by SIGCONT is handled before the loop reads its stop flag, so the
run stops at update K. Nothing else differs from ``python -m memvae ARGS``: the command line
is memvae's own (``sys.argv`` reads ``memvae ARGS``, as the run lock's holder line and the
resume hint show it), and both loops (the autoencoder's and the prior's) are covered.

A test that starts this as its child waits for the stop with :func:`wait_until_stopped`
(``waitpid`` with ``WUNTRACED``: no polling, no sleep). One started further down (a submitit
job's child, a script's) is found stopped with :func:`stopped_descendant`; a run's end is
awaited on its lock (:func:`wait_for_lock`), which its process holds until its last thread
has gone, not on its main thread's state.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def _stop_here() -> None:
    # The whole process stops (every thread): what the test sends next lands at this point.
    os.kill(os.getpid(), signal.SIGSTOP)


def install(when: str) -> None:
    """Patch both loops' ``update`` (``update:K``) or their checkpoint ``save`` (``checkpoint:K``)."""
    what, _, step = when.partition(":")
    if what not in ("update", "checkpoint") or not step.isdigit():
        raise SystemExit(f"tests.trainee: WHEN is update:K or checkpoint:K, got {when!r}")
    at = int(step)
    from memvae.prior.fit import PriorTrainer
    from memvae.training import engine

    name = "update" if what == "update" else "save"
    for cls in (engine.Trainer, PriorTrainer):
        def stopping(self, *args, _real=getattr(cls, name), **kwargs):
            out = _real(self, *args, **kwargs)
            if self.step == at:
                _stop_here()
            return out
        setattr(cls, name, stopping)


def start(when: str, *args, env: dict | None = None) -> subprocess.Popen:
    """Start ``memvae ARGS`` stopping at ``when`` as a child of this process, the way
    :func:`tests.cli_util.start_memvae` starts it (pipes, the test environment)."""
    from tests.cli_util import cli_env
    from tests.conftest import REPO

    return subprocess.Popen([sys.executable, "-m", "tests.trainee", when, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env or cli_env())


def wait_until_stopped(proc: subprocess.Popen, deadline: float = 300.0) -> None:
    """Block until ``proc`` (a child of this process started with this module) has stopped
    itself. ``deadline`` only bounds a failure: a child that neither stops nor ends in that
    time is killed and the test fails; one that ended instead fails it with its stderr."""
    result: dict = {}

    def wait():
        result["status"] = os.waitpid(proc.pid, os.WUNTRACED)[1]

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(deadline)
    if waiter.is_alive():
        proc.kill()  # ends the waitpid too; the test has failed
        waiter.join()
        raise AssertionError(f"pid {proc.pid} neither stopped nor ended within {deadline} s")
    status = result["status"]
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell the Popen
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"pid {proc.pid} ended (status {proc.returncode}) before its stop point: {err}")


# ------------------------------------------------------------------ processes that are not this one's children
def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for(predicate, seconds: float = 300, what: str = "") -> None:
    """Poll ``predicate`` (an event: a file written, a process's state) every 0.1 s until it
    holds. ``seconds`` bounds only a failure: nothing here waits for time to pass."""
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def state(pid: int) -> str:
    """The process's state letter from /proc ("T": stopped, "Z": ended, not yet reaped); "" when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits, undelivered, for the process (a stopped one keeps it so)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def stopped_descendant(parent: int, depth: int) -> int:
    """The pid of the training ``depth`` generations below ``parent``, once it has stopped
    itself (this module): polled from /proc, an event and not a time."""
    found: list[int] = []

    def stopped() -> bool:
        pids = [parent]
        for _ in range(depth):
            pids = [child for pid in pids for child in children(pid)]
        found[:] = [pid for pid in pids if state(pid) == "T"]
        return bool(found)

    wait_for(stopped, what="the training to stop itself at its checkpoint")
    (pid,) = found
    return pid


def continue_once_pending_term(training: int) -> None:
    """Let the stopped training go on as soon as its SIGTERM is pending (sent by the job or
    script under test), so that it handles it at a known point: the update after its checkpoint."""
    wait_for(lambda: pending(training, signal.SIGTERM), what="SIGTERM to reach the stopped training")
    os.kill(training, signal.SIGCONT)


def wait_for_lock(run: Path, seconds: float = 120) -> None:
    """Block on the run's lock (flock, as a second writer would take it) until its holder
    has ended, then let it go. ``seconds`` bounds only a failure."""
    from memvae.training.runlock import LOCK_FILE

    fd = os.open(run / LOCK_FILE, os.O_RDWR)
    taken = threading.Event()

    def take():
        fcntl.flock(fd, fcntl.LOCK_EX)
        taken.set()

    threading.Thread(target=take, daemon=True).start()
    try:
        assert taken.wait(seconds), f"{run}'s lock was still held {seconds} s after its job was killed"
    finally:
        os.close(fd)  # releases it (and leaves a thread still blocked in flock to fail with the test)


def main(argv: list[str]) -> int:
    install(argv[0])
    from memvae.cli.main import main as memvae

    sys.argv = ["memvae", *argv[1:]]
    return memvae(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
