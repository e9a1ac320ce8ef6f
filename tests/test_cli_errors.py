"""Bad input through the real command line: one line on stderr starting with "error:",
exit status 2, no traceback (unless --debug). Each case runs ``python -m memvae`` in a
subprocess, as a user would."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memvae.config import schema as C
from memvae.data import ImageData
from memvae.training.train import train
from tests.cli_util import SMOKE, run_memvae


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cifar) -> Path:
    """A real (2-update) smoke run with a checkpoint, made in-process on a CIFAR-10 subset."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = C.load_config(SMOKE, ["train.threads=1", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"])
    data = ImageData(cifar.train[:500], cifar.test[:100], cifar.train_labels[:500], cifar.test_labels[:100])
    train(cfg, run, show_progress=False, data=data)
    return run


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def _checkpoint_file(run: Path) -> Path:
    files = sorted((run / "checkpoints").glob("step_*.pt"))
    assert files
    return files[-1]


def _cifar_copy(tmp_path: Path, data_dir: Path) -> Path:
    """A data directory whose cifar-10-batches-py links to the real files (to spoil one)."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (data_dir / "cifar-10-batches-py").iterdir():
        os.symlink(f, folder / f.name)
    return folder


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


TRAIN = ["train", "--config", SMOKE, "--train.threads", "1", "--no-progress"]


# Each case: (setup(tmp_path, ctx) -> arguments, words the message must contain).
# ctx gives the fixtures: ctx.data_dir, ctx.trained_run.
def _missing_cifar_dir(t, ctx):
    return [*TRAIN, "--data-dir", t / "nowhere", "--run-dir", t / "run"], ["data folder", str(t / "nowhere"), "does not exist", "--download"]


def _missing_image_folder(t, ctx):
    return [*TRAIN, "--data.source", "folder", "--data-dir", t / "nowhere", "--run-dir", t / "run"], ["data folder", str(t / "nowhere"), "does not exist"]


def _truncated_cifar_file(t, ctx):
    folder = _cifar_copy(t, ctx.data_dir)
    original = (ctx.data_dir / "cifar-10-batches-py" / "data_batch_2").read_bytes()
    _replace(folder / "data_batch_2", original[: len(original) // 3])
    return ([*TRAIN, "--data-dir", t / "data", "--run-dir", t / "run"],
            ["data_batch_2", "truncated or corrupt", f"delete the folder {folder} to download a fresh copy"])


def _corrupt_cifar_file(t, ctx):
    folder = _cifar_copy(t, ctx.data_dir)
    _replace(folder / "test_batch", np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return [*TRAIN, "--data-dir", t / "data", "--run-dir", t / "run"], ["test_batch", "truncated or corrupt"]


def _missing_cifar_file(t, ctx):
    folder = _cifar_copy(t, ctx.data_dir)
    (folder / "data_batch_4").unlink()
    return [*TRAIN, "--data-dir", t / "data", "--run-dir", t / "run"], ["data_batch_4", "is missing"]


def _empty_image_folder(t, ctx):
    (t / "images").mkdir()
    (t / "images" / "notes.txt").write_text("not an image")
    return [*TRAIN, "--data.source", "folder", "--data-dir", t / "images", "--run-dir", t / "run"], ["too few PNG/JPEG images"]


def _unreadable_images(t, ctx):
    folder = _images(t / "images", 6)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (folder / "text.jpg").write_text("this is text")
    return [*TRAIN, "--data.source", "folder", "--data-dir", folder, "--run-dir", t / "run"], ["cannot read image", "images/broken.png"]


def _unknown_key(t, ctx):
    return [*TRAIN, "--train.stpes", "3", "--run-dir", t / "run"], ["unknown config key 'train.stpes'", "did you mean 'train.steps'"]


def _unknown_key_in_file(t, ctx):
    (t / "bad.toml").write_text(SMOKE.read_text().replace("slots = 64", "slot = 64"))
    return ["train", "--config", t / "bad.toml", "--run-dir", t / "run"], ["bottleneck.slot", "did you mean 'bottleneck.slots'"]


def _wrong_type(t, ctx):
    return [*TRAIN, "--train.batch_size", "thirty-two", "--run-dir", t / "run"], ["train.batch_size", "expects int", "thirty-two"]


def _wrong_type_in_file(t, ctx):
    (t / "bad.toml").write_text(SMOKE.read_text().replace("lr = 1e-3", 'lr = "fast"'))
    return ["train", "--config", t / "bad.toml", "--run-dir", t / "run"], ["train.lr", "expects float", "str"]


def _negative_lr(t, ctx):
    return [*TRAIN, "--train.lr", "-0.001", "--run-dir", t / "run"], ["train.lr", "must be > 0", "-0.001"]


def _zero_slots(t, ctx):
    return [*TRAIN, "--bottleneck.slots", "0", "--run-dir", t / "run"], ["bottleneck.slots", "must be > 0"]


def _unknown_choice(t, ctx):
    return [*TRAIN, "--bottleneck.kind", "nearest", "--run-dir", t / "run"], ["bottleneck.kind", "must be one of", "vq_ema"]


def _batch_larger_than_data(t, ctx):
    folder = _images(t / "images", 5)
    return ([*TRAIN, "--data.source", "folder", "--data-dir", folder, "--train.batch_size", "32", "--run-dir", t / "run"],
            ["batch size 32", "larger than the 4 training images"])


def _missing_config_file(t, ctx):
    return ["train", "--config", t / "none.toml", "--run-dir", t / "run"], ["config file", "none.toml", "does not exist"]


def _run_dir_exists(t, ctx):
    run = _copy_run(ctx.trained_run, t)
    return [*TRAIN, "--run-dir", run], ["run directory", "already exists", "--resume", "--overwrite"]


def _changed_bottleneck_on_resume(t, ctx):
    run = _copy_run(ctx.trained_run, t)
    return (["train", "--run-dir", run, "--resume", "--bottleneck.slots", "32", "--no-progress"],
            ["different model configuration", "bottleneck.slots", "checkpoint has 64, config has 32"])


def _flip_bytes(run: Path) -> Path:
    path = _checkpoint_file(run)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    return path


def _corrupt_checkpoint_on_resume(t, ctx):
    run = _copy_run(ctx.trained_run, t)
    path = _flip_bytes(run)
    return ["train", "--run-dir", run, "--resume", "--no-progress"], [str(path), "is corrupt", "SHA-256"]


def _corrupt_checkpoint_on_eval(t, ctx):
    run = _copy_run(ctx.trained_run, t)
    path = _flip_bytes(run)
    return ["eval", run, "--device", "cpu"], [str(path), "is corrupt", "SHA-256"]


def _truncated_checkpoint_on_eval(t, ctx):
    run = _copy_run(ctx.trained_run, t)
    path = _checkpoint_file(run)
    path.write_bytes(path.read_bytes()[:1000])
    return ["eval", run, "--device", "cpu"], [str(path), "is corrupt"]


def _eval_of_a_non_run(t, ctx):
    (t / "empty").mkdir()
    return ["eval", t / "empty", "--device", "cpu"], ["holds no checkpoint"]


def _plot_of_a_missing_run(t, ctx):
    return ["plot", t / "nowhere", "--out", t / "c.png"], [f"run directory {t / 'nowhere'} does not exist"]


def _resume_of_a_missing_run(t, ctx):
    return ([*TRAIN, "--resume", "--run-dir", t / "nowhere"],
            [f"run directory {t / 'nowhere'} does not exist; nothing to resume"])


def _resume_of_a_folder_that_holds_no_run(t, ctx):
    (t / "runs").mkdir()  # e.g. a compare's output folder instead of one of its runs
    return ([*TRAIN, "--resume", "--run-dir", t / "runs"],
            [f"run directory {t / 'runs'} holds no run to resume (no checkpoint, no config.toml)"])


def _steps_not_a_number(t, ctx):
    return ["train", "--config", SMOKE, "--steps", "ten"], ["argument --steps: invalid int value: 'ten'",
                                                            "(memvae train --help lists the options)"]


CASES = {
    "missing CIFAR-10 data directory": _missing_cifar_dir,
    "missing image folder": _missing_image_folder,
    "truncated CIFAR-10 file": _truncated_cifar_file,
    "corrupt CIFAR-10 file (random bytes)": _corrupt_cifar_file,
    "missing CIFAR-10 file": _missing_cifar_file,
    "image folder with no images": _empty_image_folder,
    "image folder with unreadable files": _unreadable_images,
    "unknown config key (command line)": _unknown_key,
    "unknown config key (config file)": _unknown_key_in_file,
    "wrong type (command line)": _wrong_type,
    "wrong type (config file)": _wrong_type_in_file,
    "negative learning rate": _negative_lr,
    "zero slots": _zero_slots,
    "unknown bottleneck kind": _unknown_choice,
    "batch larger than the data (5 images, batch 32)": _batch_larger_than_data,
    "missing config file": _missing_config_file,
    "run directory exists": _run_dir_exists,
    "resume with a changed bottleneck": _changed_bottleneck_on_resume,
    "corrupted checkpoint (SHA mismatch) on resume": _corrupt_checkpoint_on_resume,
    "corrupted checkpoint (SHA mismatch) on eval": _corrupt_checkpoint_on_eval,
    "truncated checkpoint on eval": _truncated_checkpoint_on_eval,
    "eval of a directory that is no run": _eval_of_a_non_run,
    "plot of a run directory that does not exist": _plot_of_a_missing_run,
    "resume of a run directory that does not exist": _resume_of_a_missing_run,
    "resume of a folder that holds no run": _resume_of_a_folder_that_holds_no_run,
    "--steps that is not a number": _steps_not_a_number,
}


class _Ctx:
    def __init__(self, data_dir, trained_run):
        self.data_dir, self.trained_run = data_dir, trained_run


@pytest.fixture
def ctx(request, data_dir):
    # Only the cases that need a trained run pay for it.
    needs_run = request.node.callspec.params.get("case", "") in {
        "run directory exists", "resume with a changed bottleneck", "corrupted checkpoint (SHA mismatch) on resume",
        "corrupted checkpoint (SHA mismatch) on eval", "truncated checkpoint on eval",
    }
    return _Ctx(data_dir, request.getfixturevalue("trained_run") if needs_run else None)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, ctx, case):
    args, words = CASES[case](tmp_path, ctx)
    result = run_memvae(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_debug_shows_the_traceback(tmp_path):
    result = run_memvae(*TRAIN, "--train.stpes", "3", "--run-dir", tmp_path / "run", "--debug", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "MemvaeError: unknown config key 'train.stpes'; did you mean 'train.steps'?" in result.stderr


def test_the_same_small_folder_trains_with_a_batch_that_fits(tmp_path):
    """Control for the batch-size case: the 5-image folder itself is fine."""
    folder = _images(tmp_path / "images", 5)
    result = run_memvae(*TRAIN, "--data.source", "folder", "--data-dir", folder, "--train.batch_size", "4",
                        "--train.steps", "2", "--train.eval_every", "2", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "done:" in result.stdout
