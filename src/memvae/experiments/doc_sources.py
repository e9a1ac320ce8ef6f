"""The committed files a documented table is made from, read into one shape, and the number
formats the tables share (:mod:`memvae.experiments.doc_tables`).

A results folder under ``docs/results/`` holds either its runs' small files
(``runs/<run>/config.toml``, ``metrics.jsonl``, ``eval.json``, ``prior/eval.json``,
``bits_per_dim.json``: no checkpoints) or only the ``results.json`` that ``memvae compare``
wrote, or both. :func:`models_of` reads either into ``{model name: Model}``, each model a list
of :class:`Seed` records, so that a table generator does not care which files it came from.
No model is built and nothing is evaluated: checking the documents is reading small files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from memvae.config.schema import load_config
from memvae.errors import MemvaeError
from memvae.training.metrics import read_metrics

SOURCES = ("runs", "results")


@dataclasses.dataclass
class Seed:
    """One trained run as the committed files tell it; None where a file is not committed."""

    run: str  # the run directory's name, or "<model> #i" for a results.json entry
    seed: int | None
    step: int | None  # the last logged training update
    test: dict | None  # {read: metrics} on the test set (eval.json), gaps left out
    lossless: dict | None = None  # {read: metrics} on the lossless originals
    prior: dict | None = None  # prior/eval.json
    bits_per_dim: dict | None = None  # {"test": x, "lossless": y}: memvae bpd's totals
    eval_nmse: float | None = None  # the last in-training evaluation (a subset of the test set)
    updates_to: dict | None = None  # {"0.1": first update at or below, or None}


@dataclasses.dataclass
class Model:
    """The seeds of one config, and the read it is a model with (its codes decode to)."""

    name: str
    read: str | None
    seeds: list[Seed]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _reads(scores: dict | None) -> dict | None:
    """eval.json's {read: metrics} without the ``<read>_gap`` numbers (not reads)."""
    return None if scores is None else {k: v for k, v in scores.items() if isinstance(v, dict)}


def _bits_per_dim(saved: dict | None) -> dict | None:
    if saved is None:
        return None
    return {which: (saved.get(which) or {}).get("bits_per_dim") for which in ("test", "lossless")}


def read_run(run_dir: Path) -> tuple[str, str | None, Seed]:
    """(config name, its own evaluation read, the run's Seed) from a run directory's small files."""
    cfg = load_config(run_dir / "config.toml", saved=True)  # upgrades old formats (read_mode -> eval_read)
    evaluated = _json(run_dir / "eval.json") or {}
    train, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
    seed = Seed(run=run_dir.name, seed=cfg.train.seed, step=train[-1]["step"] if train else None,
                test=_reads(evaluated.get("test")), lossless=_reads(evaluated.get("lossless")),
                prior=_json(run_dir / "prior" / "eval.json"),
                bits_per_dim=_bits_per_dim(_json(run_dir / "bits_per_dim.json")),
                eval_nmse=evals[-1]["eval_nmse"] if evals else None)
    # Only the memory has a choice of read at test; the others' one read is their own.
    return cfg.name, getattr(cfg.bottleneck, "eval_read", None), seed


def _from_runs(folder: Path) -> dict[str, Model]:
    runs = folder / "runs"
    if not runs.is_dir():
        raise MemvaeError(f"{folder} has no runs/ folder to make a table from")
    models: dict[str, Model] = {}
    for run_dir in sorted(p for p in runs.iterdir() if (p / "config.toml").exists()):
        name, read, seed = read_run(run_dir)
        models.setdefault(name, Model(name, read, [])).seeds.append(seed)
    for model in models.values():
        model.seeds.sort(key=lambda s: (s.seed is None, s.seed))
    return models


def _from_results(folder: Path) -> dict[str, Model]:
    results = _json(folder / "results.json")
    if results is None:
        raise MemvaeError(f"{folder} has no results.json to make a table from")
    models = {}
    for name, entry in results["models"].items():
        seeds = [Seed(run=f"{name} #{i}", seed=None, step=results["steps"], test=_reads(s["test"]),
                      lossless=_reads(s.get("lossless")), bits_per_dim=s.get("bits_per_dim"),
                      updates_to=s.get("updates_to_nmse")) for i, s in enumerate(entry["seeds"], 1)]
        models[name] = Model(name, entry.get("read"), seeds)
    return models


def models_of(folder: Path, source: str = "runs") -> dict[str, Model]:
    """{config name: Model} from ``folder``'s runs/ (``source="runs"``) or its results.json."""
    if source not in SOURCES:
        raise MemvaeError(f"from={source!r}: a table is made from one of {', '.join(SOURCES)}")
    models = _from_runs(folder) if source == "runs" else _from_results(folder)
    for model in models.values():
        first = next((s.test for s in model.seeds if s.test), None)
        if model.read is None and first:  # the bottleneck's first read is its own unless told otherwise
            model.read = next(iter(first))
    return models


# Number formats: a column names one; mean and std share the mean's decimals so they line up.
def decimals(value: float, kind: str) -> int:
    """Decimals for ``value`` in a column of ``kind``: "nmse" (3 significant digits, at least
    4 decimals below 1), "sig" (3 significant digits), or a fixed count "0".."4"."""
    if kind.isdigit():
        return int(kind)
    if value == 0 or not math.isfinite(value):
        return 0 if kind == "sig" else 4
    places = max(0, 2 - math.floor(math.log10(abs(value))))
    return max(places, 4) if kind == "nmse" and abs(value) < 1 else places


def number(value: float | int | None, kind: str) -> str:
    """One value; "—" when there is none."""
    if value is None:
        return "—"
    text = f"{value:.{decimals(value, kind)}f}"
    return text.replace("-", "−") if text.startswith("-") else text


def mean_std(values: list[float | None], kind: str, missing: str = "—") -> str:
    """mean ± std (sample std) of the values present, "(n/m runs)" when some are missing,
    ``missing`` when none is present."""
    present = [v for v in values if v is not None]
    if not present:
        return missing
    mean = statistics.fmean(present)
    places = decimals(mean, kind)
    text = number(mean, kind) if len(present) == 1 else \
        f"{number(mean, kind)} ± {statistics.stdev(present):.{places}f}"
    return text + (f" ({len(present)}/{len(values)} runs)" if len(present) < len(values) else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
