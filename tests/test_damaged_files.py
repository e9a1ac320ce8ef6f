"""Checkpoints and data crafted or damaged on purpose: refused with a one-line error naming the file;
code in a crafted pickle never runs."""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from memvae.training import checkpoint
from memvae.config import schema as C
from memvae.training.checkpoint import load_checkpoint, load_latest
from memvae.errors import MemvaeError
from memvae.training.train import train
from tests.cli_util import SMOKE, run_memvae, smoke_config as smoke


class RunsCode:
    """Unpickling this runs ``touch MARKER`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_run(tmp_path: Path, marker: Path) -> Path:
    """A run directory whose checkpoint (with a correct latest.json) runs code when unpickled."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path = run / "checkpoints" / "step_00000010.pt"
    torch.save({"model": RunsCode(marker), "step": 10, "config": C.to_dict(smoke())}, path)
    pointer = {"file": path.name, "step": 10, "size": path.stat().st_size, "sha256": checkpoint._sha256(path)}
    (run / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    (run / "config.toml").write_text(C.to_toml(smoke()))
    return run


def test_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = _crafted_run(tmp_path, marker)
    path = run / "checkpoints" / "step_00000010.pt"
    for load in (lambda: load_checkpoint(path), lambda: load_latest(run / "checkpoints")):
        with pytest.raises(MemvaeError) as info:
            load()
        message = str(info.value)
        assert f"refusing to load checkpoint {path}" in message and "posix.system" in message
        assert "\n" not in message and "weights_only` set to `False`" not in message
        assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_crafted_checkpoint_is_refused_by_the_command_line(tmp_path, command):
    marker = tmp_path / "pwned"
    run = _crafted_run(tmp_path, marker)
    args = ["eval", run, "--device", "cpu"] if command == "eval" else ["train", "--run-dir", run, "--resume", "--no-progress"]
    result = run_memvae(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: refusing to load checkpoint") and result.stderr.count("\n") == 1, result.stderr
    assert "posix.system" in result.stderr
    assert not marker.exists()


def test_crafted_cifar_batch_is_refused_by_the_command_line(tmp_path, data_dir):
    """A data_batch_1 that would run code when unpickled, in an otherwise real CIFAR-10 folder."""
    import pickle

    marker = tmp_path / "pwned"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (data_dir / "cifar-10-batches-py").iterdir():
        if f.name != "data_batch_1":
            os.symlink(f, folder / f.name)
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": RunsCode(marker), "labels": []}))
    result = run_memvae("train", "--config", SMOKE, "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "run",
                        "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: refusing to load {folder / 'data_batch_1'}") and result.stderr.count("\n") == 1
    assert "system" in result.stderr and not marker.exists()
    pickle.loads((folder / "data_batch_1").read_bytes())  # the payload is real: plain pickle runs it
    assert marker.exists()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, small_cifar):
    run = tmp_path_factory.mktemp("real") / "run"
    train(smoke("train.steps=6", "train.checkpoint_every=3", "train.eval_every=6"), run, show_progress=False, data=small_cifar)
    return run


@pytest.mark.parametrize("where", [0.05, 0.5, 0.95], ids=["start", "middle", "end"])
def test_flipped_bytes_are_reported_as_corrupt_naming_the_file(tmp_path, real_run, where):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    path, pointer = checkpoint.latest_checkpoint(run / "checkpoints")
    data = bytearray(path.read_bytes())
    pos = int(len(data) * where)
    data[pos : pos + 8] = bytes(b ^ 0xFF for b in data[pos : pos + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(MemvaeError, match=rf"checkpoint {re.escape(str(path))} is corrupt"):
        load_latest(run / "checkpoints")


def test_damaged_checkpoint_without_a_pointer_never_raises_anything_but_memvae_error(tmp_path, real_run):
    """load_checkpoint on its own (no size/hash to check) must still turn whatever
    torch.load trips over into MemvaeError naming the file."""
    path, _ = checkpoint.latest_checkpoint(real_run / "checkpoints")
    original = path.read_bytes()
    rng = random.Random(0)
    damaged = tmp_path / "damaged.pt"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):
        data = bytearray(original)
        if i % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(len(data), 2000))] = rng.randrange(256)  # the pickle is near the start
        damaged.write_bytes(bytes(data))
        try:
            load_checkpoint(damaged)
            outcomes["loaded"] += 1
        except MemvaeError as exc:
            assert str(damaged) in str(exc) and "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50, outcomes


def test_corrupt_pointer_is_a_clear_error(tmp_path, real_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    for text in ('{"file": "step_0000', "[]", '{"step": 3}', '"just a string"'):
        (run / "checkpoints" / "latest.json").write_text(text)
        with pytest.raises(MemvaeError, match="checkpoint pointer .*latest.json is corrupt"):
            load_latest(run / "checkpoints")
