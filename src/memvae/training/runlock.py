"""One writer per run directory: an OS lock on ``RUN_DIR/.lock``.

Every command that writes into a run directory holds it while it writes: ``train`` and
``train --resume`` (so each run of ``compare`` too, which trains through
:func:`memvae.training.train.train`), ``prior``, ``eval`` (it writes eval.json) and ``sample``
when its picture goes into the run. A second writer fails at once with one line naming
the process that holds the lock. Readers (``plot``, ``reconstruct``, ``eval --no-write``)
take none. Under ``torchrun`` only rank 0 takes it: the other ranks write nothing.

The lock is ``fcntl.flock`` on the file, which the OS releases when the process ends,
however it ends: a run killed with SIGKILL leaves the file (its pid still in it) but no
lock, and the next run takes it. ``--overwrite`` keeps the file. The one time it is
removed is when the process that created the run directory leaves it holding nothing but
the lock file (a run that failed before it wrote anything, e.g. on unreadable data): then
the lock file and the directory go, while the lock is still held, so that no empty folder
is left for the next ``train`` to step around. A process that was waiting on the removed
file would then hold a lock on a file no longer in the folder: every holder checks, once
it has the lock, that the file it locked is the one the folder names, and starts again if
not, so two writers never hold different files of the same name.
"""
from __future__ import annotations

import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

from memvae.errors import MemvaeError, os_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: run directories are not locked there
    fcntl = None

LOCK_FILE = ".lock"


def holder_command() -> str:
    """This process's command line as the user would type it (``memvae train ...``), for
    the lock file: what a second writer is told is in its way."""
    argv = list(sys.argv) or ["python"]
    # `memvae ...` and `python -m memvae ...` both start memvae/__main__.py or the script.
    words = ["memvae", *argv[1:]] if Path(argv[0]).name in ("memvae", "__main__.py") else [Path(argv[0]).name, *argv[1:]]
    return shlex.join(words)[:300]


@contextmanager
def run_lock(run_dir: str | os.PathLike, create: bool = True, remove_if_unused: bool = False):
    """Hold the lock on ``run_dir`` while the block runs.

    Args:
        run_dir: the run directory.
        create: make it (and missing parents) first, as training does; without it the
            directory must exist (prior, eval, sample write into a trained run).
        remove_if_unused: on release, remove the lock file and ``run_dir`` if nothing else
            is in it (``train`` asks for it when it creates the run directory).

    Raises MemvaeError, one line: another process holds the lock (its pid and command),
    or the directory cannot be created or written (permission, read-only file system,
    full disk, a parent that is a file).
    """
    run_dir = Path(run_dir)
    if fcntl is None:
        yield
        return
    while True:
        fd = _open_lock_file(run_dir, create)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise MemvaeError(f"run directory {run_dir} is in use by {holder}; wait for it to end, "
                              "or stop it, before writing into this run") from None
        if _still_named(fd, run_dir):
            break
        os.close(fd)  # its holder removed the file (and maybe the folder) before we locked it: start again
    try:
        _write(fd, f"{os.getpid()} {holder_command()}\n")
        try:
            yield
        finally:
            _write(fd, "")  # released: the file no longer names a holder
            if remove_if_unused:
                _remove_if_unused(run_dir)
    finally:
        os.close(fd)  # releases the lock


def _still_named(fd: int, run_dir: Path) -> bool:
    """Whether the locked file ``fd`` is still RUN_DIR/.lock (and not a file removed since)."""
    try:
        named = os.stat(run_dir / LOCK_FILE)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_if_unused(run_dir: Path) -> None:
    """Remove the lock file and ``run_dir`` when nothing else was written into it; called with
    the lock held. Anything in the way is left as it is."""
    try:
        if [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()
    except OSError:
        pass


def _open_lock_file(run_dir: Path, create: bool) -> int:
    """The lock file's descriptor (not inherited by child processes: Python's default,
    so that a subprocess never keeps a run locked after its parent died)."""
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"create run directory {run_dir}") from None
    elif not run_dir.is_dir():
        raise MemvaeError(f"run directory {run_dir} does not exist")
    try:
        return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise os_error(exc, f"write into run directory {run_dir}") from None


def _holder(fd: int) -> str:
    """"process PID (COMMAND)" from the lock file, as its holder wrote it."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():  # the holder has locked the file but not written it yet
        return "another process"
    return f"process {pid} ({command})" if command else f"process {pid}"


def _write(fd: int, text: str) -> None:
    """Replace the lock file's text. A failure (a full disk) is ignored: the text only
    tells a second writer who holds the lock; the lock itself is the OS's."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    except OSError:
        pass
