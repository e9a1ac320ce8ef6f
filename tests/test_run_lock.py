"""One writer per run directory, a run that lost its last checkpoint never ends as done,
and a folder or disk that refuses ends in one line with status 2 (issue 22).

Real processes share a run directory (the first is held still with SIGSTOP while the second
tries, so that the test never depends on timing); a real small tmpfs fills up and a real
read-only mount refuses where the machine lets the test mount one (root in a container);
otherwise the write is patched to fail as a full disk does.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from memvae.training import checkpoint
from memvae.config import schema as C
from memvae import data as data_module
from memvae.training.checkpoint import load_latest
from memvae.cli.main import main
from memvae.data import ImageData
from memvae.training.engine import Trainer
from memvae.errors import MemvaeError
from memvae.training.metrics import MetricsLog
from memvae.training.runlock import LOCK_FILE, run_lock
from memvae.training.runs import prepare_run_dir
from memvae.training.train import train
from tests import trainee
from tests.cli_util import SMOKE, checkpoint_step, run_memvae
from tests.test_reliability import STEPS, TRAIN_ARGS, DiskFull, _assert_identical, uninterrupted  # noqa: F401

ROOT = os.geteuid() == 0


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _holder_pid(run: Path) -> int:
    return int((run / LOCK_FILE).read_text().split()[0])


# ------------------------------------------------------------------ the lock itself
def test_a_second_lock_on_a_run_fails_naming_its_holder_and_is_free_after(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert _holder_pid(run) == os.getpid()
        # flock is per open file: a second open, even in this process, is a second writer.
        with pytest.raises(MemvaeError, match=rf"run directory {re.escape(str(run))} is in use by process {os.getpid()} \("):
            with run_lock(run):
                pass
    assert (run / LOCK_FILE).read_text() == "", "a released lock still names a holder"
    with run_lock(run, create=False):
        pass
    with pytest.raises(MemvaeError, match="does not exist"):
        with run_lock(tmp_path / "nowhere", create=False):
            pass
    assert not (tmp_path / "nowhere").exists()


def test_the_lock_file_alone_is_no_run_and_overwrite_keeps_it(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        inode = (run / LOCK_FILE).stat().st_ino
        prepare_run_dir(run, resume=False, overwrite=False)  # only the lock file: an empty directory
        (run / "checkpoints").mkdir()
        (run / "metrics.jsonl").write_text("{}\n")
        with pytest.raises(MemvaeError, match="already exists"):
            prepare_run_dir(run, resume=False, overwrite=False)
        prepare_run_dir(run, resume=False, overwrite=True)
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]
        assert (run / LOCK_FILE).stat().st_ino == inode, "overwrite replaced the lock file a second writer would open"


# ------------------------------------------------------------------ two processes, one run directory
@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_train_resume_into_a_live_run_fails_at_once_and_the_live_run_ends_identical(tmp_path, uninterrupted):
    run = tmp_path / "run"
    first = trainee.start("checkpoint:6", "train", *TRAIN_ARGS, "--run-dir", run)
    try:
        trainee.wait_until_stopped(first)  # held still after its checkpoint 6: it holds the lock while the test needs it
        assert _holder_pid(run) == first.pid and checkpoint_step(run) == 6
        for second in (["train", "--run-dir", run, "--resume", "--no-progress"],
                       ["train", *TRAIN_ARGS, "--run-dir", run, "--overwrite"],
                       ["eval", run, "--device", "cpu"],
                       ["prior", run, "--steps", "1"],
                       ["sample", run, "--out", run / "samples.png"]):
            result = run_memvae(*second, timeout=120)
            assert result.returncode == 2, (second, result.stdout, result.stderr)
            line = _one_error_line(result.stderr)
            assert f"run directory {run} is in use by process {first.pid} (memvae train --config" in line, line
        # A reader needs no lock.
        assert run_memvae("eval", run, "--device", "cpu", "--no-write", timeout=120).returncode == 0
        assert not (run / "eval.json").exists()
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert f"done: {run} (update {STEPS}" in out and f"checkpoint of update {STEPS})" in out, out
    _assert_identical(run, uninterrupted)


@pytest.mark.slow
def test_train_resume_on_a_run_compare_is_training_fails_at_once(tmp_path):
    out_dir = tmp_path / "cmp"
    run = out_dir / "runs" / "smoke-seed0"
    compare = trainee.start("checkpoint:6", "compare", "--models", SMOKE, "--steps", "60", "--seeds", "1", "--jobs", "1",
                            "--test-images", "50", "--out", out_dir, "--no-progress",
                            "--train.threads", "1", "--train.checkpoint_every", "6", "--train.log_every", "4")
    try:
        trainee.wait_until_stopped(compare)  # compare trains in its own process (one job): stopped after checkpoint 6
        assert checkpoint_step(run) == 6
        result = run_memvae("train", "--run-dir", run, "--resume", "--no-progress", timeout=120)
        assert result.returncode == 2, (result.stdout, result.stderr)
        line = _one_error_line(result.stderr)
        assert f"is in use by process {compare.pid} (memvae compare --models" in line, line
    finally:
        compare.send_signal(signal.SIGCONT)
    _, err = compare.communicate(timeout=300)
    assert compare.returncode == 0, err
    records = MetricsLog(run / "metrics.jsonl").read()
    pairs = [(r["kind"], r["step"]) for r in records]
    assert len(pairs) == len(set(pairs)), "an update was logged twice"
    assert checkpoint_step(run) == 60


def test_a_run_killed_with_sigkill_leaves_no_lock_and_resume_ends_identical(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = trainee.start("checkpoint:30", "train", *TRAIN_ARGS, "--run-dir", run)
    trainee.wait_until_stopped(proc)  # stopped right after its checkpoint of update 30: killed there
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and checkpoint_step(run) == 30
    assert _holder_pid(run) == proc.pid, "the lock file should still name the dead process"
    result = run_memvae("train", "--run-dir", run, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    _assert_identical(run, uninterrupted)


# ------------------------------------------------------------------ checkpoints that cannot be written
SHORT = ["train", "--config", str(SMOKE), "--train.threads", "1", "--train.steps", "20", "--train.log_every", "5",
         "--train.eval_every", "10", "--train.checkpoint_every", "5", "--no-progress"]


def _disk_full_at(monkeypatch, updates) -> None:
    """Saves of the checkpoints of these updates fail half-way with ENOSPC (a real
    torch.save into a file that takes 4,096 bytes, then refuses)."""
    real_open = open

    def full(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        m = re.search(r"step_(\d+)\.pt\.tmp$", str(file))
        return DiskFull(f, 4096) if m and int(m.group(1)) in updates and "w" in mode else f

    monkeypatch.setattr(checkpoint, "open", full, raising=False)


def test_a_final_checkpoint_that_cannot_be_saved_is_an_error_naming_the_newest_on_disk(tmp_path, monkeypatch, capsys, data_dir):
    run = tmp_path / "run"
    _disk_full_at(monkeypatch, {10, 15, 20})
    assert main([*SHORT, "--run-dir", str(run)]) == 2
    out, err = capsys.readouterr()
    assert "warning: could not save checkpoint at update 10" in out and "done:" not in out, out
    line = _one_error_line(err)
    assert line == (f"error: could not save the checkpoint of update 20, the last of this run ([Errno 28] No space left "
                    f"on device); the newest checkpoint on disk is update 5 ({run}/checkpoints/step_00000005.pt); "
                    f"memvae train --run-dir {run} --resume continues from it"), line
    assert load_latest(run / "checkpoints")["step"] == 5


def test_mid_run_save_failures_warn_and_the_done_line_names_the_saved_update(tmp_path, monkeypatch, capsys, data_dir):
    run = tmp_path / "run"
    _disk_full_at(monkeypatch, {10, 15})
    assert main([*SHORT, "--run-dir", str(run)]) == 0
    out, _ = capsys.readouterr()
    for step in (10, 15):
        assert f"warning: could not save checkpoint at update {step} ([Errno 28] No space left on device); the previous one is kept" in out
    assert re.search(rf"^done: {re.escape(str(run))} \(update 20, train NMSE [\d.]+, checkpoint of update 20\)$", out, re.M), out
    assert load_latest(run / "checkpoints")["step"] == 20


def test_sigterm_whose_checkpoint_cannot_be_saved_is_an_error_not_a_saved_stop(tmp_path, monkeypatch, capsys, data_dir):
    run = tmp_path / "run"
    _disk_full_at(monkeypatch, set(range(10, 21)))
    real_update = Trainer.update

    def update_then_sigterm_at_12(self):
        out = real_update(self)
        if self.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would: the loop stops after this update
        return out

    monkeypatch.setattr(Trainer, "update", update_then_sigterm_at_12)
    assert main([*SHORT, "--run-dir", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "could not save the checkpoint of update 12, the last of this run ([Errno 28]" in line, line
    assert "the newest checkpoint on disk is update 5 (" in line, line
    assert "checkpoint saved" not in line


def test_stop_after_with_no_checkpoint_on_disk_says_so(tmp_path, monkeypatch, cifar):
    cfg = C.load_config(SMOKE, ["train.threads=1", "train.steps=20", "train.checkpoint_every=50", "train.eval_every=50"])
    data = ImageData(cifar.train[:500], cifar.test[:100], cifar.train_labels[:500], cifar.test_labels[:100])
    _disk_full_at(monkeypatch, {7})
    with pytest.raises(MemvaeError, match=r"update 7, the last of this run .*; no checkpoint of this run is on disk; "
                                          r"memvae train --run-dir .* --resume starts it again from update 0"):
        train(cfg, tmp_path / "run", show_progress=False, stop_after=7, data=data)


@contextmanager
def _mounted(path: Path, *options: str):
    """``path`` as a fresh tmpfs mount, or skip when this machine does not let the test mount one."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                             capture_output=True, text=True) if ROOT else None
    if mounted is None or mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root in a container or on a machine that allows it)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_a_full_600_kib_file_system_ends_in_an_error_not_done(tmp_path):
    """The issue's case on a real full disk: checkpoint 50 fits, 100, 150 and 200 do not."""
    with _mounted(tmp_path / "small", "size=600k") as small:
        run = small / "run"
        result = run_memvae("train", "--config", SMOKE, "--train.threads", "1", "--train.checkpoint_every", "50",
                            "--no-progress", "--run-dir", run)
        assert result.returncode == 2, (result.stdout, result.stderr)
        for step in (100, 150):
            assert f"warning: could not save checkpoint at update {step} ([Errno 28] No space left on device)" in result.stdout
        assert "done:" not in result.stdout
        line = _one_error_line(result.stderr)
        assert "could not save the checkpoint of update 200, the last of this run ([Errno 28] No space left on device); " \
               "the newest checkpoint on disk is update 50" in line, line
        assert load_latest(run / "checkpoints")["step"] == 50


