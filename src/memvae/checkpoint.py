"""Crash-safe checkpoints: plain dicts of tensors and numbers, verified on load.

Layout in a run directory::

    checkpoints/step_00001000.pt   torch.save of a plain dict (weights_only-loadable)
    checkpoints/latest.json        {"file", "step", "size", "sha256"} of the newest good one

A checkpoint is written to a temporary file, flushed to disk and renamed into place;
only then does ``latest.json`` (itself replaced atomically) point at it. A crash or a
full disk at any moment therefore leaves ``latest.json`` naming a complete file, and
the size and SHA-256 recorded there catch a file damaged later.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from memvae.errors import MemvaeError

KEEP = 2  # checkpoint files kept besides the newest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, rename into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | os.PathLike, state: dict, step: int) -> Path:
    """Write ``state`` as checkpoint ``step`` and point ``latest.json`` at it.

    Raises OSError when the disk refuses; the previous checkpoint stays the latest.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    _write_atomic(path, lambda f: torch.save(state, f))
    pointer = {"file": path.name, "step": step, "size": path.stat().st_size, "sha256": _sha256(path)}
    _write_atomic(directory / "latest.json", lambda f: f.write(json.dumps(pointer).encode()))
    for old in sorted(directory.glob("step_*.pt"))[: -(KEEP + 1)]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """(path, pointer) of the newest good checkpoint, or None when there is none."""
    pointer_path = Path(directory) / "latest.json"
    if not pointer_path.exists():
        return None
    try:
        pointer = json.loads(pointer_path.read_text())
        return Path(directory) / pointer["file"], pointer
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MemvaeError(f"checkpoint pointer {pointer_path} is corrupt") from None


def load_checkpoint(path: str | os.PathLike, pointer: dict | None = None, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a damaged or foreign file raises
    MemvaeError naming it. ``pointer`` (from latest.json) adds a size and SHA-256 check."""
    path = Path(path)
    if not path.is_file():
        raise MemvaeError(f"checkpoint {path} does not exist")
    if pointer is not None:
        size = path.stat().st_size
        if size != pointer.get("size") or _sha256(path) != pointer.get("sha256"):
            raise MemvaeError(f"checkpoint {path} is corrupt (size or SHA-256 differs from when it was saved)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MemvaeError(f"refusing to load checkpoint {path}: it holds objects other than tensors and numbers ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise MemvaeError(f"checkpoint {path} is truncated or corrupt ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise MemvaeError(f"checkpoint {path} is not a memvae checkpoint")
    return state


def load_latest(directory: str | os.PathLike, map_location="cpu") -> dict | None:
    """The newest verified checkpoint in ``directory``, or None when there is none."""
    found = latest_checkpoint(directory)
    return None if found is None else load_checkpoint(*found, map_location=map_location)
