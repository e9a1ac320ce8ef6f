"""One upgrade for old runs: any saved config or checkpoint, brought to today's format.

Every file a run saves carries the integer :data:`FORMAT_VERSION` under the key
``format_version``: config.toml (a top-level key, written by
:func:`memvae.config.schema.to_toml`) and every checkpoint, the autoencoder's and its
prior's (an entry of the dict, written by :func:`memvae.training.checkpoint.save_checkpoint`).
Readers go through :func:`upgrade_config` (a config's dict) or :func:`upgrade_checkpoint`
(an autoencoder's checkpoint and today's model), which apply :data:`STEPS` in turn, one
small function from version n to n + 1 each; a file of a newer version than this code is
refused.

The number was first written on 2026-12-06 (version 4; versions 5 and 6 the same day). A file without one is version 0,
and version 0 spans every file written before then, of any age: each step therefore acts
only where the file still shows the old form (a removed or re-expressed key, a missing
buffer, an untrained parameter) and passes a newer file through unchanged. A config file
a user writes needs no number either: it goes through the same steps, except that the
keys of the former flat [bottleneck] section are dropped only from a run's own (``saved``)
config, so that a misplaced key in a user's file still fails.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from memvae.errors import MemvaeError
from memvae.quantizers import REGISTRY, bottleneck_class

FORMAT_VERSION = 7
VERSION_KEY = "format_version"


@dataclass(frozen=True)
class Old:
    """What a step upgrades: a config (nested dict, as in config.toml, without the version
    key) and, for a checkpoint, its other entries and today's model (an ``nn.Module`` built
    from the upgraded config: its parameter and buffer names say what today keeps)."""

    config: dict
    saved: bool = True  # a run's own config (config.toml, a checkpoint), not a user's file
    checkpoint: dict | None = None
    model: Any = None


# ----------------------------------------------------------------------------- 0 -> 1
# Keys removed because no measurement in docs/results showed a use: key -> (why, the value
# at which it did nothing, or ANY_VALUE when it never acted on its own).
ANY_VALUE = object()
REMOVED = {
    "bottleneck.beta_growth": ("the relative temperature's annealed τ (bottleneck.temperature = \"relative\") replaces it", 1.0),
    "bottleneck.entropy_weight": ("the entropy penalty collapsed the read onto one slot at weight 0.01 and had no measured use", 0.0),
    # Read only by train_read = "gumbel", which is refused on its own.
    "bottleneck.gumbel_tau_start": ("the Gumbel read was removed; the relative temperature anneals with bottleneck.tau_start", ANY_VALUE),
    "bottleneck.gumbel_tau_end": ("the Gumbel read was removed; the relative temperature anneals with bottleneck.tau_end", ANY_VALUE),
}


def _inert(dotted: str, value) -> bool:
    neutral = REMOVED[dotted][1]
    return neutral is ANY_VALUE or value == neutral


def to_1_removed_options(old: Old) -> Old:
    """Commit d987203 (2026-11-26) removed the Gumbel read, the β growth schedule and the
    entropy penalty: their keys (:data:`REMOVED`) are dropped where they hold the value at
    which they did nothing (the run trained the model it would train today). At any other
    value they stay, and reading the config fails with the reason."""
    bottleneck = old.config.get("bottleneck")
    if not isinstance(bottleneck, dict):
        return old
    kept = {k: v for k, v in bottleneck.items() if f"bottleneck.{k}" not in REMOVED or not _inert(f"bottleneck.{k}", v)}
    return dataclasses.replace(old, config={**old.config, "bottleneck": kept})


# ----------------------------------------------------------------------------- 1 -> 2
# The one flat [bottleneck] section every kind shared until commit 3ad48b7: key -> its
# default then (a saved config of that time holds them all).
FLAT_BOTTLENECK = {
    "kind": "vq", "slots": 512, "init": "default", "commitment": 0.25, "decay": 0.99, "similarity": "l2",
    "beta_init": 1.0, "read_mode": "soft", "train_read": "soft", "tau_start": 1.0, "tau_end": 0.1,
    "tau_anneal_updates": 2000, "temperature": "learned", "encoder_gradient": "read", "write": "gradient",
    "reseed_fraction": 0.0, "levels": "8,8,8", "stages": 2, "impl": "auto", "top_k": 0,
}
# The defaults then of the [data] and [train] keys the conversion reads (a hand-written file may leave them out).
_OTHER_DEFAULTS = {("train", "steps"): 25000, ("train", "batch_size"): 32, ("data", "image_size"): 32}


def to_2_tau_and_reseed_in_updates(old: Old) -> Old:
    """Commit c6f024f (2026-12-02) re-expressed two memory options and gave the memory read
    the clock of its τ schedule:

    - ``bottleneck.tau_anneal`` (a fraction of train.steps) -> ``tau_anneal_updates``
      (updates); dropped where τ is unused (temperature other than "relative").
    - ``bottleneck.reseed_threshold`` (a count of vectors per batch) -> ``reseed_fraction``
      (of the mean count N/K, N = batch_size · (image_size / 4)² positions: the encoder
      halves the side twice).
    - A checkpoint: the memory read's buffer ``updates`` (training forwards so far), missing
      before, is the checkpoint's update, so that the run reads and resumes as it did then.
    """
    config = old.config
    bottleneck = config.get("bottleneck")
    if isinstance(bottleneck, dict) and {"tau_anneal", "reseed_threshold"} & set(bottleneck):

        def value(section: str, key: str):
            default = FLAT_BOTTLENECK[key] if section == "bottleneck" else _OTHER_DEFAULTS[section, key]
            got = config.get(section, {})
            return got.get(key, default) if isinstance(got, dict) else default

        new = dict(bottleneck)
        if "tau_anneal" in new:
            fraction = new.pop("tau_anneal")
            if value("bottleneck", "temperature") == "relative" and isinstance(fraction, (int, float)):
                new["tau_anneal_updates"] = max(1, round(fraction * value("train", "steps")))
        if "reseed_threshold" in new:
            threshold = new.pop("reseed_threshold")
            if isinstance(threshold, (int, float)):
                positions = value("train", "batch_size") * (value("data", "image_size") // 4) ** 2
                new["reseed_fraction"] = threshold * value("bottleneck", "slots") / positions
        config = {**config, "bottleneck": new}
    checkpoint = old.checkpoint
    if checkpoint is not None:
        weights = checkpoint["model"]
        missing = [k for k in old.model.state_dict() if k.endswith("bottleneck.updates") and k not in weights]
        if missing:
            count = torch.tensor(int(checkpoint["step"]), dtype=torch.int64)
            checkpoint = {**checkpoint, "model": {**weights, **dict.fromkeys(missing, count)}}
    return dataclasses.replace(old, config=config, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- 2 -> 3
def to_3_options_of_the_kind(old: Old) -> Old:
    """Commit 3ad48b7 (2026-12-02) gave each bottleneck kind its own options (the
    ``Options`` in its file) instead of one flat [bottleneck] section of
    :data:`FLAT_BOTTLENECK`'s keys. A run's own config of that time holds all of them; those
    its kind does not read did nothing, whatever their value, and are dropped. (In a user's
    file such a key is an error, and stays one.)"""
    bottleneck = old.config.get("bottleneck")
    kind = bottleneck.get("kind", FLAT_BOTTLENECK["kind"]) if isinstance(bottleneck, dict) else None
    if not old.saved or kind not in REGISTRY:  # an unknown kind fails when the config is read, naming the known ones
        return old
    reads = {f.name for f in dataclasses.fields(bottleneck_class(kind).Options)}
    if kind == "memory":
        reads.add("read_mode")  # read then, renamed eval_read by step 5
    kept = {k: v for k, v in bottleneck.items() if k in reads or k not in FLAT_BOTTLENECK}
    return dataclasses.replace(old, config={**old.config, "bottleneck": kept})


# ----------------------------------------------------------------------------- 3 -> 4
def to_4_untrained_log_beta(old: Old) -> Old:
    """Commit 98b32d2 (2026-12-05) kept the memory read's log β a parameter only where the
    read's gradient trains it: a buffer behind a straight-through or rotated encoder
    gradient, absent under a relative temperature (DDP needs every parameter used). Before,
    it was always a parameter. A checkpoint of then: log β leaves the weights where today's
    model has none, and leaves Adam's state wherever it is no longer a parameter; Adam's
    numbering of the parameters that remain is closed up."""
    if old.checkpoint is None:
        return old
    weights, optimizer = old.checkpoint["model"], old.checkpoint["optimizer"]
    today, params = old.model.state_dict(), {name for name, _ in old.model.named_parameters()}
    untrained = {k for k in weights if k.endswith("log_beta") and k not in params}
    # state_dict and named_parameters list the parameters in the same order, so the saved
    # weights' keys that were parameters then give Adam's numbering then.
    numbered = [k for k in weights if k in params or k in untrained]
    groups = optimizer["param_groups"]
    if not untrained or len(numbered) != sum(len(g["params"]) for g in groups):
        return old  # saved since (Adam already numbers today's parameters), or not a log β of then
    gone = {i for i, k in enumerate(numbered) if k in untrained}
    renumber = {i: new for new, i in enumerate(i for i in range(len(numbered)) if i not in gone)}
    optimizer = {
        **optimizer,
        "state": {renumber[i]: v for i, v in optimizer["state"].items() if i not in gone},
        "param_groups": [{**g, "params": [renumber[i] for i in g["params"] if i not in gone]} for g in groups],
    }
    weights = {k: v for k, v in weights.items() if k not in untrained or k in today}
    return dataclasses.replace(old, checkpoint={**old.checkpoint, "model": weights, "optimizer": optimizer})


# ----------------------------------------------------------------------------- 4 -> 5
def _default_init_then(kind: str, write: str) -> str:
    """The start ``init = "default"`` gave each kind before version 5: random slots for vq
    and for the memory's gradient write, data for every other kind that learns slots."""
    return "random" if kind == "vq" or (kind == "memory" and write == "gradient") else "data"


