"""Runs that survive: faults injected into checkpoint writes, real processes killed and
resumed, non-finite losses, and checkpoints crafted or damaged on purpose.

Subprocess tests run ``python -m memvae train`` on the smoke config (one thread, 100
updates, a checkpoint every 6) and compare with one uninterrupted run of the same command.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from memvae.training import checkpoint
from memvae.training.checkpoint import load_latest, save_checkpoint
from memvae.errors import MemvaeError
from memvae.training.metrics import MetricsLog, read_metrics
from memvae.training.train import train
from tests import trainee
from tests.cli_util import SMOKE, assert_same_state, checkpoint_step, run_memvae, smoke_config as smoke, strip_times

LINUX = sys.platform.startswith("linux")  # fork and /proc/self/fd below
STEPS = 100
LOG_EVERY = 4
TRAIN_ARGS = [
    "--config", SMOKE, "--train.threads", "1", "--train.steps", STEPS, "--train.log_every", LOG_EVERY,
    "--train.eval_every", "25", "--train.checkpoint_every", "6",
    # Re-seeding draws random numbers at every update: resuming must restore the RNG.
    "--bottleneck.kind", "memory", "--bottleneck.temperature", "relative", "--bottleneck.write", "hard_ema",
    "--bottleneck.encoder_gradient", "straight_through", "--bottleneck.reseed_fraction", "0.25", "--no-progress",
]


def small_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
        "step": seed,
        "config": {"model": {"hidden": 8}},
    }


# ------------------------------------------------------------------ fault injection
class DiskFull(io.RawIOBase):
    """A file that takes ``limit`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        if len(data) > self.left:
            self.f.write(data[: self.left])
            self.f.flush()
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        super().close()  # flushes first
        self.f.close()


def _fail_nth(real, n: int, exc: Exception, when=lambda *a: True):
    """Wrap ``real`` so that its ``n``-th call for which ``when(*args)`` holds raises ``exc``."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc
        return real(*args, **kwargs)

    return wrapper


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _inject(monkeypatch, fault: str) -> None:
    real_save, real_open = torch.save, open
    if fault == "torch.save writes half, then fails":
        def half_then_fail(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(torch, "save", half_then_fail)
    elif fault in ("disk full in the checkpoint", "disk full in latest.json"):
        target = ".pt.tmp" if "checkpoint" in fault else "latest.json.tmp"

        def disk_full_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return DiskFull(f, 100) if str(file).endswith(target) and "w" in mode else f

        monkeypatch.setattr(checkpoint, "open", disk_full_open, raising=False)
    elif fault == "fsync of the checkpoint fails (ENOSPC)":
        exc = OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", _fail_nth(os.fsync, 1, exc, when=lambda fd: _fd_path(fd).endswith(".pt.tmp")))
    elif fault == "fsync of latest.json fails (EIO)":
        exc = OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "fsync", _fail_nth(os.fsync, 1, exc, when=lambda fd: _fd_path(fd).endswith("latest.json.tmp")))
    elif fault == "rename of the checkpoint fails":
        monkeypatch.setattr(os, "replace", _fail_nth(os.replace, 1, OSError(errno.EACCES, "Permission denied")))
    elif fault == "rename of latest.json fails":
        monkeypatch.setattr(os, "replace", _fail_nth(os.replace, 2, OSError(errno.EROFS, "Read-only file system")))
    else:  # pragma: no cover
        raise AssertionError(fault)


WRITE_FAULTS = [
    "torch.save writes half, then fails",
    "disk full in the checkpoint",
    "fsync of the checkpoint fails (ENOSPC)",
    "rename of the checkpoint fails",
    "disk full in latest.json",
    "fsync of latest.json fails (EIO)",
    "rename of latest.json fails",
]


@pytest.mark.skipif(not LINUX, reason="identifies files by /proc/self/fd")
@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, fault):
    good, newer, later = small_state(10), small_state(20), small_state(30)
    save_checkpoint(tmp_path, good, 10)
    with monkeypatch.context() as m:
        _inject(m, fault)
        with pytest.raises(OSError):
            save_checkpoint(tmp_path, newer, 20)
    assert_same_state(load_latest(tmp_path), good)
    assert json.loads((tmp_path / "latest.json").read_text())["file"] == "step_00000010.pt"
    assert not list(tmp_path.glob("*.tmp")), "a failed write left its temporary file"
    # The disk works again: the next save is the latest.
    save_checkpoint(tmp_path, later, 30)
    assert_same_state(load_latest(tmp_path), later)


CRASH_POINTS = {
    # point: the step load_latest must find afterwards
    "half of the checkpoint written": 10,
    "checkpoint written, before its rename": 10,
    "checkpoint renamed, before latest.json": 10,
    "half of latest.json written": 10,
    "latest.json written, before its rename": 10,
    "latest.json renamed, before old files are removed": 20,
}


def _save_and_die_at(directory: Path, state: dict, step: int, point: str) -> None:
    """In a forked child: save, and end the process abruptly (os._exit: no cleanup, no
    finally blocks) at ``point``, as a power cut or SIGKILL would."""
    real_open, real_replace = open, os.replace

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = str(file)
        if "w" in mode and (
            (point == "half of the checkpoint written" and name.endswith(".pt.tmp"))
            or (point == "half of latest.json written" and name.endswith("latest.json.tmp"))
        ):
            class Dying(DiskFull):
                def write(self, data):
                    self.f.write(bytes(data)[: max(1, len(data) // 2)])
                    self.f.flush()
                    os._exit(0)

            return Dying(f, 0)
        return f

    def dying_replace(src, dst):
        src, dst = str(src), str(dst)
        if point == "checkpoint written, before its rename" and src.endswith(".pt.tmp"):
            os._exit(0)
        if point == "latest.json written, before its rename" and src.endswith("latest.json.tmp"):
            os._exit(0)
        real_replace(src, dst)
        if point == "checkpoint renamed, before latest.json" and dst.endswith(".pt"):
            os._exit(0)
        if point == "latest.json renamed, before old files are removed" and dst.endswith("latest.json"):
            os._exit(0)

    checkpoint.open = dying_open
    os.replace = dying_replace
    save_checkpoint(directory, state, step)


@pytest.mark.skipif(not LINUX, reason="crashes a forked child")
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, point):
    for step in (2, 4, 6, 8, 10):  # a few older files, so removal of old ones is in play
        save_checkpoint(tmp_path, small_state(step), step)
    pid = os.fork()
    if pid == 0:  # child
        try:
            _save_and_die_at(tmp_path, small_state(20), 20, point)
            os._exit(3)  # the crash point was never reached
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child did not die at {point!r}"
    expected = CRASH_POINTS[point]
    assert_same_state(load_latest(tmp_path), small_state(expected))
    # The run goes on: the next save works and cleans up what the crash left.
    save_checkpoint(tmp_path, small_state(30), 30)
    assert_same_state(load_latest(tmp_path), small_state(30))
    assert not list(tmp_path.glob("*.tmp")), "temporary files of the crashed save are left behind"


def test_old_checkpoints_with_higher_numbers_never_remove_the_newest(tmp_path):
    """Files left from before a crash (pointer write failed) may carry higher update numbers
    than a resumed run's new checkpoints; removing 'all but the last few by name' must not
    delete the file latest.json has just been pointed at."""
    save_checkpoint(tmp_path, small_state(50), 50)
    for step in (55, 57, 59):  # written, but latest.json was never updated to name them
        torch.save(small_state(step), tmp_path / f"step_{step:08d}.pt")
    # The resumed run, with a checkpoint interval of 2, saves 52 then 54.
    for step in (52, 54):
        save_checkpoint(tmp_path, small_state(step), step)
        assert_same_state(load_latest(tmp_path), small_state(step))


def test_training_goes_on_when_saves_fail_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, small_cifar):
    """From update 10 on, the disk is full while a checkpoint is written (a real torch.save
    into a file that fails with ENOSPC half-way). Training must go on to its last update,
    warn at every failed save mid-run, keep the update-5 checkpoint, end in an error that
    names it (the last save failed too: the run lost its model), and resuming from it must
    end exactly as a run that never failed."""
    cfg = smoke("train.steps=20", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=5")
    train(cfg, tmp_path / "clean", show_progress=False, data=small_cifar)

    real_open = open

    def full_from_10(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        m = re.search(r"step_(\d+)\.pt\.tmp$", str(file))
        return DiskFull(f, 4096) if m and int(m.group(1)) >= 10 and "w" in mode else f

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "open", full_from_10, raising=False)
        with pytest.raises(MemvaeError, match=r"could not save the checkpoint of update 20, the last of this run "
                                              r"\(\[Errno 28\] No space left on device\); the newest checkpoint on disk is update 5 "):
            train(cfg, tmp_path / "faulty", show_progress=False, data=small_cifar)
    out = capsys.readouterr().out
    for step in (10, 15):
        assert f"warning: could not save checkpoint at update {step}" in out, out
    assert "No space left on device" in out and "the previous one is kept" in out
    assert load_latest(tmp_path / "faulty" / "checkpoints")["step"] == 5
    assert strip_times(read_metrics(tmp_path / "faulty")) == strip_times(read_metrics(tmp_path / "clean"))

    train(cfg, tmp_path / "faulty", resume=True, show_progress=False, data=small_cifar)
    clean = MetricsLog(tmp_path / "clean" / "metrics.jsonl").read()
    resumed = MetricsLog(tmp_path / "faulty" / "metrics.jsonl").read()
    assert strip_times(resumed) == strip_times(clean)
    a, b = load_latest(tmp_path / "clean" / "checkpoints"), load_latest(tmp_path / "faulty" / "checkpoints")
    assert_same_state(a, b)


# ------------------------------------------------------------------ killed processes
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted ``memvae train`` of TRAIN_ARGS: (metrics without times, final model)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = run_memvae("train", *TRAIN_ARGS, "--run-dir", run)
    assert result.returncode == 0, result.stderr
    state = load_latest(run / "checkpoints")
    assert state["step"] == STEPS
    return strip_times(MetricsLog(run / "metrics.jsonl").read()), state


def _assert_identical(run: Path, reference) -> None:
    metrics, state = reference
    assert strip_times(MetricsLog(run / "metrics.jsonl").read()) == metrics
    final = load_latest(run / "checkpoints")
    assert final["step"] == STEPS
    assert_same_state(final, state)
    for key in state["optimizer"]["state"]:
        for name, value in state["optimizer"]["state"][key].items():
            assert torch.equal(final["optimizer"]["state"][key][name], value), (key, name)


def _seeded_rng(request) -> tuple[int, random.Random]:
    """A random.Random whose seed is drawn once and printed (and kept in the test's report),
    so that a failing draw can be replayed: MEMVAE_TEST_SEED=N replays it."""
    seed = int(os.environ.get("MEMVAE_TEST_SEED") or random.randrange(2**32))
    print(f"{request.node.name}: seed {seed} (MEMVAE_TEST_SEED={seed} replays it)")
    request.node.user_properties.append(("seed", seed))
    return seed, random.Random(seed)


def _last_checkpoint_before(update: int, every: int = 6) -> int | None:
    """The newest checkpoint on disk when a run stopped inside update ``update`` (before that
    update's own save): the last multiple of ``every`` below it."""
    return ((update - 1) // every) * every or None


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_sigkill_at_random_updates_then_resume_ends_identical(tmp_path, uninterrupted, request):
    """Killed twice (once in the first process, once in a resumed one) at updates drawn from a
    printed seed; each process stops itself at its update (tests.trainee) and is killed there."""
    seed, rng = _seeded_rng(request)
    run = tmp_path / "run"
    killed_at = []
    args = ["train", *TRAIN_ARGS, "--run-dir", run]
    for _ in range(2):
        start = (checkpoint_step(run) or 0) + 1
        target = rng.randrange(start, STEPS - 25)
        proc = trainee.start(f"update:{target}", *args)
        trainee.wait_until_stopped(proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}"
        assert checkpoint_step(run) == _last_checkpoint_before(target), f"seed {seed}: killed at update {target}"
        # The log holds every record below the update it stopped in (a resumed process drops the
        # dead one's records after its checkpoint and logs them again), and none of that update.
        logged = [r["step"] for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == "train"]
        assert logged == list(range(LOG_EVERY, target, LOG_EVERY)), f"seed {seed}: killed at update {target}"
        killed_at.append(target)
        args = ["train", "--run-dir", run, "--resume", "--no-progress"]
    result = run_memvae(*args)
    assert result.returncode == 0, result.stderr
    assert f"update {STEPS}" in result.stdout
    _assert_identical(run, uninterrupted)
    print(f"seed {seed}: killed at updates {killed_at}")


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_sigkill_before_the_first_checkpoint_then_resume_ends_identical(tmp_path, uninterrupted):
    """Killed after it logged but before any checkpoint: --resume starts from update 0 and
    must not keep the dead run's log records (they would appear twice)."""
    run = tmp_path / "run"
    proc = trainee.start("update:9", "train", *TRAIN_ARGS, "--train.checkpoint_every", "50", "--run-dir", run)
    trainee.wait_until_stopped(proc)  # after update 9: records of updates 4 and 8 logged, no checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_step(run) is None
    assert [r["step"] for r in MetricsLog(run / "metrics.jsonl").read()] == [4, 8]
    result = run_memvae("train", "--run-dir", run, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "starting from update 0" in result.stdout
    _assert_identical(run, uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_exit_130_and_resume_identically(tmp_path, uninterrupted, sig, request):
    """The signal reaches the run inside an update drawn from a printed seed (the run stops
    itself there, tests.trainee, and gets the signal, then SIGCONT): it stops at that update."""
    seed, rng = _seeded_rng(request)
    at = rng.randrange(6, 60)
    run = tmp_path / "run"
    proc = trainee.start(f"update:{at}", "train", *TRAIN_ARGS, "--run-dir", run)
    trainee.wait_until_stopped(proc)
    proc.send_signal(sig)  # pending while it is stopped, handled as soon as it goes on
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seed, proc.returncode, err)
    assert "Traceback" not in err
    assert "--resume" in err and str(run) in err, err
    found = re.search(r"stopped at update (\d+), checkpoint saved", err)
    assert found, err
    stopped = int(found.group(1))
    assert stopped == at, f"seed {seed}"
    assert checkpoint_step(run) == stopped
    assert (run / "checkpoints" / f"step_{stopped:08d}.pt").is_file()
    assert load_latest(run / "checkpoints")["step"] == stopped

    result = run_memvae("train", "--run-dir", run, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    _assert_identical(run, uninterrupted)
