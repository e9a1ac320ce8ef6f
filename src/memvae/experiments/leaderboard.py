"""The leaderboard's plan: which runs make up each cell, and which of them still lack their row.

A plan is a TOML file (docs/results/leaderboard/plan.toml)::

    [plan]
    steps = 10000                 # updates of every run
    runs = "runs"                 # the runs' folder, relative to the plan file
    sets = ["test", "lossless"]   # the image sets of every row (memvae.experiments.row); the
                                  # first is the table's: "holdout" for a guard, never the test set
    overrides = []                # config overrides of every run

    [prior]                       # the prior of every discrete run (the config's [prior])
    updates = 1500

    [[cell]]                      # in the order a reader needs them: the plan trains in this order
    model = "vq_ema_reseed"       # a packaged config, or a .toml path relative to the plan file
    slots = 512                   # optional: K, as ``memvae compare --slots`` (run MODEL-kK-seedS)
    bits = 9                      # bits per position; none: a ceiling without a rate (NMSE only)
    seeds = [1, 2, 3]
    overrides = []                # optional, e.g. ["train.reconstruction=nmse"]
    earlier = "../rate-distortion/runs"  # optional: committed runs of the same config ...
    earlier_seeds = [2, 3]               # ... that count for NMSE (they have no bits/dim)

A run is one cell's seed, trained into ``RUNS/<config name>-seed<s>``; it is complete when
its row is (:func:`memvae.experiments.row.missing_steps`), or, for an earlier seed, when its
committed eval.json holds the whole test set at ``steps`` updates.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from memvae.config import presets
from memvae.config import schema as C
from memvae.errors import MemvaeError
from memvae.experiments.row import SETS, missing_steps, read_json, trained_to
from memvae.experiments.sweep import at_slots

PLAN_KEYS = {"steps", "runs", "sets", "overrides", "title"}
CELL_KEYS = {"model", "slots", "bits", "seeds", "overrides", "name", "earlier", "earlier_seeds", "label"}
PRIOR_KEYS = {f.name for f in dataclasses.fields(C.PriorConfig)}


@dataclass(frozen=True)
class Run:
    """One seed of one cell: its config, directory and where its config comes from (a
    packaged name or an absolute path, for the command that trains it)."""

    cfg: C.Config
    run_dir: Path
    source: str
    earlier: bool = False  # a committed run of an earlier study: NMSE only, never trained here

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass(frozen=True)
class Cell:
    """A model at one rate: ``bits`` per position (None: a ceiling with no rate) and its runs;
    ``family``: the model's config name, shared by its cells at other rates (one line in a figure)."""

    label: str
    family: str
    bits: float | None
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Plan:
    path: Path
    title: str
    steps: int
    sets: tuple[str, ...]
    runs_dir: Path
    cells: tuple[Cell, ...]

    def all_runs(self) -> list[Run]:
        return [run for cell in self.cells for run in cell.runs]

    def run(self, name: str) -> Run:
        found = [r for r in self.all_runs() if r.name == name and not r.earlier]
        if not found:
            raise MemvaeError(f"{self.path} has no run {name!r} to train")
        return found[0]


