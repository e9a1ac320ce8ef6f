"""The kinds of documented table (:mod:`memvae.experiments.doc_tables`): each a function
``(folder, args) -> Markdown`` over committed files. ``folder`` is the marker's first
argument (a results folder or a JSON file), ``args`` its ``key=value`` options plus
``doc_dir``, the folder of the Markdown file (for relative links).

- ``models FOLDER [from=runs|results] [models=a,b] [columns=...] [reads=all|own]``: mean ± std
  over each model's seeds, one row per read;
- ``runs FOLDER [columns=...] [runs=a,b]``: one row per committed run, its own read;
- ``rate FOLDER [from=runs|results] [models=a,b]``: the rate sweep's test NMSE, one column
  group per codebook size K (each seed, mean ± std, prior bits per index);
- ``rows FILE columns=key,...``: a JSON list of flat records (resolution.json, table.json, ...);
- ``benchmark_files FOLDER``: the machine each benchmark JSON was measured on.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from memvae.errors import MemvaeError
from memvae.experiments.doc_sources import Model, Seed, mean_std, models_of, number, table


def _metric(key: str, where: str = "test") -> Callable[[Seed, str], float | None]:
    return lambda s, read: ((getattr(s, where) or {}).get(read) or {}).get(key)


def _of_run(get: Callable[[Seed], float | None]) -> Callable[[Seed, str], float | None]:
    return lambda s, read: get(s)


# id: (header, value of a seed at a read, number format, whether it belongs to the run rather
# than to a read: such columns are filled on the model's own read's row only).
COLUMNS: dict[str, tuple[str, Callable, str, bool]] = {
    "nmse": ("test NMSE", _metric("nmse"), "nmse", False),
    "lossless": ("lossless NMSE", _metric("nmse", "lossless"), "nmse", False),
    "psnr": ("PSNR dB", _metric("psnr"), "2", False),
    "slots": ("slots used", _metric("slots_used"), "0", False),
    "perplexity": ("perplexity", _metric("perplexity"), "sig", False),
    "entropy": ("entropy bits", _metric("entropy_bits"), "sig", False),
    "max_weight": ("max weight", _metric("max_weight"), "sig", False),
    "beta": ("β", _metric("beta"), "sig", False),
    "step": ("updates", _of_run(lambda s: s.step), "0", True),
    "eval": ("NMSE, 1,000-image eval in training", _of_run(lambda s: s.eval_nmse), "nmse", True),
    "prior": ("prior bits / index", _of_run(lambda s: (s.prior or {}).get("bits_per_index")), "3", True),
    "prior_image": ("prior bits / image", _of_run(lambda s: (s.prior or {}).get("bits_per_image")), "1", True),
    "bpd": ("bits / dim", _of_run(lambda s: (s.bits_per_dim or {}).get("test")), "3", True),
    "bpd_lossless": ("lossless bits / dim", _of_run(lambda s: (s.bits_per_dim or {}).get("lossless")), "3", True),
}
REACH = "reach:"  # reach:0.1 -> "updates to 0.1" (results.json's updates_to_nmse)


def _column(name: str) -> tuple[str, Callable, str, bool]:
    if name.startswith(REACH):
        level = name[len(REACH):]
        return f"updates to {level}", _of_run(lambda s: (s.updates_to or {}).get(level)), "0", True
    if name not in COLUMNS:
        raise MemvaeError(f"no table column {name!r}; known: {', '.join(COLUMNS)}, {REACH}LEVEL")
    return COLUMNS[name]


def _list(args: dict, key: str, default: str = "") -> list[str]:
    return [v for v in args.get(key, default).split(",") if v]


def _chosen(models: dict[str, Model], names: list[str]) -> list[Model]:
    """The models named (in that order), or all of them; a name not there fails."""
    for name in names:
        if name not in models:
            raise MemvaeError(f"no model {name!r} in this folder; there are {', '.join(models)}")
    return [models[n] for n in names] if names else list(models.values())


def _cell(model: Model, column: str, read: str) -> str:
    _, get, kind, _ = _column(column)
    values = [get(s, read) for s in model.seeds]
    # A convergence level no seed reached is a result, not a missing file.
    reached = column.startswith(REACH) and any(s.updates_to is not None for s in model.seeds)
    return mean_std(values, kind, "not reached" if reached else "—")


def models_table(folder: Path, args: dict) -> str:
    """Mean ± std over each model's seeds: model, seeds, read, then the chosen columns."""
    models = _chosen(models_of(folder, args.get("from", "runs")), _list(args, "models"))
    columns = _list(args, "columns", "nmse,psnr,slots,perplexity")
    rows = []
    for model in models:
        reads = list(next((s.test for s in model.seeds if s.test), {model.read: {}}))
        if args.get("reads", "all") == "own":
            reads = [model.read]
        for i, read in enumerate(reads):
            cells = [_cell(model, c, read) if read == model.read or not _column(c)[3] else "" for c in columns]
            rows.append([model.name if i == 0 else "", str(len(model.seeds)) if i == 0 else "", read] + cells)
    return table(["model", "seeds", "read"] + [_column(c)[0] for c in columns], rows)


