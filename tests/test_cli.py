"""The command line as a user runs it: train, eval, reconstruct, plot."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import CONFIGS, REPO


def memvae(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "memvae", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
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


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_resume_from_the_run_directory_alone(tmp_path, data_dir):
    run = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--threads", "1", "--no-progress"]
    memvae("train", "--config", str(CONFIGS / "smoke.toml"), "--run-dir", str(run), "--steps", "20", *common)
    # Extend the finished run: the config comes from the run directory.
    out = memvae("train", "--run-dir", str(run), "--resume", "--steps", "30", *common)
    assert "update 30" in out.stdout


def test_configs_lists_each_packaged_config_on_one_line_and_prints_one_by_name():
    files = sorted(CONFIGS.glob("*.toml"))
    lines = memvae("configs").stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f.stem for f in files]
    for line, path in zip(lines, files):
        description = line.split(maxsplit=1)[1]
        opening = " ".join(l.lstrip("#").strip() for l in path.read_text().splitlines() if l.startswith("#"))
        assert len(description) > 10 and opening.startswith(description), path.name
    shown = memvae("configs", "vq_ema").stdout  # the file's opening comment, then every key resolved
    assert shown.startswith((CONFIGS / "vq_ema.toml").read_text().split("\nname")[0])
    assert 'kind = "vq_ema"' in shown and "reseed_fraction = " in shown  # every key of its kind, defaults included
    assert "tau_anneal_updates" not in shown  # and no other kind's


def test_train_by_config_name_from_another_folder(tmp_path, data_dir):
    result = subprocess.run(
        [sys.executable, "-m", "memvae", "train", "--config", "smoke", "--run-dir", "run", "--steps", "3",
         "--threads", "1", "--no-progress", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert 'name = "smoke"' in saved and "embedding_dim = 16" in saved


def test_unknown_config_name_fails_with_one_line_listing_the_known_ones(tmp_path):
    known = [f.stem for f in sorted(CONFIGS.glob("*.toml"))]
    for args in (["train", "--config", "vq_emma"], ["configs", "vq_emma"],
                 ["compare", "--models", "vq_emma", "--out", str(tmp_path / "cmp")]):
        result = memvae(*args, check=False)
        assert result.returncode == 2 and result.stdout == "", args
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: unknown config 'vq_emma'") and all(name in line for name in known), line