def _table(raw: dict, key: str, allowed: set[str], where: str) -> dict:
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise MemvaeError(f"{where}: [{key}] must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise MemvaeError(f"{where}: unknown key {unknown[0]!r} in [{key}]; its keys: {', '.join(sorted(allowed))}")
    return table


def _cell(raw: dict, index: int, plan: dict, prior: dict, folder: Path, where: str) -> Cell:
    """One ``[[cell]]`` table -> a Cell with one Run per seed (and per earlier seed)."""
    unknown = sorted(set(raw) - CELL_KEYS)
    if unknown or "model" not in raw or not raw.get("seeds"):
        what = f"unknown key {unknown[0]!r}" if unknown else "it needs model and seeds"
        raise MemvaeError(f"{where}: cell {index + 1}: {what}; a cell's keys: {', '.join(sorted(CELL_KEYS))}")
    model = str(raw["model"])
    source = str((folder / model).resolve()) if model.endswith(".toml") else model
    overrides = [*plan.get("overrides", []), *raw.get("overrides", []), f"train.steps={plan['steps']}",
                 *(f"prior.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in prior.items())]
    if "name" in raw:
        overrides.append(f"name={raw['name']}")
    runs_dir = folder / plan.get("runs", "runs")
    earlier_seeds = list(raw.get("earlier_seeds", []))
    if earlier_seeds and "earlier" not in raw:
        raise MemvaeError(f"{where}: cell {index + 1}: earlier_seeds needs earlier (the folder of those runs)")
    runs = []
    for seed in raw["seeds"]:
        cfg = presets.load(source, [*overrides, f"train.seed={seed}"])
        cfg = at_slots(cfg, int(raw["slots"])) if "slots" in raw else cfg
        is_earlier = seed in earlier_seeds
        home = folder / raw["earlier"] if is_earlier else runs_dir
        runs.append(Run(cfg, home / f"{cfg.name}-seed{seed}", source, is_earlier))
    bits = raw.get("bits")
    label = raw.get("label") or runs[0].cfg.name
    return Cell(str(label), Path(model).stem, None if bits is None else float(bits), tuple(runs))


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file (see the module docstring); a wrong key or value is one line."""
    path = Path(path)
    raw = C.read_toml(path, "plan file")
    where = str(path)
    unknown = sorted(set(raw) - {"plan", "prior", "cell"})
    if unknown:
        raise MemvaeError(f"{where}: unknown table {unknown[0]!r}; a plan has [plan], [prior] and [[cell]]")
    plan = _table(raw, "plan", PLAN_KEYS, where)
    prior = _table(raw, "prior", PRIOR_KEYS, where)
    if not isinstance(plan.get("steps"), int) or plan["steps"] <= 0:
        raise MemvaeError(f"{where}: [plan] steps must be a whole number > 0, got {plan.get('steps')!r}")
    sets = tuple(plan.get("sets", ["test"]))
    if not sets or any(s not in SETS for s in sets):
        raise MemvaeError(f"{where}: [plan] sets must be among {', '.join(SETS)}, got {list(sets)}")
    cells = tuple(_cell(c, i, plan, prior, path.parent, where) for i, c in enumerate(raw.get("cell", [])))
    names = [r.name for c in cells for r in c.runs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise MemvaeError(f"{where}: two cells make the same run {twice[0]}")
    return Plan(path, str(plan.get("title", path.parent.name)), plan["steps"], sets,
                path.parent / plan.get("runs", "runs"), cells)


def run_missing(plan: Plan, run: Run) -> list[str]:
    """What ``run`` still lacks (:data:`memvae.experiments.row.STEPS`); an earlier run: ["eval"]
    unless its committed eval.json holds the whole test set at the plan's updates. A run
    directory made with another config is refused."""
    if run.run_dir.exists() and (run.run_dir / "config.toml").exists():
        saved = C.load_config(run.run_dir / "config.toml", saved=True)
        if C.training_dict(saved) != C.training_dict(run.cfg):
            raise MemvaeError(f"{run.run_dir} was trained with another config than {plan.path} asks for its cell")
    if run.earlier:
        evaluated = read_json(run.run_dir / "eval.json") or {}
        return [] if evaluated.get("step") == plan.steps and plan.sets[0] in evaluated else ["eval"]
    return missing_steps(run.run_dir, run.cfg, plan.sets)


def missing(plan: Plan) -> list[tuple[Run, list[str]]]:
    """Every run of the plan that lacks part of its row, in the plan's order, with what it lacks."""
    out = []
    for run in plan.all_runs():
        steps = run_missing(plan, run)
        if steps:
            out.append((run, steps))
    return out


def describe_missing(plan: Plan, todo: list[tuple[Run, list[str]]], out=None) -> None:
    """The dry run's listing: one line per incomplete run (what it lacks), then a count, on
    ``out`` (default: stdout)."""
    out = out or sys.stdout
    for run, steps in todo:
        reached = "" if "train" not in steps else f" (trained to {trained_to(run.run_dir)} of {plan.steps})"
        note = " [earlier run: its committed eval.json is missing]" if run.earlier else ""
        print(f"{run.name}: needs {', '.join(steps)}{reached}{note}", file=out)
    total = len(plan.all_runs())
    print(f"{len(todo)} of {total} runs incomplete in {plan.path}", file=out)