def runs_table(folder: Path, args: dict) -> str:
    """One row per committed run (its own read): run, then the chosen columns."""
    columns = _list(args, "columns", "step,eval,nmse,psnr,perplexity,slots")
    wanted = _list(args, "runs")
    rows = []
    for model in models_of(folder, "runs").values():
        for seed in model.seeds:
            if wanted and seed.run not in wanted:
                continue
            rows.append([seed.run] + [number(_column(c)[1](seed, model.read), _column(c)[2]) for c in columns])
    if wanted:
        rows.sort(key=lambda row: wanted.index(row[0]))
    return table(["run"] + [_column(c)[0] for c in columns], rows)


def _rate_key(name: str) -> tuple[str, int | None]:
    """"fsq-k512" -> ("fsq", 512); a continuous model's name has no -k<K>: (name, None)."""
    base, _, k = name.rpartition("-k")
    return (base, int(k)) if base and k.isdigit() else (name, None)


def rate_table(folder: Path, args: dict) -> str:
    """Test NMSE of each model's own read at each K (each seed, mean ± std) and its prior's
    bits per index; continuous models (no K) fill the first group, for scale."""
    models = models_of(folder, args.get("from", "runs"))
    by_base: dict[str, dict[int | None, Model]] = {}
    for name, model in models.items():
        base, k = _rate_key(name)
        by_base.setdefault(base, {})[k] = model
    ks = sorted({k for group in by_base.values() for k in group if k is not None})
    priors = any(s.prior for m in models.values() for s in m.seeds)
    header = ["model"]
    for k in ks:
        header += [f"K = {k:,} ({math.log2(k):g} bits), each seed", "mean ± std"] + (["prior bits / index"] if priors else [])
    rows = []
    for base in _list(args, "models") or list(by_base):
        group = by_base.get(base) or {}
        if not group:
            raise MemvaeError(f"no model {base!r} in {folder}; there are {', '.join(by_base)}")
        continuous = list(group) == [None]
        read = next(iter(group.values())).read
        label = f"{base} ({read})" if not continuous else \
            f"{base} (continuous{'' if read == 'continuous' else ', its ' + read + ' read'})"
        row = [label]
        for i, k in enumerate(ks):
            model = group.get(None if continuous and i == 0 else k)
            row += _rate_cells(model, priors)
        rows.append(row)
    return table(header, rows)


def _rate_cells(model: Model | None, priors: bool) -> list[str]:
    if model is None:
        return [""] * (3 if priors else 2)
    values = [((s.test or {}).get(model.read) or {}).get("nmse") for s in model.seeds]
    cells = [" / ".join(number(v, "nmse") for v in values), mean_std(values, "nmse")]
    if priors:
        cells.append(mean_std([(s.prior or {}).get("bits_per_index") for s in model.seeds], "3", ""))
    return cells


