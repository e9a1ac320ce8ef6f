"""The study's experiment as one call: train several models alike, then measure and draw them.

Layout of the output directory::

    runs/<model>-seed<s>/   one run directory per model and seed (see memvae.runs)
    convergence.png         training NMSE (log) and perplexity against update
    reconstructions.png     the same test images, original and every model's reads
    results.json            every measured number, per model, per read, per seed
    results.md              the same as a table (mean ± std over seeds)
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from tqdm import tqdm

from memvae import config as C, presets
from memvae.checkpoint import latest_checkpoint
from memvae.data import ImageData, load_array_images, load_data
from memvae.errors import MemvaeError
from memvae.evaluate import evaluate_model, reads_of, reconstructions
from memvae.metrics import read_metrics
from memvae.plots import convergence_figure, reconstruction_grid
from memvae.runs import load_run
from memvae.train import train

NMSE_LEVELS = (0.20, 0.10, 0.08, 0.06)
DEFAULT_MODELS = ("vq", "vq_ema", "memory_l2", "memory_cosine", "memory_l2_write")


def updates_to_reach(records: list[dict], levels=NMSE_LEVELS) -> dict[str, int | None]:
    """For each NMSE level, the first logged update whose training NMSE (the average over
    the log interval ending there) is at or below it; None when never reached."""
    result = {}
    for level in levels:
        hit = next((r["step"] for r in sorted(records, key=lambda r: r["step"]) if r["train_nmse"] <= level), None)
        result[f"{level:g}"] = hit
    return result


def _model_config(model: str, config_dir: Path | None, steps: int, seed: int, overrides: list[str]) -> C.Config:
    """The config of ``model`` for one seed: a TOML path, or a name looked up in
    ``config_dir`` when one is given, else among the packaged configs (memvae.presets)."""
    overrides = [*overrides, f"train.steps={steps}", f"train.seed={seed}"]
    if config_dir is None:
        return presets.load(model, overrides)
    if model.endswith(".toml"):
        return C.load_config(model, overrides)  # a missing file fails with its own message
    if not config_dir.is_dir():
        raise MemvaeError(f"config folder {config_dir} does not exist")
    path = config_dir / f"{model}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in config_dir.glob("*.toml"))) or f"none ({config_dir} holds no .toml files)"
        raise MemvaeError(f"no config for model {model!r} ({path}); known: {known}")
    return C.load_config(path, overrides)


def _run_state(run_dir: Path, cfg: C.Config) -> str:
    """"new", "partial" (resume or extend it) or "done"; a run made with another config is refused."""
    found = latest_checkpoint(run_dir / "checkpoints") if run_dir.exists() else None
    if found is None:
        return "new"
    # The thread count may differ (train() keeps the count a run was trained with unless
    # train.threads asks for another, and then says in one line from which update the
    # numbers differ), and a shorter run may be extended (resuming is exact); everything
    # else must match.
    saved, wanted = C.to_dict(C.load_config(run_dir / "config.toml")), C.to_dict(cfg)
    for d in (saved, wanted):
        d["train"].pop("threads")
        d["train"].pop("steps")
    if saved != wanted:
        raise MemvaeError(f"{run_dir} was trained with a different config; remove it or choose another --out")
    step = found[1]["step"]
    if step > cfg.train.steps:
        raise MemvaeError(f"{run_dir} is already trained past {cfg.train.steps} updates (to {step}); choose another --out")
    return "done" if step == cfg.train.steps else "partial"


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


def compare(
    out: str | os.PathLike,
    models=DEFAULT_MODELS,
    steps: int = 25000,
    seeds: int = 1,
    data_dir: str | None = None,
    config_dir: str | os.PathLike | None = None,
    lossless: str | None = None,
    overrides: list[str] = (),
    images_shown: int = 10,
    show_progress: bool = True,
    test_images: int | None = None,
) -> dict:
    """Train every model × seed (skipping finished runs, resuming partial ones), evaluate
    each on the whole test set (or its first ``test_images``, for a quick look), and write
    the figures and tables; returns results.json's dict."""
    out = Path(out)
    config_dir = None if config_dir is None else Path(config_dir)  # None: the packaged configs
    plan = []
    for model in models:
        for seed in range(seeds):
            cfg = _model_config(model, config_dir, steps, seed, list(overrides))
            plan.append((cfg, out / "runs" / f"{cfg.name}-seed{seed}"))
    names = [cfg.name for cfg, _ in plan]
    if len(set(names)) * seeds != len(names):
        raise MemvaeError(f"two models share a config name: {names}")

    first = plan[0][0].data
    data = load_data(first.source, data_dir or first.dir or None, first.image_size)  # once for all runs
    overall = tqdm(total=len(plan) * steps, desc="compare", disable=not show_progress, position=0, dynamic_ncols=True)
    for cfg, run_dir in plan:
        state = _run_state(run_dir, cfg)
        if state != "done":
            train(cfg, run_dir, resume=state == "partial", data=data, show_progress=show_progress)
        overall.update(steps)
    overall.close()
    return report(out, plan, data, lossless, images_shown, test_images)


