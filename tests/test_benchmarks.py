"""The benchmark scripts still run against this memvae.

They import memvae's modules and read its packaged configs by name, so a change of layout
breaks them without breaking any other test (issue 33's restructure did: every peer row was
"no packaged config"). Each runs here on a tiny workload; what it measures is not checked.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_every_peer_row_finds_its_packaged_config():
    peer = load_script("peer")
    rows, contestants = peer.plan_rows(peer.ROWS, 512, 2048)
    assert [row["row"] for row in rows if "skipped" in row] == []
    assert {row["row"] for row in rows} == set(peer.ROWS)
    assert any(c["side"] == "memvae" for c in contestants)


def test_gpu_check_has_a_row_per_packaged_config():
    from memvae.config import presets

    rows = load_script("gpu_check").rows()
    assert {config for _, config, _ in rows} == set(presets.names()) - {"smoke"}


TINY_RUNS = {
    "gpu_check": ["--device", "cpu", "--batch", "2", "--updates", "2", "--reps", "1", "--warmup", "1"],
    "top_k_read": ["--steps", "2", "--images", "8", "--k", "2"],
    "train_step": ["--batch-sizes", "2", "--repeats", "1", "--warmup", "0"],
    "memory_read": ["--n", "64", "--k", "16", "--repeats", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY_RUNS))
def test_benchmark_script_runs(script, tmp_path, data_dir):
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "MEMVAE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *TINY_RUNS[script], "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())
