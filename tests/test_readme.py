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
REFERENCE = (REPO / "docs" / "reference.md").read_text()  # the README's reference material, moved


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


PYTHON = [(f"README.md python block {i}", b) for i, b in enumerate(_blocks("python"))] + \
         [(f"docs/reference.md python block {i}", b) for i, b in enumerate(_blocks("python", REFERENCE))]


@pytest.mark.parametrize("where", [where for where, _ in PYTHON])
def test_python_examples_run(where):
    exec(compile(dict(PYTHON)[where], where, "exec"), {})


def _setup_lines() -> list[str]:
    """The README's first block: the line that installs and runs the main job, the line that
    installs and runs the tests."""
    return _blocks("bash")[0].strip().splitlines()


def test_the_readme_opens_with_the_two_commands_and_holds_no_other_bash_block_untested():
    main_job, tests = _setup_lines()
    assert README.startswith("# memvae\n\n```bash\n")
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
    assert main_job.split(" && ")[-1].startswith("memvae compare ")
    assert tests.split(" && ")[-2:] == ["MEMVAE_DATA_DIR=../shared/data python -m pytest -q -rs --run-slow", "lint-imports"]
    assert len(_blocks("bash")) == 1  # the README's one block: the two commands
    assert _blocks("bash", REFERENCE) == [_example_block()]  # the commands in order: run below


def test_lint_imports_of_the_test_line_passes():
    """The test line's last command: the import layers (pyproject.toml [tool.importlinter])."""
    linter = Path(sys.executable).parent / "lint-imports"
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([str(linter)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_the_main_job_runs_with_fewer_updates(tmp_path):
    """The first line's memvae command verbatim, with 20 updates per run and 200 test images
    (in full: five runs of 25,000 updates, hours on a CPU; README, "How long they take")."""
    command = _setup_lines()[0].split(" && ")[-1].replace("../shared/data", str(_data_dir()))
    env = cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(["bash", "-e", "-c", f"{command} --steps 20 --test-images 200 --no-progress"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=1500, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "wrote runs/compare/convergence.png, reconstructions.png, results.md, results.json" in out.stdout
    for name in ("convergence.png", "reconstructions.png", "results.md", "results.json"):
        assert (tmp_path / "runs" / "compare" / name).exists(), name


def _example_block() -> str:
    return next(b for b in _blocks("bash", REFERENCE) if b.startswith("export MEMVAE_DATA_DIR=../shared/data"))


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
