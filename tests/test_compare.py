"""`memvae compare`: the study's experiment as one command."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from memvae.compare import compare, updates_to_reach
from tests.conftest import REPO

# Small networks so that a compare with every study model runs in seconds; the configs'
# bottlenecks (kinds, slots, β, write) stay as they are.
SMALL = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "train.log_every=10",
         "train.eval_every=20", "train.threads=1", "data.eval_images=200"]


def test_updates_to_reach_uses_the_first_logged_update_at_or_below_each_level():
    log = [{"step": s, "train_nmse": v} for s, v in [(100, 0.5), (200, 0.19), (300, 0.21), (400, 0.1), (500, 0.07)]]
    assert updates_to_reach(log, (0.2, 0.1, 0.08, 0.06)) == {"0.2": 200, "0.1": 400, "0.08": 500, "0.06": None}
    assert updates_to_reach(list(reversed(log)), (0.2,)) == {"0.2": 200}


def test_tiny_compare_writes_every_file_with_finite_numbers(tmp_path, data_dir):
    models = ["vq", "vq_ema", "memory_l2", "memory_cosine", "memory_l2_write"]
    results = compare(tmp_path, models, steps=40, seeds=2, data_dir=str(data_dir), config_dir=REPO / "src" / "memvae" / "configs",
                      lossless=str(data_dir / "cifar10-lossless-subset.npz"), overrides=SMALL, show_progress=False,
                      test_images=1000)
    for name in ("convergence.png", "reconstructions.png", "results.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 1000, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved["models"]) == models
    for name, model in saved["models"].items():
        assert len(model["seeds"]) == 2
        reads = ["soft", "hard"] if name.startswith("memory") else ["nearest"]
        for read in reads:
            for key in ("nmse", "psnr", "perplexity", "slots_used"):
                stat = model["summary"]["test"][read][key]
                assert len(stat["values"]) == 2 and all(math.isfinite(v) for v in stat["values"]), (name, read, key)
                assert model["summary"]["test"][read]["images"]["mean"] == 1000
            assert math.isfinite(model["summary"]["lossless"][read]["nmse"]["mean"])
        assert model["summary"]["seconds_per_update"]["mean"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| memory_l2 |") == 2 and "± " in table


def test_killed_compare_resumes_without_retraining_finished_runs(tmp_path, data_dir):
    args = [sys.executable, "-m", "memvae", "compare", "--out", str(tmp_path), "--models", "vq,memory_l2",
            "--steps", "300", "--data-dir", str(data_dir), "--no-progress", "--test-images", "500"]
    args += [f"--{o}" for o in SMALL]
    args += ["--checkpoint_every", "20"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = tmp_path / "runs" / "memory_l2-seed0" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert second.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first_ckpt = tmp_path / "runs" / "vq-seed0" / "checkpoints" / "latest.json"
    stamp = first_ckpt.stat().st_mtime_ns
    assert not (tmp_path / "results.json").exists()

    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert first_ckpt.stat().st_mtime_ns == stamp, "the finished run was trained again"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["models"]) == {"vq", "memory_l2"}
    log = [json.loads(line) for line in (tmp_path / "runs" / "memory_l2-seed0" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 300


def test_compare_refuses_a_run_made_with_another_config(tmp_path, data_dir):
    from memvae.errors import MemvaeError

    common = dict(steps=10, data_dir=str(data_dir), config_dir=REPO / "src" / "memvae" / "configs", show_progress=False, test_images=200)
    compare(tmp_path, ["vq"], overrides=SMALL, **common)
    with pytest.raises(MemvaeError, match="different config"):
        compare(tmp_path, ["vq"], overrides=[*SMALL, "train.lr=0.01"], **common)
