"""Crash-safe checkpoints: plain dicts of tensors and numbers, verified on load.

Layout in a run directory::

    checkpoints/step_00001000.pt   torch.save of a plain dict (weights_only-loadable), with
                                   its "format_version" (memvae.config.upgrade)
    checkpoints/latest.json        {"file", "step", "size", "sha256"} of the newest good one

A checkpoint is written to a temporary file, flushed to disk and renamed into place;
only then does ``latest.json`` (itself replaced atomically) point at it. A crash or a
full disk at any moment therefore leaves ``latest.json`` naming a complete file, and
the size and SHA-256 recorded there catch a file damaged later.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path

import torch

from memvae.config.upgrade import FORMAT_VERSION, VERSION_KEY, version_of
from memvae.errors import MemvaeError

KEEP = 2  # checkpoint files kept besides the newest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, rename into place,
    fsync the directory (so that the rename itself survives a power cut)."""
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
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike, state: dict, step: int) -> Path:
    """Write ``state`` as checkpoint ``step``, marked with today's format version, and point
    ``latest.json`` at it.

    Raises OSError when the disk refuses; the previous checkpoint stays the latest.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    # Serialise in memory first: torch.save straight into a file turns the OSError of a
    # full disk into an opaque RuntimeError; a plain write keeps it an OSError.
    buffer = io.BytesIO()
    torch.save({**state, VERSION_KEY: FORMAT_VERSION}, buffer)
    _write_atomic(path, lambda f: f.write(buffer.getbuffer()))
    pointer = {"file": path.name, "step": step, "size": path.stat().st_size, "sha256": _sha256(path)}
    _write_atomic(directory / "latest.json", lambda f: f.write(json.dumps(pointer).encode()))
    # Only files older than this one go: files with higher numbers, left by a crashed run
    # whose pointer never reached them, must not push the new checkpoint out.
    older = sorted(p for p in directory.glob("step_*.pt") if p.name < path.name)
    for old in older[: max(len(older) - KEEP, 0)]:
        old.unlink(missing_ok=True)
    for stale in directory.glob("*.tmp"):  # temporary files of saves cut short by a crash
        stale.unlink(missing_ok=True)
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
    """Load a checkpoint with ``weights_only=True``; a damaged or foreign file, or one of a
    newer format than this code reads, raises MemvaeError naming it. ``pointer`` (from
    latest.json) adds a size and SHA-256 check. The dict is as saved: an autoencoder's is
    brought to today's format by :func:`memvae.config.upgrade.upgrade_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise MemvaeError(f"checkpoint {path} does not exist")
    if pointer is not None:
        size = path.stat().st_size
        if size != pointer.get("size") or _sha256(path) != pointer.get("sha256"):
            raise MemvaeError(f"checkpoint {path} is corrupt (size or SHA-256 differs from when it was saved)")
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message opens with advice to retry with weights_only=False: never show that.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        forbidden = next((line for line in lines if "GLOBAL" in line), None)
        if forbidden:
            raise MemvaeError(f"refusing to load checkpoint {path}: it holds objects other than tensors and numbers ({forbidden})") from None
        detail = next((line[line.index("WeightsUnpickler error"):] for line in lines if "WeightsUnpickler error" in line), "")
        raise MemvaeError(
            f"checkpoint {path} is corrupt or holds objects other than tensors and numbers ({detail[:120] or type(exc).__name__})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can trip torch.load in many ways (KeyError, IndexError, ...)
        detail = (str(exc).strip().splitlines() or [""])[0][:120]
        raise MemvaeError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {detail})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise MemvaeError(f"checkpoint {path} is not a memvae checkpoint")
    version_of(state, f"checkpoint {path}")
    return state


def load_latest(directory: str | os.PathLike, map_location="cpu") -> dict | None:
    """The newest verified checkpoint in ``directory``, or None when there is none."""
    found = latest_checkpoint(directory)
    return None if found is None else load_checkpoint(*found, map_location=map_location)
