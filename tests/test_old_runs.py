"""A run directory written before the bottleneck options were re-expressed (commit f9b6335:
``tau_anneal`` as a fraction, ``reseed_threshold`` as a count, no ``updates`` buffer) still
evaluates and resumes with today's code, continuing exactly where the old code would."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from memvae.training.metrics import read_metrics
from tests.cli_util import cli_env, run_memvae, strip_times
from tests.conftest import REPO

OLD = "f9b6335"
ARGS = ["--config", "memory_discrete", "--model.hidden", "32", "--model.res_hidden", "8", "--model.res_blocks", "1",
        "--model.embedding_dim", "16", "--bottleneck.slots", "64", "--train.log_every", "10", "--train.eval_every", "50",
        "--train.checkpoint_every", "50", "--data.eval_images", "100", "--train.threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def old_source(tmp_path_factory):
    try:
        archive = subprocess.run(["git", "archive", OLD, "src"], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"needs the git history of the checkout (commit {OLD})")
    root = tmp_path_factory.mktemp("old")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root)
    return root / "src"


def old_memvae(source, *args):
    env = cli_env(PYTHONPATH=str(source))
    return subprocess.run([sys.executable, "-m", "memvae", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=source.parent)


@pytest.mark.slow
def test_an_old_run_evaluates_and_resumes_as_the_old_code_would_continue(old_source, tmp_path):
    # 50 updates: the old config's τ anneals over 0.08 of them (4 updates), then holds; from
    # there on the old code's schedule no longer depends on the run's length either.
    out = old_memvae(old_source, "train", *ARGS, "--steps", 50, "--run-dir", tmp_path / "old")
    assert out.returncode == 0, out.stderr
    assert "reseed_threshold = 1.0" in (tmp_path / "old" / "config.toml").read_text()
    subprocess.run(["cp", "-r", str(tmp_path / "old"), str(tmp_path / "old_by_old")], check=True)
    assert run_memvae("eval", tmp_path / "old", "--no-write").returncode == 0
    out = run_memvae("train", "--run-dir", tmp_path / "old", "--resume", "--steps", "60", "--no-progress")
    assert out.returncode == 0, out.stderr
    out = old_memvae(old_source, "train", "--run-dir", tmp_path / "old_by_old", "--resume", "--steps", "60", "--no-progress")
    assert out.returncode == 0, out.stderr
    today, before = read_metrics(tmp_path / "old"), read_metrics(tmp_path / "old_by_old")
    assert [r["step"] for r in today if r["kind"] == "train"][-1] == 60
    assert strip_times(today) == strip_times(before)
