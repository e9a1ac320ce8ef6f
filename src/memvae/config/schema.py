"""Typed configuration: dataclasses, loaded from TOML files and command-line overrides.

A config file has a top-level ``name`` and the sections ``[data]``, ``[model]``,
``[bottleneck]``, ``[train]`` and ``[prior]``; every key is a field below, and the keys of
``[bottleneck]`` are those of its ``kind`` (the ``Options`` each bottleneck's file in
memvae/bottlenecks defines: ``memvae configs NAME`` prints them resolved). Overrides are
``section.key=value`` strings (the command line also takes ``--section.key value``
and, when the key is unique, ``--key value``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memvae.quantizers import REGISTRY, bottleneck_class
from memvae.config.upgrade import REMOVED, VERSION_KEY, FORMAT_VERSION, upgrade_config
from memvae.quantizers.base import Options as BottleneckOptions
from memvae.errors import MemvaeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    source: str = "cifar10"  # "cifar10" or "folder"
    dir: str = ""  # empty: $MEMVAE_DATA_DIR, else ~/.cache/memvae
    image_size: int = 32  # side of the square images a folder source is resized/cropped to
    eval_images: int = 1000  # size of the fixed held-out subset evaluated during training
    # Train on the first N training images only (0: all of them), so that the rest can choose
    # between settings without the test set (the loss guard: memvae.experiments.leaderboard).
    train_images: int = 0


@dataclass
class ModelConfig:
    hidden: int = 128
    res_hidden: int = 32
    res_blocks: int = 2
    embedding_dim: int = 64  # D


def bottleneck_options(kind: str) -> BottleneckOptions:
    """The ``[bottleneck]`` section of ``kind`` at its defaults (that kind's ``Options``)."""
    if kind not in REGISTRY:
        raise MemvaeError(f"config key 'bottleneck.kind' must be one of {', '.join(sorted(REGISTRY))}, got {kind!r}")
    return bottleneck_class(kind).Options(kind=kind)


@dataclass
class TrainConfig:
    steps: int = 25000
    batch_size: int = 32
    lr: float = 3e-4
    seed: int = 0
    log_every: int = 100
    eval_every: int = 1000
    checkpoint_every: int = 1000
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    amp: bool = True  # bf16 autocast for the networks on CUDA (bottleneck maths stay float32)
    compile: bool = False  # torch.compile the networks
    channels_last: bool = False
    on_nonfinite: str = "stop"  # "stop" or "skip" an update whose loss is NaN/Inf
    threads: int = 0  # CPU threads for torch; 0: $OMP_NUM_THREADS, else 1 (resuming: the run's own count)
    deterministic: bool = False  # CUDA: deterministic kernels (slower); CPU runs are always repeatable at a fixed thread count
    # The reconstruction term of the loss: "mse", the mean squared error on pixels in
    # [-0.5, 0.5]; "nmse", the same divided by the training pixels' variance (about 16 times
    # larger), as the VQ-VAE paper's and Sonnet's examples train. A quantiser whose own loss
    # weights were set against a larger reconstruction term (IBQ, LFQ) can train under nmse.
    reconstruction: str = "mse"


@dataclass
class PriorConfig:
    """How ``memvae compare`` and ``memvae leaderboard`` complete a discrete run's row after
    training (:mod:`memvae.experiments.row`): fit the PixelCNN prior over its codes
    (``memvae prior`` with these settings) and score bits per dimension. The defaults are
    the settings of every prior in docs/results since the rate sweep."""

    fit: bool = True  # false: a run's row is complete without a prior and bits/dim
    updates: int = 1500  # Adam updates of the prior (memvae prior --steps)
    width: int = 32  # PixelCNN channels
    layers: int = 6  # gated layers


@dataclass
class Config:
    """Everything a run needs: its ``name`` and the sections ``data``, ``model``,
    ``bottleneck`` and ``train`` (the dataclasses above; a field is a key ``section.field``).
    Read one with :func:`load_config`; ``memvae configs`` lists the packaged files."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bottleneck: BottleneckOptions = field(default_factory=lambda: bottleneck_options("vq"))
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)


SECTIONS = ("data", "model", "bottleneck", "train", "prior")
# Rules on the keys of data, model and train (each bottleneck's options check their own).
CHOICES = {
    "data.source": ("cifar10", "folder"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.reconstruction": ("mse", "nmse"),
}
POSITIVE = {
    "data.image_size", "data.eval_images", "model.hidden", "model.res_hidden", "model.embedding_dim",
    "train.steps", "train.batch_size", "train.lr", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "prior.updates", "prior.width", "prior.layers",
}
NON_NEGATIVE = {"model.res_blocks", "train.seed", "train.threads", "data.train_images"}


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every valid dotted key of ``cfg`` (default: Config()), e.g. ``train.steps``; the
    bottleneck keys are those of its kind."""
    cfg = cfg if cfg is not None else Config()
    keys = ["name"]
    for section in SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]
    return keys


