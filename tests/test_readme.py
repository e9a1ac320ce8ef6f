"""The README's examples, read from README.md so that the two cannot drift apart."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_util import cli_env
from tests.conftest import REPO, _data_dir

README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_examples_run(index):
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {})


def _example_block() -> str:
    return next(b for b in _blocks("bash") if b.startswith("export MEMVAE_DATA_DIR=../shared/data"))


@pytest.mark.slow
def test_command_examples_run_in_order_and_write_only_under_runs(tmp_path):
    """Verbatim but shorter: every --steps becomes 20, --test-images 200, and the prior encodes 1,000 training
    and 200 test images instead of all (minutes on a CPU)."""
    script = _example_block().replace("../shared/data", str(_data_dir()))
    script = re.sub(r"--steps \d+", "--steps 20", script)
    script = re.sub(r"--test-images \d+", "--test-images 200", script)
    script = re.sub(r"^(memvae prior .*)$", r"\1 --train-images 1000 --test-images 200", script, flags=re.M)
    work = tmp_path / "fresh"
    work.mkdir()
    # The README's commands as a user runs them: `memvae` on the PATH of the environment under test.
    env = cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(["bash", "-e", "-c", script], cwd=work, capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [p.name for p in work.iterdir()] == ["runs"]
    for name in ("grid.png", "curves.png", "samples.png", "quick/results.md", "rate/rate_distortion.png", "vq/prior/eval.json"):
        assert (work / "runs" / name).exists(), name
