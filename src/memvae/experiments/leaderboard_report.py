"""The leaderboard, measured: one row per cell of a plan, from its runs' committed small files.

Every number comes from a run's files (eval.json, bits_per_dim.json), never from a
checkpoint, so that ``memvae leaderboard PLAN --report-only`` regenerates the table and the
figures on a fresh clone. Written beside the plan: leaderboard.md (the table),
leaderboard.json (every run's numbers), nmse_vs_bits.png and bpd_vs_bits.png.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from memvae.experiments.leaderboard import Cell, Plan, run_missing
from memvae.experiments.row import read_json

# The VQ-VAE paper's CIFAR-10 likelihood (van den Oord et al. 2017, section 4.1), drawn for scale.
VQVAE_PAPER_BITS_PER_DIM = 4.67


def _own_read(run) -> str:
    from memvae.networks.autoencoder import build_bottleneck

    return build_bottleneck(run.cfg.bottleneck, run.cfg.model.embedding_dim).eval_read


def machine(run) -> str:
    """What trained the run, from its meta.json: the GPU's name, else the CPU's model (recorded
    from 2026-12-07 on; earlier runs say only that it was a CPU)."""
    meta = read_json(run.run_dir / "meta.json") or {}
    if str(meta.get("device", "")).startswith("cuda"):
        return f"{meta.get('cuda') or 'a GPU'} (GPU)"
    return meta.get("cpu_model") or "a CPU whose model was not recorded"


def run_numbers(run, main_set: str = "test") -> dict:
    """One run's numbers from its small files: NMSE, PSNR and codes used of its own read on
    ``main_set`` (the test set; a guard's: the held-out training images), lossless NMSE;
    bits/dim on test and lossless and the prior's bits per position, where measured."""
    evaluated = read_json(run.run_dir / "eval.json")
    read = _own_read(run)
    test = evaluated[main_set][read]
    out = {"run": run.name, "seed": run.cfg.train.seed, "machine": machine(run), "nmse": test["nmse"], "psnr": test["psnr"]}
    if "slots_used" in test:
        out["codes_used"] = test["slots_used"]
    if "lossless" in evaluated:
        out["lossless_nmse"] = evaluated["lossless"][read]["nmse"]
    scored = read_json(run.run_dir / "bits_per_dim.json")
    if scored and scored.get("model_step") == evaluated["step"]:
        for key in ("test", "lossless"):
            if key in scored:
                out[f"bpd_{key}"] = scored[key]["bits_per_dim"]
        if scored.get("bound") and "test" in scored:
            out["prior_bits_per_position"] = scored["test"]["prior_bits_per_image"] / scored["test"]["positions"]
    return out


def _stat(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


NUMBERS = ("nmse", "psnr", "lossless_nmse", "bpd_test", "bpd_lossless", "prior_bits_per_position", "codes_used")


def cell_row(plan: Plan, cell: Cell) -> dict:
    """A cell's row: mean, std and count over its complete runs of every number (the
    incomplete ones are counted and left out)."""
    complete = [r for r in cell.runs if not run_missing(plan, r)]
    numbers = [run_numbers(r, plan.sets[0]) for r in complete]
    row = {"label": cell.label, "family": cell.family, "bits": cell.bits, "runs": numbers, "incomplete": len(cell.runs) - len(complete)}
    for key in NUMBERS:
        row[key] = _stat([n[key] for n in numbers if key in n])
    if cell.bits is None and plan.sets[0] == "test":  # a ceiling reads no codes: its slot counts are not a rate
        row["codes_used"] = None
    return row


def _cell(stat: dict | None, digits: int, of: int) -> str:
    if stat is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text + (f" ({stat['n']})" if stat["n"] != of else "")


HEADER = ("| bits / position | model | test NMSE | PSNR dB | lossless NMSE | bits / dim, test | bits / dim, lossless "
          "| prior bits / position | codes used | seeds |")


def table(rows: list[dict]) -> str:
    """The leaderboard as Markdown: cells in the plan's order; a number over fewer runs than
    the cell's seeds gives its count in brackets; ceilings (no rate) show "—" for bits."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for row in rows:
        n = len(row["runs"])
        seeds = f"{n}" + (f" (+{row['incomplete']} unfinished)" if row["incomplete"] else "")
        bits = "—" if row["bits"] is None else f"{row['bits']:g}"
        cells = [bits, f"`{row['label']}`", _cell(row["nmse"], 4, n), _cell(row["psnr"], 2, n),
                 _cell(row["lossless_nmse"], 4, n), _cell(row["bpd_test"], 3, n), _cell(row["bpd_lossless"], 3, n),
                 _cell(row["prior_bits_per_position"], 2, n), _cell(row["codes_used"], 0, n), seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_at_each_rate(rows: list[dict]) -> dict[float, dict]:
    """{bits: the row with the lowest mean test NMSE among the rows at that rate}."""
    best: dict[float, dict] = {}
    for row in rows:
        if row["bits"] is not None and row["nmse"] is not None:
            if row["bits"] not in best or row["nmse"]["mean"] < best[row["bits"]]["nmse"]["mean"]:
                best[row["bits"]] = row
    return dict(sorted(best.items()))


def choices(rows: list[dict]) -> dict[str, dict]:
    """A guard's choice: {model family: its row with the lowest mean NMSE on the guard's set},
    for the families whose every setting has all its runs (a choice among some is none)."""
    unfinished = {r["family"] for r in rows if r["incomplete"] or r["nmse"] is None}
    best: dict[str, dict] = {}
    for row in rows:
        if row["family"] not in unfinished and (row["family"] not in best
                                                or row["nmse"]["mean"] < best[row["family"]]["nmse"]["mean"]):
            best[row["family"]] = row
    return best


def choice_table(rows: list[dict], set_name: str) -> str:
    """A guard's table: each setting's NMSE and codes used on ``set_name``, the chosen one
    of each model marked."""
    chosen = {id(row) for row in choices(rows).values()}
    lines = [f"| model | setting | NMSE, {set_name} | PSNR dB | codes used | seeds | chosen |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        n = len(row["runs"])
        seeds = f"{n}" + (f" (+{row['incomplete']} unfinished)" if row["incomplete"] else "")
        lines.append(f"| {row['family']} | `{row['label']}` | {_cell(row['nmse'], 4, n)} | {_cell(row['psnr'], 2, n)} "
                     f"| {_cell(row['codes_used'], 0, n)} | {seeds} | {'**yes**' if id(row) in chosen else ''} |")
    return "\n".join(lines) + "\n"


def rows_of(plan: Plan) -> list[dict]:
    return [cell_row(plan, cell) for cell in plan.cells]


def markdown(plan: Plan, rows: list[dict]) -> str:
    """The plan's table: the leaderboard, or a guard's choices when its rows are measured on
    held-out training images."""
    return table(rows) if plan.sets[0] == "test" else choice_table(rows, plan.sets[0])


def write_report(plan: Plan) -> list[Path]:
    """Write leaderboard.md and leaderboard.json beside the plan, and for a leaderboard (rows
    on the test set) its two figures; returns the files written."""
    from memvae.experiments.leaderboard_figures import bits_per_dim_figure, nmse_figure

    rows = rows_of(plan)
    folder = plan.path.parent
    written = [folder / "leaderboard.md", folder / "leaderboard.json"]
    written[0].write_text(markdown(plan, rows))
    written[1].write_text(json.dumps({"steps": plan.steps, "sets": plan.sets, "cells": rows}, indent=1) + "\n")
    if plan.sets[0] == "test":
        written += [folder / "nmse_vs_bits.png", folder / "bpd_vs_bits.png"]
        nmse_figure(rows, written[2], plan.steps)
        bits_per_dim_figure(rows, written[3], plan.steps, VQVAE_PAPER_BITS_PER_DIM)
    return written


# The documents' generated blocks (memvae.experiments.doc_tables): each takes the folder of a
# plan (its plan.toml) and the block's options, and reads only the committed files.
def _plan_in(folder: Path) -> Plan:
    from memvae.experiments.leaderboard import load_plan

    return load_plan(Path(folder) / "plan.toml")


def table_for(folder: Path, args: dict | None = None) -> str:
    """The plan's table (:func:`markdown`)."""
    plan = _plan_in(folder)
    return markdown(plan, rows_of(plan))


def _ceiling(rows: list[dict], family: str) -> dict | None:
    return next((r for r in rows if r["bits"] is None and r["family"] == family and r["nmse"]), None)


def summary(rows: list[dict]) -> str:
    """The leaderboard's headline as Markdown bullets: at each rate the model with the lowest
    mean test NMSE (over its complete seeds), and how many times the continuous ceilings'
    NMSE it is (the study's soft read ``memory_l2``, and ``none``, no bottleneck); then the
    rate's cells that have no complete run yet, since the best so far is not the best of all."""
    soft, none = _ceiling(rows, "memory_l2"), _ceiling(rows, "none")
    best = best_at_each_rate(rows)
    lines = []
    for bits in sorted({r["bits"] for r in rows if r["bits"] is not None}):
        unmeasured = [f"`{r['label']}`" for r in rows if r["bits"] == bits and not r["nmse"]]
        row = best.get(bits)
        if row is None:
            lines.append(f"- **{bits:g} bits per position**: not measured yet ({', '.join(unmeasured)}).")
            continue
        n, seeds = row["nmse"]["n"], len(row["runs"]) + row["incomplete"]
        text = (f"- **{bits:g} bits per position**: `{row['label']}`, test NMSE {row['nmse']['mean']:.4f}"
                f" ({n} of {seeds} seeds)")
        level = [f"`{r['label']}` {r['nmse']['mean']:.4f}" for r in rows if r is not row and r["bits"] == bits
                 and r["nmse"] and r["nmse"]["mean"] - row["nmse"]["mean"] <= max(r["nmse"]["std"], row["nmse"]["std"])]
        if level:  # a lead smaller than the seeds' spread is not a lead
            text += f", level with {', '.join(level)} (a difference inside the seeds' spread)"
        ratios = [f"{row['nmse']['mean'] / c['nmse']['mean']:.1f} times `{c['family']}`'s {c['nmse']['mean']:.4f}"
                  for c in (soft, none) if c]
        text += ("; " + " and ".join(ratios) if ratios else "") + "."
        if unmeasured:
            text += f" Not measured yet: {', '.join(unmeasured)}."
        lines.append(text)
    return "\n".join(lines) + "\n"


def summary_for(folder: Path, args: dict | None = None) -> str:
    """The plan's headline (:func:`summary`)."""
    return summary(rows_of(_plan_in(folder)))


def machines(rows: list[dict]) -> str:
    """Which machine trained each counted run, as Markdown bullets: one per machine (in the
    order first met), naming each cell's seeds it trained."""
    by_machine: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        for run in row["runs"]:
            by_machine.setdefault(run["machine"], {}).setdefault(row["label"], []).append(run["seed"])
    lines = []
    for name, cells in by_machine.items():
        runs = sum(len(seeds) for seeds in cells.values())
        listed = "; ".join(f"`{label}` seed{'s' * (len(seeds) > 1)} {', '.join(map(str, sorted(seeds)))}"
                           for label, seeds in cells.items())
        lines.append(f"- {name}, {runs} run{'s' * (runs > 1)}: {listed}")
    return "\n".join(lines) + "\n"


def machines_for(folder: Path, args: dict | None = None) -> str:
    """The plan's machines (:func:`machines`)."""
    return machines(rows_of(_plan_in(folder)))


def state_for(folder: Path, args: dict | None = None) -> str:
    """What of the plan is still to run: the count of complete runs and one line per
    incomplete run with the steps it lacks."""
    from memvae.experiments.leaderboard import missing

    plan = _plan_in(folder)
    todo = missing(plan)
    total = len(plan.all_runs())
    if not todo:
        return f"All {total} runs complete: nothing is left to run.\n"
    lines = [f"{total - len(todo)} of {total} runs complete; still to run, in the plan's order:", ""]
    lines += [f"- `{run.name}`: {', '.join(steps)}" for run, steps in todo]
    return "\n".join(lines) + "\n"