# ------------------------------------------------------------------ folders that refuse
@contextmanager
def _read_only(path: Path):
    """``path`` (a directory) made read-only: its mode when not root (root ignores modes), a
    read-only bind mount of itself when root; skip when neither can be done."""
    if not ROOT:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bound.returncode:
        pytest.skip("cannot bind-mount here to make a folder read-only for root")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_run_directory_under_a_read_only_folder_is_one_line_and_status_2(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        result = run_memvae("train", "--config", SMOKE, "--run-dir", ro / "run")
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert re.fullmatch(rf"error: could not create run directory {re.escape(str(ro / 'run'))} "
                        r"\((Read-only file system|Permission denied|Operation not permitted)\)", line), line


def test_a_run_directory_whose_parent_is_a_file_is_one_line_and_status_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    result = run_memvae("train", "--config", SMOKE, "--run-dir", tmp_path / "notes.txt" / "run")
    assert result.returncode == 2
    assert _one_error_line(result.stderr) == f"error: could not create run directory {tmp_path / 'notes.txt' / 'run'} (Not a directory)"


def test_eval_of_a_read_only_run_is_one_line_and_no_write_still_reads_it(tmp_path, cifar):
    run = tmp_path / "run"
    cfg = C.load_config(SMOKE, ["train.threads=1", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"])
    train(cfg, run, show_progress=False,
          data=ImageData(cifar.train[:500], cifar.test[:100], cifar.train_labels[:500], cifar.test_labels[:100]))
    with _read_only(run):
        refused = run_memvae("eval", run, "--device", "cpu", timeout=120)
        reader = run_memvae("eval", run, "--device", "cpu", "--no-write", timeout=120)
    assert refused.returncode == 2
    line = _one_error_line(refused.stderr)
    assert line.startswith(f"error: could not write into run directory {run} ("), line
    assert reader.returncode == 0, reader.stderr
    assert "| smoke test |" in reader.stdout


def test_an_unreadable_data_file_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, data_dir):
    real_open = open

    def refused(file, mode="r", *args, **kwargs):
        if str(file).endswith("data_batch_3"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(data_module, "open", refused, raising=False)
    assert main(["train", "--config", str(SMOKE), "--run-dir", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"error: {data_dir / 'cifar-10-batches-py' / 'data_batch_3'}: Permission denied", line


def test_a_failed_write_of_the_run_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, data_dir):
    """A full disk while config.toml is written (any OSError on the run, not only checkpoints)."""
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "config.toml":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert main([*SHORT, "--run-dir", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"error: {tmp_path / 'run' / 'config.toml'}: No space left on device", line


def test_a_directory_left_holding_only_the_lock_is_removed_and_a_waiter_on_its_file_starts_again(tmp_path):
    """train asks for it (remove_if_unused) when it created the run directory; a second
    writer that opened the removed file before it went does not hold a lock on it, but locks
    the file the folder names now."""
    from memvae.training import runlock

    run = tmp_path / "runs" / "new"
    with run_lock(run, remove_if_unused=True):
        stale = os.open(run / LOCK_FILE, os.O_RDWR)  # a second writer that opened the file, not yet locked
    assert not run.exists() and (tmp_path / "runs").is_dir()
    assert not runlock._still_named(stale, run)
    os.close(stale)
    with run_lock(run, remove_if_unused=True):
        (run / "config.toml").write_text("")  # something written: the folder is a run now, and stays
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "config.toml"]


# ------------------------------------------------------------------ the retry when the locked file was removed
def _stale_first(monkeypatch, run: Path, then=None) -> list[int]:
    """Make run_lock's first open of the lock file return a descriptor of a file that its
    holder removed (and, with ``then``, replaced) between that open and the flock: the race
    the re-check exists for, played out in one process. Returns the descriptors opened."""
    from memvae.training import runlock

    real_open, opened = runlock._open_lock_file, []

    def open_lock_file(run_dir, create):
        fd = real_open(run_dir, create)
        opened.append(fd)
        if len(opened) == 1:
            (run / LOCK_FILE).unlink()  # the holder left: the folder no longer names this file
            if then is not None:
                then()
        return fd

    monkeypatch.setattr(runlock, "_open_lock_file", open_lock_file)
    return opened


def _open_on_a_removed_lock_file(run: Path) -> int:
    """How many of this process's descriptors are on a removed RUN/.lock (Linux's /proc
    names them "PATH (deleted)"; a closed descriptor's number may be reused, so it is the
    file that is looked for, not the number)."""
    found = 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            found += os.readlink(entry) == f"{run / LOCK_FILE} (deleted)"
        except OSError:
            pass
    return found


def test_a_stale_descriptor_is_dropped_and_the_lock_taken_on_the_named_file_then_a_second_writer_is_refused(
        tmp_path, monkeypatch):
    """run_lock's first open gets a file removed before its flock: it must let it go and
    lock the file the folder names, so that a second writer, which opens that name, is refused.
    Without the re-check both would write into one run."""
    run = tmp_path / "run"
    run.mkdir()
    opened = _stale_first(monkeypatch, run)
    with run_lock(run):
        assert len(opened) == 2, "the stale descriptor was kept: no second open"
        assert _open_on_a_removed_lock_file(run) == 0, "the stale descriptor was not closed"
        named, locked = os.stat(run / LOCK_FILE), os.fstat(opened[1])
        assert (named.st_dev, named.st_ino) == (locked.st_dev, locked.st_ino)
        assert _holder_pid(run) == os.getpid()
        monkeypatch.undo()  # the second writer opens the file the plain way
        with pytest.raises(MemvaeError, match=rf"is in use by process {os.getpid()} \("):
            with run_lock(run):
                pass


def test_a_stale_descriptor_whose_name_another_writer_holds_is_refused(tmp_path, monkeypatch):
    """The holder removed the file and a third process made and locked a new one before our
    flock on the old one succeeded: the re-check sends us to the new file, which is held, so
    we are refused, naming that holder (without the re-check we would write beside it)."""
    run = tmp_path / "run"
    run.mkdir()
    held: list[int] = []

    def another_writer_takes_the_name():
        fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242 memvae train --run-dir elsewhere\n", 0)
        held.append(fd)

    opened = _stale_first(monkeypatch, run, then=another_writer_takes_the_name)
    try:
        with pytest.raises(MemvaeError, match=r"is in use by process 4242 \(memvae train --run-dir elsewhere\)"):
            with run_lock(run):
                pass
        assert len(opened) == 2 and _open_on_a_removed_lock_file(run) == 0
        assert (run / LOCK_FILE).read_text() == "4242 memvae train --run-dir elsewhere\n"  # not overwritten
    finally:
        for fd in held:
            os.close(fd)