def report(out: Path, plan: list[tuple[C.Config, Path]], data: ImageData, lossless, images_shown: int,
           test_images: int | None = None) -> dict:
    """Evaluate the finished runs of ``plan`` and write figures and tables into ``out``."""
    variance = data.train_variance()
    test = data.test[:test_images] if test_images else data.test
    lossless_images = load_array_images(lossless) if lossless else None
    shown = data.test[:images_shown]
    by_model: dict[str, list] = {}
    grid = [("original", shown)]
    curves: dict[str, list] = {}
    for cfg, run_dir in plan:
        model, _, state = load_run(run_dir)
        eval_path = run_dir / "eval.json"
        cached = json.loads(eval_path.read_text()) if eval_path.exists() else None
        if (cached is None or cached.get("step") != state["step"] or ("lossless" in cached) != bool(lossless)
                or cached["test"][reads_of(model)[0]]["images"] != len(test)):
            cached = {"run_dir": str(run_dir), "step": int(state["step"]), "train_variance": variance,
                      "test": evaluate_model(model, test, variance)}
            if lossless_images is not None:
                cached["lossless"] = evaluate_model(model, lossless_images, variance)
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
        by_model.setdefault(cfg.name, []).append(seed_result)
        curves.setdefault(cfg.name, []).append(records)
        if cfg.train.seed == 0:
            for read, recon in reconstructions(model, shown).items():
                grid.append((cfg.name if read == "nearest" else f"{cfg.name} ({read})", recon))

    steps = plan[0][0].train.steps
    seeds = len(plan) // len(by_model)
    title = f"CIFAR-10, {steps} updates, {seeds} seed{'s' if seeds > 1 else ''}"
    convergence_figure(curves, out / "convergence.png", title=title)
    reconstruction_grid(grid, out / "reconstructions.png", title=f"test images 0..{images_shown - 1}, {steps} updates")
    results = {
        "steps": steps,
        "seeds": seeds,
        "nmse_levels": list(NMSE_LEVELS),
        "test_images": len(test),
        "models": {name: {"seeds": runs, "summary": _summarise(runs)} for name, runs in by_model.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
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
    header = ["model", "read", "test NMSE", "PSNR dB", "perplexity", "slots used", "entropy bits", "max weight", "β"]
    header += [f"updates to {x}" for x in levels] + ["s / update"]
    has_lossless = any("lossless" in m["summary"] for m in results["models"].values())
    if has_lossless:
        header.insert(3, "lossless NMSE")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, model in results["models"].items():
        summary = model["summary"]
        for read, metrics in summary["test"].items():
            if read == "hard_gap":
                continue
            row = [name, read, _fmt(metrics.get("nmse")), _fmt(metrics.get("psnr")), _fmt(metrics.get("perplexity"), 3),
                   _fmt(metrics.get("slots_used"), 0), _fmt(metrics.get("entropy_bits"), 3),
                   _fmt(metrics.get("max_weight"), 3), _fmt(metrics.get("beta"), 3)]
            first_read = read == next(iter(summary["test"]))
            # Convergence and speed belong to the run, not to a read: shown once per model.
            row += [_fmt(summary["updates_to_nmse"].get(x), 0) if first_read else "" for x in levels]
            row.append(_fmt(summary["seconds_per_update"], 3) if first_read else "")
            if has_lossless:
                row.insert(3, _fmt(summary.get("lossless", {}).get(read, {}).get("nmse")))
            lines.append("| " + " | ".join(row) + " |")
    caption = (
        f"\n{results['steps']} updates, {results['seeds']} seed(s), mean ± std over seeds. Test metrics on "
        f"{results['test_images']} test images; perplexity and slots used from slot counts over the whole set. 'updates to x': first "
        "logged update whose training NMSE (average over the log interval) is ≤ x. s / update: training time only, "
        "on the machine named in the run's meta.json.\n"
    )
    return "\n".join(lines) + "\n" + caption
