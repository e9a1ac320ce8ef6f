"""Each model as a discrete latent generative model: the table of issues 4 and 11.

For each run directory (trained, evaluated by `memvae compare` or `memvae eval`, so that it
holds eval.json): fit the PixelCNN prior over its slot maps (unless already fitted), draw
a grid of samples, and tabulate test NMSE and PSNR with the read that generation uses (the
slot rows themselves: nearest slot for VQ and FSQ, the hard read for memory models), the
soft read's NMSE for reference, slots used, perplexity and the prior's test NLL. Runs of
one config with several seeds are also summarised as mean ± std (summary.md), and the
samples of each config's first run are shown side by side (samples.png).

    python experiments/prior_table.py runs/cmp25k/runs/*-seed* --out docs/results/prior --prior-steps 1500 --width 32 --layers 6
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from memvae.cli.prior import save_grid
from memvae.errors import MemvaeError, os_error
from memvae.experiments.plots import image_panels
from memvae.prior.fit import PriorOptions, prior_dir, train_prior
from memvae.prior.sample import sample_images
from memvae.training.runs import load_run

# (key in a row, column header, digits after the point) of the per-model summary.
SUMMARY_COLUMNS = [
    ("test_nmse_generation_read", "test NMSE (generation read)", 4),
    ("test_psnr_generation_read", "PSNR dB", 2),
    ("slots_used", "slots used", 0),
    ("perplexity", "perplexity", 0),
    ("prior_bits_per_index", "prior NLL bits/index", 3),
    ("prior_bits_per_image", "bits/image", 1),
    ("unigram_bits_per_index", "unigram bits/index", 3),
]


def run_row(run_dir: Path, options: PriorOptions, samples: int, out: Path, data_dir: str | None) -> dict:
    """Fit (or reuse) the run's prior, save its sample grid, and return its table row."""
    model, cfg, state = load_run(run_dir)
    if not (run_dir / "eval.json").exists():
        raise MemvaeError(f"{run_dir} has no eval.json; evaluate it first (memvae eval {run_dir})")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    if not (prior_dir(run_dir) / "eval.json").exists():
        train_prior(run_dir, options, data_dir=data_dir)
    prior = json.loads((prior_dir(run_dir) / "eval.json").read_text())
    images, _ = sample_images(run_dir, samples, seed=0)
    grid = save_grid(images, out / f"samples_{run_dir.name}.png")
    test = evaluation["test"]
    reads = model.bottleneck.reads  # generation decodes one slot per position: the memory's hard read
    read = "hard" if "hard" in reads else reads[0]
    return {
        "model": cfg.name,
        "seed": cfg.train.seed,
        "updates": int(state["step"]),
        "generation_read": read,
        "test_nmse_generation_read": test[read]["nmse"],
        "test_psnr_generation_read": test[read]["psnr"],
        "test_nmse_soft_read": test["soft"]["nmse"] if "soft" in test else None,
        "slots_used": test[read]["slots_used"],
        "perplexity": test[read]["perplexity"],
        "prior_bits_per_index": prior["bits_per_index"],
        "prior_bits_per_image": prior["bits_per_image"],
        "unigram_bits_per_index": prior["unigram_bits_per_index"],
        "uniform_bits_per_index": math.log2(cfg.bottleneck.slots),
        "samples": grid.name,
    }


def mean_std(values: list[float], digits: int) -> str:
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits if digits else 0}f}" if len(values) > 1 else "")


def tables(rows: list[dict]) -> tuple[str, str]:
    """(one line per run, one line per model with mean ± std over its seeds) as markdown."""
    header = ["model", "seed", "updates", "generation read", "test NMSE (generation read)", "PSNR dB",
              "test NMSE (soft read)", "slots used", "prior NLL bits/index", "bits/image", "unigram bits/index", "samples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        soft = "—" if r["test_nmse_soft_read"] is None else f"{r['test_nmse_soft_read']:.4f}"
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['updates']} | {r['generation_read']} | {r['test_nmse_generation_read']:.4f} | "
            f"{r['test_psnr_generation_read']:.2f} | {soft} | {r['slots_used']} | {r['prior_bits_per_index']:.3f} | "
            f"{r['prior_bits_per_image']:.1f} | {r['unigram_bits_per_index']:.3f} | [{r['samples']}]({r['samples']}) |"
        )
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    header = ["model", "seeds", "generation read", *(title for _, title, _ in SUMMARY_COLUMNS)]
    summary = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in by_model.items():
        cells = [mean_std([r[key] for r in runs], digits) for key, _, digits in SUMMARY_COLUMNS]
        summary.append(f"| {name} | {len(runs)} | {runs[0]['generation_read']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", "\n".join(summary) + "\n"


def main() -> None:
    """The table, or one line saying why not (status 2), as the memvae commands do."""
    try:
        _main()
    except (MemvaeError, OSError) as exc:
        print(f"error: {os_error(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        sys.exit(2)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True, help="folder for table.md, summary.md, table.json and the sample grids")
    parser.add_argument("--prior-steps", type=int, default=2000, help="Adam updates of each prior")
    parser.add_argument("--width", type=int, default=64, help="PixelCNN channels")
    parser.add_argument("--layers", type=int, default=8, help="PixelCNN gated layers")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = PriorOptions(steps=args.prior_steps, width=args.width, layers=args.layers, threads=args.threads)
    rows = [run_row(Path(run_dir), options, args.samples, out, args.data_dir) for run_dir in args.run_dirs]
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    per_run, summary = tables(rows)
    (out / "table.md").write_text(per_run)
    (out / "summary.md").write_text(summary)
    first_runs = {}
    for r in rows:
        first_runs.setdefault(r["model"], r)
    image_panels([(f"{name} (seed {r['seed']})", out / r["samples"]) for name, r in first_runs.items()],
                 out / "samples.png", title="samples from each model's prior")
    print(per_run + "\n" + summary)


if __name__ == "__main__":
    main()
