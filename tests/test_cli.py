"""The command line as a user runs it: train, eval, reconstruct, plot."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from PIL import Image

from tests.conftest import CONFIGS, REPO


def memvae(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "memvae", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_train_eval_reconstruct_plot(tmp_path, data_dir):
    runs = []
    for name, extra in (("vq", []), ("mem", ["--kind", "memory"])):
        run = tmp_path / name
        memvae("train", "--config", str(CONFIGS / "smoke.toml"), "--run-dir", str(run), "--data-dir", str(data_dir),
               "--steps", "40", "--log_every", "10", "--eval_every", "20", "--threads", "1", "--no-progress",
               "--name", name, *extra)
        runs.append(str(run))
    lossless = data_dir / "cifar10-lossless-subset.npz"
    out = memvae("eval", *runs, "--data-dir", str(data_dir), "--lossless", str(lossless), "--device", "cpu")
    assert "| vq test | nearest |" in out.stdout and "| mem test | hard |" in out.stdout
    report = json.loads((tmp_path / "mem" / "eval.json").read_text())
    assert report["step"] == 40
    assert set(report["test"]) == {"soft", "hard", "hard_gap"}
    for read in ("soft", "hard"):
        metrics = report["test"][read]
        assert metrics["images"] == 10000 and report["lossless"][read]["images"] == 1000
        assert all(math.isfinite(v) for v in metrics.values())
        assert 1 <= metrics["slots_used"] <= 64
    assert math.isclose(report["test"]["hard_gap"], report["test"]["hard"]["nmse"] - report["test"]["soft"]["nmse"])

    memvae("reconstruct", *runs, "--out", str(tmp_path / "grid.png"), "--n", "6", "--data-dir", str(data_dir))
    memvae("plot", *runs, "--out", str(tmp_path / "curves.png"))
    grid, curves = Image.open(tmp_path / "grid.png"), Image.open(tmp_path / "curves.png")
    assert grid.width > 300 and grid.height > 200 and curves.width > 500


def test_resume_from_the_run_directory_alone(tmp_path, data_dir):
    run = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--threads", "1", "--no-progress"]
    memvae("train", "--config", str(CONFIGS / "smoke.toml"), "--run-dir", str(run), "--steps", "20", *common)
    # Extend the finished run: the config comes from the run directory.
    out = memvae("train", "--run-dir", str(run), "--resume", "--steps", "30", *common)
    assert "update 30" in out.stdout