def to_5_one_quantiser_api(old: Old) -> Old:
    """Version 5 (2026-12-06, issue 33's one API) gave the quantisers one vocabulary:

    - ``bottleneck.read_mode`` (the memory's evaluation read) -> ``eval_read``, the name
      every quantiser uses for it.
    - ``bottleneck.init = "default"`` (each kind's own start) -> the start it meant then
      (:func:`_default_init_then`): "data" is now every kind's default, and "default" is
      no longer a value.
    """
    bottleneck = old.config.get("bottleneck")
    if not isinstance(bottleneck, dict) or not ("read_mode" in bottleneck or bottleneck.get("init") == "default"):
        return old
    new = dict(bottleneck)
    kind = new.get("kind", FLAT_BOTTLENECK["kind"])
    if "read_mode" in new and kind == "memory":
        new["eval_read"] = new.pop("read_mode")
    if new.get("init") == "default":
        new["init"] = _default_init_then(kind, new.get("write", FLAT_BOTTLENECK["write"]))
    return dataclasses.replace(old, config={**old.config, "bottleneck": new})


# ----------------------------------------------------------------------------- 5 -> 6
def to_6_mixture_write(old: Old) -> Old:
    """Version 6 (2026-12-06, issue 31) gave the mixture read a moving-average write
    (``bottleneck.write = "ema"``, the new default); a mixture run saved before it learned
    its slots by gradient, so its own config gets ``write = "gradient"``. A user's file
    is left alone: it gets today's default."""
    bottleneck = old.config.get("bottleneck")
    if not (old.saved and isinstance(bottleneck, dict) and bottleneck.get("kind") == "mixture"
            and "write" not in bottleneck):
        return old
    return dataclasses.replace(old, config={**old.config, "bottleneck": {**bottleneck, "write": "gradient"}})


