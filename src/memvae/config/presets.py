"""The model configs that ship with memvae, found by name (``vq``, ``memory_l2``, ``smoke``, ...).

They are package data (``memvae/config/packaged/*.toml``) read through :mod:`importlib.resources`,
so a name works wherever memvae is installed — an editable checkout, a wheel, a zip —
and from any working directory. Each file opens with a comment that says what the model
is; its first sentence is the config's one-line description.
"""
from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from memvae.config import schema as C
from memvae.errors import MemvaeError

if TYPE_CHECKING:  # importlib.resources.abc is new in Python 3.11; memvae supports 3.10
    from importlib.resources.abc import Traversable

SUFFIX = ".toml"


def _directory() -> Traversable:
    return resources.files("memvae.config") / "packaged"


def names() -> list[str]:
    """The packaged config names, sorted."""
    return sorted(f.name[: -len(SUFFIX)] for f in _directory().iterdir() if f.name.endswith(SUFFIX) and f.is_file())


def did_you_mean(name: str, known: list[str]) -> str:
    """`` did you mean 'vq_ema'?`` for the known name closest to a misspelt ``name`` ('' if
    none is close), as a misspelt option or config key gets its closest one."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def _resource(name: str) -> Traversable:
    """The packaged file called ``name``; an unknown name fails with the closest and the known ones."""
    if name not in names():
        raise MemvaeError(f"unknown config {name!r};{did_you_mean(name, names())} known: {', '.join(names())} "
                          "(or give a path to a .toml file)")
    return _directory() / f"{name}{SUFFIX}"


def text(name: str) -> str:
    """The TOML text of the packaged config ``name``."""
    return _resource(name).read_text(encoding="utf-8")


def describe(toml_text: str) -> str:
    """The first sentence of the comment block a config file opens with ('' if none).

    A sentence ends at a full stop followed by a capital letter, so "et al. 2017" and
    "A.1" do not end one."""
    lines = []
    for line in toml_text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    block = " ".join(part for part in lines if part)
    return re.split(r"(?<=\.)\s+(?=[A-Z])", block, maxsplit=1)[0]


def descriptions() -> dict[str, str]:
    """Every packaged config name -> its one-line description."""
    return {name: describe(text(name)) for name in names()}


def is_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``--config`` means a file rather than a packaged name: it is a ``Path``, ends
    in ``.toml``, holds a folder separator, or is an existing file that is not a name."""
    if isinstance(name_or_path, Path):
        return True
    value = os.fspath(name_or_path)
    if value.endswith(SUFFIX) or os.sep in value or (os.altsep and os.altsep in value):
        return True
    return value not in names() and Path(value).is_file()


def load(name_or_path: str | os.PathLike, overrides: list[str] = ()) -> C.Config:
    """:func:`memvae.config.schema.load_config` of a packaged config name or a TOML file path."""
    if is_path(name_or_path):
        return C.load_config(name_or_path, overrides)
    # as_file gives a real file even when the package is imported from a zip archive.
    with resources.as_file(_resource(os.fspath(name_or_path))) as path:
        return C.load_config(path, overrides)
