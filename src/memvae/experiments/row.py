"""A run's row: everything a finished run must have measured before it counts as finished.

A run's row is complete when its small files hold, for the update it was trained to
(``train.steps``):

- ``eval.json``: its reads on the whole test set (``test``), and on the other image sets
  asked for: ``lossless`` (the lossless originals' ``x_test``), ``holdout`` (the training
  images it did not train on: ``data.train_images`` onwards, what a guard chooses by);
- for a discrete model whose ``prior.fit`` is true: ``prior/eval.json`` (the PixelCNN prior
  of its codes, fitted with the ``[prior]`` settings of its config) and ``bits_per_dim.json``
  (on the test set, and on the lossless originals when they are asked for).

:func:`missing_steps` says which of the steps ``train``, ``eval``, ``prior``, ``bpd`` a run
still lacks, from its files alone; :func:`complete_row` takes a trained run through the
rest, so that a run cut off between training and its prior continues from the missing
step instead of training again.
"""
from __future__ import annotations

import json
from pathlib import Path

from memvae.config import schema as C
from memvae.data import ImageData, load_array_images
from memvae.errors import MemvaeError
from memvae.training.checkpoint import latest_checkpoint
from memvae.training.evaluate import evaluation_record
from memvae.training.runlock import run_lock
from memvae.training.runs import load_run

STEPS = ("train", "eval", "prior", "bpd")
SETS = ("test", "lossless", "holdout")  # the image sets a row may be asked to hold
LOSSLESS_FILE = "cifar10-lossless-subset.npz"  # in the data directory: 1,000 originals that never went through JPEG


def read_json(path: Path) -> dict | None:
    """A small file of a run, or None when it is not there."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MemvaeError(f"{path} cannot be read ({exc}); remove it to measure it again") from None


def trained_to(run_dir: Path) -> int:
    """The update a run has reached: its newest checkpoint's, else its eval.json's (a run
    kept as small files only), else 0."""
    found = latest_checkpoint(run_dir / "checkpoints") if run_dir.exists() else None
    if found is not None:
        return int(found[1]["step"])
    evaluated = read_json(run_dir / "eval.json")
    return int(evaluated["step"]) if evaluated else 0


def needs_prior(cfg: C.Config) -> bool:
    """Whether a run of ``cfg`` has a prior and bits/dim in its row: a discrete model with
    ``prior.fit`` on (the continuous control and the soft read have no codes to cost)."""
    from memvae.experiments.sweep import is_discrete  # builds the bottleneck: torch, on demand

    return cfg.prior.fit and is_discrete(cfg)


def missing_steps(run_dir: str | Path, cfg: C.Config, sets: tuple[str, ...] = ("test",)) -> list[str]:
    """The steps of :data:`STEPS` that ``run_dir`` still lacks for a complete row of ``cfg``
    on the image ``sets`` (a subset of :data:`SETS`; bits/dim is scored on test and lossless
    only), from its small files alone (no checkpoint needed)."""
    run_dir, steps = Path(run_dir), cfg.train.steps
    missing = [] if trained_to(run_dir) >= steps else ["train"]
    evaluated = read_json(run_dir / "eval.json") or {}
    if evaluated.get("step") != steps or any(s not in evaluated for s in sets):
        missing.append("eval")
    if needs_prior(cfg):
        prior = read_json(run_dir / "prior" / "eval.json") or {}
        if prior.get("model_step") != steps:
            missing.append("prior")
        scored = read_json(run_dir / "bits_per_dim.json") or {}
        if scored.get("model_step") != steps or any(s not in scored for s in sets if s != "holdout"):
            missing.append("bpd")
    return missing


def image_sets(data: ImageData, cfg: C.Config, sets: tuple[str, ...], lossless: str | Path | None) -> dict:
    """{set name: uint8 N×3×H×W images} for ``sets``: the whole test set, the lossless
    originals' ``x_test``, the training images after the first ``data.train_images``."""
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise MemvaeError(f"unknown image set {unknown[0]!r}; the sets are {', '.join(SETS)}")
    images = {"test": data.test}
    if "lossless" in sets:
        if lossless is None:
            raise MemvaeError("the lossless set needs the lossless originals' .npz (--lossless)")
        images["lossless"] = load_array_images(lossless, "x_test")
    if "holdout" in sets:
        if not 0 < cfg.data.train_images < len(data.train):
            raise MemvaeError(f"{cfg.name}: the holdout set is the training images a run did not train on, but "
                              f"data.train_images is {cfg.data.train_images} of {len(data.train)}")
        images["holdout"] = data.train[cfg.data.train_images:]
    return {name: images[name] for name in sets}


def write_eval(run_dir: Path, data: ImageData, cfg: C.Config, sets: tuple[str, ...], lossless,
               device: str = "cpu") -> dict:
    """Evaluate a trained run's every read on ``sets`` and write RUN_DIR/eval.json (one
    writer: the run lock); returns what it wrote."""
    model, _, state = load_run(run_dir, device)
    variance = data.train_variance()
    with run_lock(run_dir, create=False):
        result = evaluation_record(run_dir, state["step"], model, image_sets(data, cfg, sets, lossless), variance,
                                   device=device)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result


def complete_row(run_dir: str | Path, cfg: C.Config, data: ImageData, sets: tuple[str, ...] = ("test",),
                 lossless: str | Path | None = None, data_dir: str | None = None, say=print) -> list[str]:
    """Take a trained run through the steps its row still lacks (:func:`missing_steps`), in
    order: evaluate, fit the prior (``cfg.prior``), score bits/dim; returns the steps done.
    A prior cut off part-way continues from its checkpoint. The run must have trained to
    ``cfg.train.steps``, with its checkpoint here."""
    from memvae.prior.bits_per_dim import measure
    from memvae.prior.fit import train_prior
    from memvae.prior.options import PriorOptions

    run_dir = Path(run_dir)
    todo = missing_steps(run_dir, cfg, sets)
    if "train" in todo:
        raise MemvaeError(f"{run_dir} has trained to update {trained_to(run_dir)} of {cfg.train.steps}: train it first")
    if todo and latest_checkpoint(run_dir / "checkpoints") is None:
        raise MemvaeError(f"{run_dir} lacks {', '.join(todo)} and holds no checkpoint to measure them from")
    threads = cfg.train.threads or 1  # the run's own count: its numbers depend on it
    if "eval" in todo:
        say(f"{run_dir.name}: evaluating on {', '.join(sets)}")
        write_eval(run_dir, data, cfg, sets, lossless)
    if "prior" in todo:
        say(f"{run_dir.name}: fitting its prior ({cfg.prior.updates} updates)")
        options = PriorOptions(steps=cfg.prior.updates, width=cfg.prior.width, layers=cfg.prior.layers, threads=threads)
        stale = (read_json(run_dir / "prior" / "eval.json") or {}).get("model_step") not in (None, cfg.train.steps)
        train_prior(run_dir, options, data_dir, overwrite=stale, resume=not stale, data=data)
    if "bpd" in todo:
        say(f"{run_dir.name}: bits per dimension")
        measure(run_dir, data_dir=data_dir, lossless=lossless if "lossless" in sets else None)
    return todo