# rows: a key's header and number format; other keys are shown under their own name, as given.
ROW_KEYS = {
    "run": ("run", None), "step": ("step", "0"), "k": ("K", "0"), "model": ("model", None),
    "distortion": ("distortion / spread", "4"), "spacing": ("slot spacing / spread", "4"),
    "slots_used": ("slots used", "0"), "perplexity": ("perplexity", "0"), "nmse": ("NMSE", "4"),
    "rule": ("rule", None), "threshold": ("threshold", "sig"),
    "reseeded_share_last_100": ("slots re-seeded per update (last 100)", "%"),
    "generation_read": ("generation read", None),
    "test_nmse_generation_read": ("test NMSE (generation read)", "nmse"),
    "test_nmse_soft_read": ("test NMSE (soft read)", "nmse"),
    "prior_bits_per_index": ("prior NLL bits / index", "3"), "prior_bits_per_image": ("bits / image", "1"),
    "unigram_bits_per_index": ("unigram bits / index", "3"), "samples": ("samples", "link"),
}


def _row_cell(value, kind: str | None, doc_dir: Path, file: Path) -> str:
    if value is None:
        return "—"
    if kind == "link":  # a file beside the JSON, linked from the document's folder
        return f"[grid]({Path(os.path.relpath(file.parent / value, doc_dir)).as_posix()})"
    if kind == "%":
        return f"{100 * value:.1f} %"
    return number(value, kind) if kind and isinstance(value, (int, float)) else str(value)


def rows_table(file: Path, args: dict) -> str:
    """A JSON list of flat records (or a dict with a "results" list), the ``columns`` keys."""
    records = json.loads(file.read_text())
    records = records["results"] if isinstance(records, dict) else records
    columns = _list(args, "columns")
    if not columns:
        raise MemvaeError(f"a rows table of {file} needs columns=key,key,...; its records have {', '.join(records[0])}")
    doc_dir = Path(args.get("doc_dir", file.parent))
    header = [ROW_KEYS.get(c, (c, None))[0] for c in columns]
    return table(header, [[_row_cell(r.get(c), ROW_KEYS.get(c, (c, "sig"))[1], doc_dir, file) for c in columns]
                          for r in records])


def benchmark_files_table(folder: Path, args: dict) -> str:
    """Each benchmark JSON under ``folder``: what it measured, on which CPU, with how many
    torch threads, the load average when it started (where the script recorded it), the commit."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        saved = json.loads(path.read_text())
        env = saved.get("environment", {})
        load = env.get("load_average_start")
        rows.append([f"`{path.name}`", str(saved.get("benchmark", "")), env.get("cpu_model") or "not recorded",
                     # the threads the script was asked to time (a peer run times 1 and 2), not the parent's
                     str(saved.get("settings", {}).get("threads", env.get("torch_threads", "—"))),
                     f"{load[0]:.1f}" if load else "not recorded",
                     (env.get("git_commit") or "")[:7]])
    return table(["file", "benchmark", "CPU", "torch threads", "load average (1 min) at start", "commit"], rows)


def command_time_text(file: Path, args: dict) -> str:
    """One line from a benchmarks/command_time.py record: how long the command took, on which
    CPU, under which load, when, and the last line it printed that says how it ended
    (``summary=TEXT``: the last output line containing TEXT, e.g. "passed")."""
    saved = json.loads(file.read_text())
    env = saved["environment"]
    summary = args.get("summary")
    said = next((line for line in reversed(saved["output_tail"]) if summary and summary in line), None)
    note = f", {saved['note']}" if saved.get("note") else ""
    return (f"{saved['wall_seconds'] / 60:.0f} min on a {env['cpu_count']}-core {env['cpu_model']} "
            f"(load {env['load_average_start'][0]:.1f} when it started{note}; {saved['started_utc'][:10]}, "
            f"exit {saved['returncode']}" + (f": `{said.strip('= ')}`" if said else "")
            + f"; [{file.name}]({os.path.relpath(file, args['doc_dir'])}))\n")