def _not_an_option(key: str, b: BottleneckOptions) -> MemvaeError:
    """A bottleneck key its kind does not take: the kind's keys and the closest one."""
    keys = [f.name for f in dataclasses.fields(b)]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    owners = [k for k, cls in sorted(REGISTRY.items()) if key in {f.name for f in dataclasses.fields(cls.Options)}]
    where = f" (a key of {', '.join(owners)})" if owners else f" (did you mean 'bottleneck.{close[0]}'?)" if close else ""
    return MemvaeError(f"config key 'bottleneck.{key}' is not a key of bottleneck kind {b.kind!r}{where}; "
                       f"its keys: {', '.join(keys)}")


def every_kinds_keys() -> set[str]:
    """The [bottleneck] keys of every kind (what a bare override such as ``--decay`` may name)."""
    return {f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls.Options)}



def _unknown(key: str, candidates: list[str]) -> MemvaeError:
    removed = next((k for k in REMOVED if key in (k, k.split(".")[-1])), None)
    if removed:
        return MemvaeError(f"config key {removed!r} was removed: {REMOVED[removed][0]}")
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(candidates)}"
    return MemvaeError(f"unknown config key {key!r}{hint}")


def resolve_key(key: str, cfg: Config | None = None) -> str:
    """A dotted key, or a bare field name that is unique across sections -> dotted key (of
    ``cfg``'s sections: its bottleneck kind's keys)."""
    cfg = cfg if cfg is not None else Config()
    keys = all_keys(cfg)
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise MemvaeError(f"config key {key!r} is ambiguous; use one of {', '.join(matches)}")
    name = key.removeprefix("bottleneck.")
    if key not in REMOVED and (key.startswith("bottleneck.") or name in every_kinds_keys()) and "." not in name:
        raise _not_an_option(name, cfg.bottleneck)
    raise _unknown(key, keys)


def _field_type(key: str, cfg: Config) -> type:
    if key == "name":
        return str
    section, name = key.split(".")
    return {f.name: f.type for f in dataclasses.fields(getattr(cfg, section))}[name]


def _coerce(key: str, value: Any, from_text: bool, cfg: Config) -> Any:
    """Check ``value`` against the field's type in ``cfg``; strings from the command line are parsed."""
    kind = _field_type(key, cfg)
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind) if isinstance(kind, str) else kind
    if from_text:
        text = str(value)
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            return kind(text)
        except ValueError:
            raise MemvaeError(f"config key {key!r} expects {kind.__name__}, got {text!r}") from None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # TOML integers have no size limit in tomllib
            raise MemvaeError(f"config key {key!r} expects float, got an integer too large for one") from None
    if not ok:
        raise MemvaeError(f"config key {key!r} expects {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    if key == "name":
        cfg.name = value
    elif key == "bottleneck.kind":
        if value != cfg.bottleneck.kind:  # the new kind's options, keeping the values of the keys both take
            new = bottleneck_options(value)
            shared = {f.name for f in dataclasses.fields(new)} & {f.name for f in dataclasses.fields(cfg.bottleneck)}
            cfg.bottleneck = dataclasses.replace(new, **{k: getattr(cfg.bottleneck, k) for k in shared - {"kind"}})
    else:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)