# ----------------------------------------------------------------------------- 6 -> 7
def to_7_prior_and_reconstruction(old: Old) -> Old:
    """Version 7 (2026-12-07) added ``train.reconstruction`` (default "mse", what every
    earlier run trained with), ``data.train_images`` (default 0: all) and the ``[prior]``
    section (its defaults are the settings every earlier prior in docs/results used). An
    older file reads as it was meant at those defaults; the version says that a file with
    the new keys is refused by older code rather than misread."""
    return old


# Step i brings version i to i + 1.
STEPS: tuple[Callable[[Old], Old], ...] = (
    to_1_removed_options,
    to_2_tau_and_reseed_in_updates,
    to_3_options_of_the_kind,
    to_4_untrained_log_beta,
    to_5_one_quantiser_api,
    to_6_mixture_write,
    to_7_prior_and_reconstruction,
)
assert len(STEPS) == FORMAT_VERSION


def version_of(saved: dict, what: str) -> int:
    """The format version of a config's or checkpoint's dict (0 when it has none); a version
    newer than this code, or not a whole number, fails naming ``what`` the file is."""
    version = saved.get(VERSION_KEY, 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise MemvaeError(f"{what} has format_version {version!r}, not a whole number >= 0")
    if version > FORMAT_VERSION:
        raise MemvaeError(f"{what} is of format version {version}, newer than this memvae reads ({FORMAT_VERSION}); "
                          "upgrade memvae to read it")
    return version


def upgrade(old: Old, version: int) -> Old:
    """``old``, of format ``version``, in today's format: the steps from ``version`` on."""
    for step in STEPS[version:]:
        old = step(old)
    return old


def upgrade_config(raw: dict, saved: bool = True, what: str = "config") -> dict:
    """A config's nested dict (config.toml's, a checkpoint's ``config``, a user's file) in
    today's keys, without the version key. ``saved``: a run's own config (see module doc)."""
    version = version_of(raw, what)
    config = {k: v for k, v in raw.items() if k != VERSION_KEY}
    return upgrade(Old(config, saved), version).config


def upgrade_checkpoint(state: dict, model, what: str = "checkpoint") -> dict:
    """An autoencoder's checkpoint dict in today's format (its config, weights and Adam's
    state), marked :data:`FORMAT_VERSION`. ``model``: today's module of the checkpoint's
    (upgraded) config, into which the weights will load."""
    version = version_of(state, what)
    rest = {k: v for k, v in state.items() if k not in ("config", VERSION_KEY)}
    new = upgrade(Old(state["config"], True, rest, model), version)
    return {**new.checkpoint, "config": new.config, VERSION_KEY: FORMAT_VERSION}
