"""The rate sweep: every discrete model at several codebook sizes K, beside the continuous ones.

A discrete model at K codes passes log2 K bits per position; its measured rate is its
prior's test bits per index (``memvae prior``). :func:`at_slots` derives a model's config
at one K; :func:`collect` and :func:`rate_tables` turn compare's results (and the priors
fitted in the run directories) into one table per K, and
:func:`memvae.experiments.plots.rate_distortion_figure` into the distortion-rate figure. Continuous
models (the control ``none``, the study's soft read) have no rate: they are trained once
and drawn as horizontal lines.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from memvae.config import schema as C
from memvae.errors import MemvaeError

def is_discrete(cfg: C.Config) -> bool:
    """Whether the model's own read at test is one of K codes per position, as its
    bottleneck declares it (the continuous control and the soft memory read are not)."""
    from memvae.networks.autoencoder import build_bottleneck  # torch, only when a sweep is planned

    return bool(build_bottleneck(cfg.bottleneck, cfg.model.embedding_dim).discrete)


def at_slots(cfg: C.Config, slots: int) -> C.Config:
    """``cfg`` with K = ``slots`` codes, named ``<name>-k<K>``, as its bottleneck kind derives
    it (FSQ picks its levels); a K that the kind cannot take fails with one line."""
    from memvae.quantizers import bottleneck_class

    try:
        b = bottleneck_class(cfg.bottleneck.kind).at_slots(cfg.bottleneck, slots)
    except ValueError as exc:
        raise MemvaeError(str(exc)) from None
    return C.validate(dataclasses.replace(cfg, name=f"{cfg.name}-k{slots}", bottleneck=b))


def parse_slots(text: str) -> list[int]:
    """"64,512,4096" -> [64, 512, 4096]; anything else fails with one line."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 2 or len(set(values)) != len(values):
        raise MemvaeError(f"--slots must be distinct whole numbers >= 2 separated by commas, got {text!r}")
    return values


def _prior(run_dir: Path) -> dict | None:
    path = run_dir / "prior" / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def collect(results: dict, run_dirs: dict[str, list[Path]]) -> dict:
    """compare's results + priors -> {model name: {"k", "base", "read", "nmse", "psnr", ...}}.

    ``run_dirs`` maps a config name (``fsq-k64``) to its runs' directories, in seed order.
    Each entry holds mean/std over seeds of the model's own test read, and the prior's
    bits per index and per image over the runs that have a fitted prior.
    """
    rows = {}
    for name, model in results["models"].items():
        read = model["read"]
        summary = model["summary"]["test"][read]  # mean/std/n over seeds, as compare computed them
        priors = [p for p in map(_prior, run_dirs[name]) if p is not None]
        row = {"k": model.get("k"), "base": model.get("base", name), "read": read, "seeds": len(model["seeds"]),
               **{key: summary[key] for key in ("nmse", "psnr", "slots_used", "perplexity") if key in summary}}
        if priors:
            row["prior_bits_per_index"] = _stat([p["bits_per_index"] for p in priors])
            row["prior_bits_per_image"] = _stat([p["bits_per_image"] for p in priors])
        # Bits per dimension (memvae bpd), as compare summarised them over the runs that have them.
        bpd = {key: stat for key, stat in model["summary"].get("bits_per_dim", {}).items() if stat.get("mean") is not None}
        if bpd:
            row["bits_per_dim"] = bpd
            row["bits_per_dim_bound"] = model.get("bits_per_dim_bound", True)
        rows[name] = row
    return rows


def _fmt(stat: dict | None, digits: int) -> str:
    if not stat:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


BPD_COLUMNS = {"test": "bits / dim", "lossless": "lossless bits / dim", "test_uniform": "bits / dim, uniform prior"}


def _bpd(row: dict | None, key: str) -> str:
    """A row's bits/dim ``key`` (mean ± std, 3 decimals; the runs it is over when fewer than
    the row's seeds), marked when it is a continuous model's decoder term alone."""
    stat = (row or {}).get("bits_per_dim", {}).get(key)
    if not stat:
        return "—"
    text = f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["n"] > 1 else "")
    if stat["n"] < row["seeds"]:
        text += f" (n = {stat['n']})"
    return text + ("" if row.get("bits_per_dim_bound", True) else " (not a bound)")