def get(cfg: Config, key: str) -> Any:
    if key == "name":
        return cfg.name
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> Config:
    """Range and choice checks; raises MemvaeError naming the key and the rule."""
    for key in all_keys(cfg):  # NaN passes every comparison below, and TOML cannot hold inf
        value = get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise MemvaeError(f"config key {key!r} must be a finite number, got {value!r}")
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise MemvaeError(f"config key {key!r} must be one of {', '.join(allowed)}, got {get(cfg, key)!r}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise MemvaeError(f"config key {key!r} must be > 0, got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise MemvaeError(f"config key {key!r} must be >= 0, got {get(cfg, key)!r}")
    try:  # the bottleneck's rules belong to its kind (its Options, in its file in memvae/bottlenecks)
        cfg.bottleneck.check()
    except ValueError as exc:
        raise MemvaeError(str(exc)) from None
    if not cfg.name or any(c in cfg.name for c in "/\\"):
        raise MemvaeError(f"config key 'name' must be a non-empty name without slashes, got {cfg.name!r}")
    return cfg


def from_dict(raw: dict, cfg: Config | None = None, saved: bool = False, what: str = "config") -> Config:
    """Nested dict (as in a TOML file) -> Config, checking every key and type. The dict is
    first brought to today's keys (:func:`memvae.config.upgrade.upgrade_config`, by its
    ``format_version``); ``saved``: it is a run's own config (config.toml, a checkpoint's),
    whose keys of the former flat [bottleneck] section that its kind does not read are dropped.
    ``what``: the dict's file, named when its version is newer than this code reads."""
    cfg = cfg if cfg is not None else Config()
    for top, value in upgrade_config(raw, saved, what).items():
        if top == "name":
            _set(cfg, "name", _coerce("name", value, False, cfg))
        elif top in SECTIONS:
            if not isinstance(value, dict):
                raise MemvaeError(f"config section [{top}] must be a table, got {value!r}")
            if top == "bottleneck" and "kind" in value:  # the kind says which keys the rest may be
                value = {"kind": value["kind"], **value}
            for key, item in value.items():
                dotted = f"{top}.{key}"
                if dotted not in all_keys(cfg):
                    if top != "bottleneck" or dotted in REMOVED:
                        raise _unknown(dotted, all_keys(cfg))
                    raise _not_an_option(key, cfg.bottleneck)
                _set(cfg, dotted, _coerce(dotted, item, False, cfg))
        else:
            raise _unknown(top, ["name", *SECTIONS])
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (values parsed by the field's type)."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise MemvaeError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value.strip()))
    # The kind first: it says which bottleneck keys the others may name.
    for key, value in sorted(pairs, key=lambda kv: kv[0] not in ("bottleneck.kind", "kind")):
        dotted = resolve_key(key, cfg)
        _set(cfg, dotted, _coerce(dotted, value, True, cfg))
    return cfg


def read_toml(path: Path, what: str) -> dict:
    """The TOML file at ``path`` as a dict; a missing, unreadable or malformed file is one
    line naming ``what`` it is (e.g. "config file")."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MemvaeError(f"{what} {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MemvaeError(f"{what} {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise MemvaeError(f"could not read {what} {path} ({exc.strerror or exc})") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), saved: bool = False) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``; validated.
    ``saved``: the file is a run's own config.toml (see :func:`from_dict`)."""
    cfg = Config()
    if path is not None:
        from_dict(read_toml(Path(path), "config file"), cfg, saved, f"config file {path}")
    return validate(apply_overrides(cfg, list(overrides)))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def training_dict(cfg: Config) -> dict:
    """:func:`to_dict` without what does not change what trains: the thread count (it changes a
    run's last digits, and a resumed run keeps its own) and the ``[prior]`` settings (how its
    row is completed afterwards). Two runs of one model compare equal by it."""
    d = to_dict(cfg)
    d["train"].pop("threads")
    d.pop("prior")
    return d


def _toml_string(text: str) -> str:
    """A TOML basic string in plain ASCII. (json.dumps is not one: it writes characters
    beyond U+FFFF as surrogate pairs, which TOML rejects.)"""

    def escape(ch: str) -> str:
        if ch in '"\\':
            return "\\" + ch
        if " " <= ch <= "~":
            return ch
        return f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"

    return '"' + "".join(escape(ch) for ch in text) + '"'


def to_toml(cfg: Config) -> str:
    """The config as TOML text that :func:`load_config` reads back unchanged, marked with the
    format version it is written in (:mod:`memvae.config.upgrade`)."""
    raw = to_dict(cfg)
    lines = [f"{VERSION_KEY} = {FORMAT_VERSION}", f"name = {_toml_string(raw['name'])}"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key, value in raw[section].items():
            text = (
                ("true" if value else "false") if isinstance(value, bool)
                else _toml_string(value) if isinstance(value, str) else json.dumps(value)
            )
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
