"""Issue 4's table: each model as a discrete latent generative model.

For each run directory (trained, evaluated by `memvae compare` or `memvae eval`, so that it
holds eval.json): fit the PixelCNN prior over its slot maps (unless already fitted), draw
a grid of samples, and tabulate test NMSE with the read that generation uses (the slot
rows themselves: nearest slot for VQ, the hard read for memory models), the soft read's
NMSE for reference, slots used, and the prior's test NLL.

    python experiments/prior_table.py runs/compare1k/runs/*-seed0 --out docs/results/prior --prior-steps 1500 --width 32 --layers 6
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from memvae.cli_prior import save_grid
from memvae.prior import PriorOptions, prior_dir, sample_images, train_prior
from memvae.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True, help="folder for table.md, table.json and the sample grids")
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
    rows = []
    for run_dir in map(Path, args.run_dirs):
        _, cfg, state = load_run(run_dir)
        evaluation = json.loads((run_dir / "eval.json").read_text())
        if not (prior_dir(run_dir) / "eval.json").exists():
            train_prior(run_dir, PriorOptions(steps=args.prior_steps, width=args.width, layers=args.layers, threads=args.threads), data_dir=args.data_dir)
        prior = json.loads((prior_dir(run_dir) / "eval.json").read_text())
        images, _ = sample_images(run_dir, args.samples, seed=0)
        grid = save_grid(images, out / f"samples_{cfg.name}.png")
        test = evaluation["test"]
        generation_read = "hard" if "hard" in test else "nearest"
        rows.append({
            "model": cfg.name,
            "updates": int(state["step"]),
            "generation_read": generation_read,
            "test_nmse_generation_read": test[generation_read]["nmse"],
            "test_nmse_soft_read": test["soft"]["nmse"] if "soft" in test else None,
            "slots_used": test[generation_read]["slots_used"],
            "perplexity": test[generation_read]["perplexity"],
            "prior_bits_per_index": prior["bits_per_index"],
            "prior_bits_per_image": prior["bits_per_image"],
            "unigram_bits_per_index": prior["unigram_bits_per_index"],
            "uniform_bits_per_index": math.log2(cfg.bottleneck.slots),
            "samples": grid.name,
        })
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    header = ["model", "updates", "generation read", "test NMSE (generation read)", "test NMSE (soft read)",
              "slots used", "prior NLL bits/index", "bits/image", "unigram bits/index", "samples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        soft = "—" if r["test_nmse_soft_read"] is None else f"{r['test_nmse_soft_read']:.4f}"
        lines.append(
            f"| {r['model']} | {r['updates']} | {r['generation_read']} | {r['test_nmse_generation_read']:.4f} | {soft} | "
            f"{r['slots_used']} | {r['prior_bits_per_index']:.3f} | {r['prior_bits_per_image']:.1f} | "
            f"{r['unigram_bits_per_index']:.3f} | [{r['samples']}]({r['samples']}) |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
