"""A run directory: what training writes and what every other command reads.

    config.toml      the resolved config (reusable with --config)
    meta.json        versions, git commit, device, command line
    metrics.jsonl    one JSON record per log/eval step
    checkpoints/     see memvae.training.checkpoint
    tensorboard/     TensorBoard event files
    eval.json        written by `memvae eval`
    .lock            held by the process writing the run (see memvae.training.runlock)
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from memvae.config import schema as C
from memvae.config.upgrade import upgrade_checkpoint
from memvae.errors import MemvaeError, os_error
from memvae.networks.autoencoder import Autoencoder
from memvae.training.checkpoint import latest_checkpoint, load_checkpoint
from memvae.training.runlock import LOCK_FILE


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create ``run_dir``; an existing non-empty one is refused unless resuming or overwriting.

    The lock file (:mod:`memvae.training.runlock`) is not part of a run: it alone does not make the
    directory non-empty, and overwriting keeps it (the caller holds it while it overwrites).
    """
    contents = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
    if contents and not resume:
        if not overwrite:
            raise MemvaeError(f"run directory {run_dir} already exists; pass --resume to continue it or --overwrite to replace it")
        for path in contents:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full place, a parent that is a file
        raise os_error(exc, f"create run directory {run_dir}") from None


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, machine and git commit, saved with every run and benchmark."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),  # the same run gives other last digits on another CPU
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_commit": commit or None,
        "argv": sys.argv,
    }


def config_mismatch(saved: dict, cfg: C.Config) -> str | None:
    """First model/bottleneck key where a checkpoint's config differs from ``cfg``, as text."""
    now = C.to_dict(cfg)
    saved = C.to_dict(C.from_dict(saved, saved=True))  # in today's keys (an older run's config is converted)
    for section in ("model", "bottleneck"):
        for key, value in now[section].items():
            old = saved.get(section, {}).get(key)
            if old != value:
                return f"{section}.{key}: checkpoint has {old!r}, config has {value!r}"
    return None


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Autoencoder, C.Config, dict]:
    """The trained model of a run directory (newest checkpoint), in eval mode.

    Returns (model, config, checkpoint dict in today's format: see memvae.config.upgrade).
    """
    run_dir = Path(run_dir)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise MemvaeError(f"{run_dir} holds no checkpoint (is it a memvae run directory?)")
    state = load_checkpoint(*found, map_location=device)
    cfg = C.validate(C.from_dict(state["config"], saved=True))
    model = Autoencoder.from_config(cfg).to(device)
    state = upgrade_checkpoint(state, model, f"checkpoint {found[0]}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise MemvaeError(f"checkpoint {found[0]} does not fit its own config: {str(exc).splitlines()[0]}") from None
    return model.eval(), cfg, state