def _bpd_tables(rows: dict, ks: list[int], steps: int) -> list[str]:
    """The glance tables of bits per dimension at each rate, one per image set that any
    row has (none: no lines at all)."""
    lines = []
    for key, title in (("test", "the test set"), ("lossless", "the lossless originals")):
        if not any(key in r.get("bits_per_dim", {}) for r in rows.values()):
            continue
        lines += [f"### Bits per dimension at each rate, {title}, {steps} updates (mean ± std over the runs measured)", "",
                  "| model | " + " | ".join(f"K = {k} ({math.log2(k):g} bits)" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for base in dict.fromkeys(r["base"] for r in rows.values() if r["k"] is not None):
            cells = [_bpd(next((r for r in rows.values() if r["base"] == base and r["k"] == k), None), key) for k in ks]
            lines.append(f"| {base} | " + " | ".join(cells) + " |")
        for r in (r for r in rows.values() if r["k"] is None):
            lines.append(f"| {r['base']} (continuous) | " + " | ".join([_bpd(r, key)] * len(ks)) + " |")
        lines.append("")
    return lines


def rate_tables(rows: dict, steps: int, test_images: int) -> str:
    """One markdown table per K (rows: each discrete model at that K, then the continuous
    models for reference), the models' own test reads, mean ± std over seeds."""
    header = ["model", "seeds", "read", "bits / position", "test NMSE", "PSNR dB", "slots used", "perplexity",
              "prior bits / index", "prior bits / image"]
    # Bits per dimension only where a run has them (memvae bpd): the tables stay as they were otherwise.
    bpd_keys = [key for key in BPD_COLUMNS if any(key in r.get("bits_per_dim", {}) for r in rows.values())]
    header += [BPD_COLUMNS[key] for key in bpd_keys]
    continuous = [(n, r) for n, r in rows.items() if r["k"] is None]
    ks = sorted({r["k"] for r in rows.values() if r["k"] is not None})
    # First the answer at a glance: test NMSE of each model at each rate.
    lines = [f"### Test NMSE at each rate, {steps} updates (mean ± std over seeds; n = seeds)", "",
             "| model | " + " | ".join(f"K = {k} ({math.log2(k):g} bits)" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for base in dict.fromkeys(r["base"] for r in rows.values() if r["k"] is not None):
        cells = []
        for k in ks:
            r = next((r for r in rows.values() if r["base"] == base and r["k"] == k), None)
            cells.append(f"{_fmt(r['nmse'], 4)} (n = {r['seeds']})" if r else "—")
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    for _, r in continuous:
        label = f"{r['base']} (continuous)" if r["read"] == "continuous" else f"{r['base']} (continuous: its {r['read']} read)"
        lines.append(f"| {label} | " + " | ".join(
            [f"{_fmt(r['nmse'], 4)} (n = {r['seeds']})"] * len(ks)) + " |")
    lines.append("")
    lines += _bpd_tables(rows, ks, steps)
    for k in ks:
        lines += [f"### K = {k} ({math.log2(k):g} bits per position), {steps} updates", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, r in [(n, r) for n, r in rows.items() if r["k"] == k] + continuous:
            bits = f"{math.log2(k):g}" if r["k"] else "continuous"
            lines.append("| " + " | ".join([
                r["base"], str(r["seeds"]), r["read"], bits, _fmt(r["nmse"], 4), _fmt(r["psnr"], 2),
                _fmt(r.get("slots_used"), 0), _fmt(r.get("perplexity"), 0),
                _fmt(r.get("prior_bits_per_index"), 3), _fmt(r.get("prior_bits_per_image"), 1)]
                + [_bpd(r, key) for key in bpd_keys]) + " |")
        lines.append("")
    lines.append(f"Test metrics on {test_images} test images with each model's own read (the one a prior generates "
                 "from; the continuous models' is not discrete). Prior bits: test NLL of the PixelCNN fitted "
                 "in each run directory (`memvae prior`), over the runs that have one."
                 + (" Bits / dim: `memvae bpd RUN_DIR` (prior bits of the codes + a discretised Gaussian decoder "
                    "likelihood, σ per channel fitted on training images, over 3·H·W); uniform prior: the codes at their "
                    "fixed rate; '(not a bound)': a continuous model's decoder term alone." if bpd_keys else ""))
    return "\n".join(lines) + "\n"
