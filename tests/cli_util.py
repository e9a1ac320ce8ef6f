"""Running ``python -m memvae`` in a subprocess, the way a user does, and reading what it left."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CONFIGS, REPO, _data_dir

SMOKE = CONFIGS / "smoke.toml"
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: a download attempt fails at once


def cli_env(**extra: str) -> dict:
    """The environment for a ``memvae`` subprocess: the shared CIFAR-10 copy, one thread,
    and no way to reach the network (a CIFAR-10 download must fail, not start)."""
    env = dict(os.environ)
    for key in ("no_proxy", "NO_PROXY"):
        env.pop(key, None)
    env.update(
        MEMVAE_DATA_DIR=str(_data_dir()),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        http_proxy=DEAD_PROXY,
        https_proxy=DEAD_PROXY,
        HTTP_PROXY=DEAD_PROXY,
        HTTPS_PROXY=DEAD_PROXY,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def memvae_command(*args) -> list[str]:
    return [sys.executable, "-m", "memvae", *map(str, args)]


def run_memvae(*args, cwd: Path = REPO, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``memvae ARGS`` to the end; stdout and stderr as text."""
    return subprocess.run(
        memvae_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env or cli_env()
    )


def start_memvae(*args, cwd: Path = REPO) -> subprocess.Popen:
    """Start ``memvae ARGS`` in the background (stdout/stderr piped; the commands used with
    this print a few lines at most, so the pipes never fill)."""
    return subprocess.Popen(
        memvae_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=cli_env()
    )


def strip_times(records: list[dict]) -> list[dict]:
    """Records without the wall-clock field, the one thing a resumed run may change."""
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in records]


def checkpoint_step(run_dir: Path) -> int | None:
    """The update of the checkpoint ``latest.json`` names, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    try:
        return int(json.loads(pointer.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def smoke_config(*overrides: str):
    """The smoke config at one thread, with ``overrides`` ("section.key=value")."""
    from memvae.config import schema as C

    return C.load_config(SMOKE, ["train.threads=1", *overrides])


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints' step and model tensors equal to the bit."""
    import torch

    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
