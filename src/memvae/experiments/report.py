"""What a comparison measured, written down: each finished run evaluated (its eval.json), the
convergence and reconstruction figures, results.json and results.md (mean ± std over seeds),
and the rate sweep's tables; :func:`memvae.experiments.compare.compare` calls :func:`report`
once its runs have trained (or with ``--report-only``)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from memvae.config import schema as C
from memvae.data import ImageData, load_array_images
from memvae.errors import MemvaeError
from memvae.experiments.plots import convergence_figure, rate_distortion_figure, reconstruction_grid
from memvae.experiments.sweep import collect, rate_tables
from memvae.networks.autoencoder import Autoencoder
from memvae.training.checkpoint import latest_checkpoint
from memvae.training.evaluate import evaluation_record, is_gap, reads_of, reconstructions
from memvae.training.metrics import read_metrics
from memvae.training.runlock import run_lock
from memvae.training.runs import load_run

NMSE_LEVELS = (0.20, 0.10, 0.08, 0.06)


def updates_to_reach(records: list[dict], levels=NMSE_LEVELS) -> dict[str, int | None]:
    """For each NMSE level, the first logged update whose training NMSE (the average over
    the log interval ending there) is at or below it; None when never reached."""
    result = {}
    for level in levels:
        hit = next((r["step"] for r in sorted(records, key=lambda r: r["step"]) if r["train_nmse"] <= level), None)
        result[f"{level:g}"] = hit
    return result



def _mean_std(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else 0.0 if present else None,
        "values": values,
        "n": len(present),
    }


def _summarise(per_seed: list[dict]) -> dict:
    """Nested dicts of numbers, one per seed -> the same shape with mean/std/values leaves."""
    first = per_seed[0]
    out = {}
    for key, value in first.items():
        items = [s.get(key) for s in per_seed]
        if isinstance(value, dict):
            out[key] = _summarise(items)
        elif isinstance(value, (int, float)) or value is None:
            out[key] = _mean_std(items)
    return out



BPD_FILE = "bits_per_dim.json"  # memvae.prior.bits_per_dim.BPD_FILE, named here without importing the measurement
BPD_KEYS = ("test", "test_uniform", "lossless", "lossless_uniform")


BPD_CAPTION = (
    "bits / dim: `memvae bpd RUN_DIR` (its bits_per_dim.json): the prior's bits of the image's codes plus the "
    "image's bits under a discretised Gaussian around the decoder's output (σ per channel fitted on training "
    "images), over 3·H·W, on the images that command scored (the whole test set unless told otherwise; lossless: "
    "the lossless originals, σ fitted on their own training images). '(not a bound)': a continuous model's "
    "decoder term alone.")


def run_bits_per_dim(run_dir: Path, step: int) -> tuple[dict, bool] | None:
    """A run's bits per dimension from the RUN_DIR/bits_per_dim.json that ``memvae bpd``
    wrote: ({"test", "test_uniform", "lossless", "lossless_uniform": bits/dim or None},
    whether it is a bound), or None when there is none, or it is of another update than
    ``step`` (the run trained on since: said on stderr, and left out)."""
    path = run_dir / BPD_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("model_step") != step:
        print(f"{run_dir.name}: {BPD_FILE} is of update {saved.get('model_step')}, not {step}: left out "
              f"(run `memvae bpd {run_dir}` again)", file=sys.stderr)
        return None
    numbers = {}
    for key in BPD_KEYS:
        scored = saved.get(key.removesuffix("_uniform")) or {}
        numbers[key] = scored.get("uniform_bits_per_dim" if key.endswith("_uniform") else "bits_per_dim")
    return numbers, bool(saved.get("bound"))


def bits_per_dim_cell(stat: dict | None, bound: bool = True) -> str:
    """A bits/dim mean ± std (3 decimals), marked when it is the decoder term alone."""
    if not stat or stat.get("mean") is None:
        return "—"
    text = f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["n"] > 1 else "")
    missed = stat["n"] < len(stat["values"])
    return text + (f" ({stat['n']}/{len(stat['values'])} runs)" if missed else "") + ("" if bound else " (not a bound)")


def report(out: Path, plan: list[tuple[C.Config, Path]], data: ImageData, lossless, images_shown: int,
           test_images: int | None = None, training: dict | None = None, sweep: bool = False) -> dict:
    """Evaluate the finished runs of ``plan`` and write figures and tables into ``out``;
    ``training`` (jobs, runs trained, wall seconds of this call's training) is recorded too;
    ``sweep``: also the rate sweep's tables and figure (see :func:`memvae.experiments.compare.compare`)."""
    variance = data.train_variance()
    test = data.test[:test_images] if test_images else data.test
    lossless_images = load_array_images(lossless) if lossless else None
    shown = data.test[:images_shown]
    by_model: dict[str, list] = {}
    about: dict[str, dict] = {}  # per model: its own read, whether discrete, K and base name in a sweep
    run_dirs: dict[str, list[Path]] = {}
    grid = [("original", shown)]
    curves: dict[str, list] = {}
    seeds_of: dict[str, list[int]] = {}  # each model's runs' seeds, in the order of curves: the titles name them
    for cfg, run_dir in plan:
        eval_path = run_dir / "eval.json"
        cached = json.loads(eval_path.read_text()) if eval_path.exists() else None
        collected = latest_checkpoint(run_dir / "checkpoints") is None  # small files only (compare._run_state)
        # A collected run's untrained model only answers what its bottleneck declares.
        if collected:
            model, state = Autoencoder.from_config(cfg), cached
        else:
            model, _, state = load_run(run_dir)
        stale = (cached is None or cached.get("step") != state["step"] or ("lossless" in cached) != bool(lossless)
                 or cached["test"][reads_of(model)[0]]["images"] != len(test))
        if stale and collected:
            raise MemvaeError(f"{run_dir} holds no checkpoint to evaluate again, and its eval.json is not of "
                              f"{len(test)} test images{' with --lossless' if lossless else ''}")
        if stale:
            with run_lock(run_dir, create=False):  # eval.json goes into the run: one writer (memvae.training.runlock)
                sets = {"test": test, **({"lossless": lossless_images} if lossless_images is not None else {})}
                cached = evaluation_record(run_dir, state["step"], model, sets, variance)
                eval_path.write_text(json.dumps(cached, indent=1))
        records = read_metrics(run_dir)
        last = records[-1]
        seed_result = {
            "test": cached["test"],
            "updates_to_nmse": updates_to_reach(records),
            "seconds_per_update": last["train_seconds"] / last["step"],
            "final_train_nmse": last["train_nmse"],
        }
        if "lossless" in cached:
            seed_result["lossless"] = cached["lossless"]
        bpd = run_bits_per_dim(run_dir, int(state["step"]))
        if bpd is not None:
            seed_result["bits_per_dim"], bound = bpd
        by_model.setdefault(cfg.name, []).append(seed_result)
        if cfg.name not in about:
            own = model.bottleneck.eval_read
            about[cfg.name] = {"read": own, "discrete": bool(model.bottleneck.discrete), "k": model.bottleneck.codebook_size
                               if sweep and model.bottleneck.discrete else None, "base": cfg.name.rsplit("-k", 1)[0]
                               if sweep and model.bottleneck.discrete else cfg.name}
        if bpd is not None:
            about[cfg.name].setdefault("bits_per_dim_bound", bound)
        run_dirs.setdefault(cfg.name, []).append(run_dir)
        curves.setdefault(cfg.name, []).append(records)
        seeds_of.setdefault(cfg.name, []).append(cfg.train.seed)
        if cfg.train.seed == plan[0][0].train.seed and not collected:  # the grid shows the first seed's models
            for read, recon in reconstructions(model, shown).items():  # each row named by its run folder
                grid.append((run_dir.name if read == "nearest" else f"{run_dir.name} ({read})", recon))

    for runs in by_model.values():  # bits/dim of some seeds only: the others' count as missing
        if any("bits_per_dim" in r for r in runs):
            for r in runs:
                r.setdefault("bits_per_dim", dict.fromkeys(BPD_KEYS))
    steps = plan[0][0].train.steps
    seeds = max(map(len, by_model.values()))  # report_only may find fewer for some models
    convergence_figure(curves, out / "convergence.png", title=f"CIFAR-10, {steps} updates", seeds=seeds_of)
    if len(grid) > 1:  # collected runs (no model here) leave a grid drawn earlier in place
        reconstruction_grid(grid, out / "reconstructions.png", caption=(
            f"CIFAR-10 test images 0–{images_shown - 1} (top row) reconstructed by each model's seed-"
            f"{plan[0][0].train.seed} run after {steps} updates; each row is named by its run's folder (runs/ beside this figure)"))
    results = {
        "steps": steps,
        "seeds": seeds,
        "nmse_levels": list(NMSE_LEVELS),
        "test_images": len(test),
        "models": {name: {**about[name], "seeds": runs, "summary": _summarise(runs)} for name, runs in by_model.items()},
    }
    if training is not None:
        results["training"] = training
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    if sweep:
        rows = collect(results, run_dirs)
        (out / "rate_distortion.md").write_text(rate_tables(rows, steps, len(test)))
        rate_distortion_figure(rows, out / "rate_distortion.png", steps, f"first {len(test):,} test images"
                               if len(test) < len(data.test) else f"whole test set, {len(test):,} images",
                               seeds=[s for runs in seeds_of.values() for s in runs])
    return results


def _fmt(stat: dict | None, digits: int = 4) -> str:
    """mean (± std over seeds) with ``digits`` significant digits; 0 digits: a whole number."""
    if not stat or not stat.get("values"):
        return "—"
    if stat["mean"] is None:
        return "not reached"
    if digits == 0:
        text = f"{stat['mean']:.0f}" + (f" ± {stat['std']:.0f}" if stat["n"] > 1 else "")
    else:
        text = f"{stat['mean']:.{digits}g}" + (f" ± {stat['std']:.2g}" if stat["n"] > 1 else "")
    missed = stat["n"] < len(stat["values"])
    return text + (f" ({stat['n']}/{len(stat['values'])} runs)" if missed else "")


def results_table(results: dict) -> str:
    """results.json's dict -> a markdown table, one row per model and read."""
    levels = [f"{x:g}" for x in results["nmse_levels"]]
    # The bottlenecks' own numbers (entropy, β, ...) follow the common ones, as they appear.
    common = {"images", "mse", "nmse", "psnr", "perplexity", "slots_used"}
    extra = list({key: None for m in results["models"].values() for read, metrics in m["summary"]["test"].items()
                  if not is_gap(read) for key in metrics if key not in common})
    header = ["model", "seeds", "read", "test NMSE", "PSNR dB", "perplexity", "slots used"] + [k.replace("_", " ") for k in extra]
    header += [f"updates to {x}" for x in levels] + ["s / update"]
    has_lossless = any("lossless" in m["summary"] for m in results["models"].values())
    bpd_sets = [which for which in ("test", "lossless") if any(
        (m["summary"].get("bits_per_dim", {}).get(which) or {}).get("mean") is not None for m in results["models"].values())]
    header += [f"{which} bits / dim" for which in bpd_sets]
    if has_lossless:
        header.insert(4, "lossless NMSE")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, model in results["models"].items():
        summary = model["summary"]
        for read, metrics in summary["test"].items():
            if is_gap(read):
                continue
            first_read = read == next(iter(summary["test"]))
            row = [name, str(len(model["seeds"])) if first_read else "", read, _fmt(metrics.get("nmse")), _fmt(metrics.get("psnr")), _fmt(metrics.get("perplexity"), 3),
                   _fmt(metrics.get("slots_used"), 0)] + [_fmt(metrics.get(k), 3) for k in extra]
            # Convergence and speed belong to the run, not to a read: shown once per model.
            row += [_fmt(summary["updates_to_nmse"].get(x), 0) if first_read else "" for x in levels]
            row.append(_fmt(summary["seconds_per_update"], 3) if first_read else "")
            # Bits per dimension are of the model's own read (the one its codes decode to), on its row.
            own = read == model.get("read", next(iter(summary["test"])))
            bound = model.get("bits_per_dim_bound", True)
            row += [bits_per_dim_cell(summary.get("bits_per_dim", {}).get(which), bound) if own else ""
                    for which in bpd_sets]
            if has_lossless:
                row.insert(4, _fmt(summary.get("lossless", {}).get(read, {}).get("nmse")))
            lines.append("| " + " | ".join(row) + " |")
    caption = (
        f"\n{results['steps']} updates, mean ± std over each model's seeds. Test metrics on "
        f"{results['test_images']} test images; perplexity and slots used from slot counts over the whole set. 'updates to x': first "
        "logged update whose training NMSE (average over the log interval) is ≤ x. s / update: training time only, "
        "on the machine named in the run's meta.json.\n"
    )
    if bpd_sets:
        caption = caption[:-1] + " " + BPD_CAPTION + "\n"
    return "\n".join(lines) + "\n" + caption
