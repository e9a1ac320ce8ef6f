"""How finely each trained codebook covers its encoder's outputs (the discrete memory issue).

For each run directory: encode test images, and measure, in the space the slots live in
(the encoder's D-dimensional outputs), relative to the spread of those outputs
(mean ‖z − z̄‖²):
    distortion   mean ‖z − m_nearest(z)‖², the error a hard read makes before decoding;
    spacing      mean over slots of the squared distance to the nearest other slot;
and the slots used and perplexity of the nearest-slot codes. A soft write is soft k-means:
if it pulls slots toward the mean of their neighbours, its spacing and distortion show it.
FSQ has no slot space of the encoder's (it rounds a 3-channel projection) and is skipped.

    python experiments/codebook_resolution.py runs/sweep2k/runs/*-seed0 --out docs/results/sweep-2k/resolution
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memvae.quantizers import FSQ
from memvae.quantizers.functional import code_counts, flatten_positions, nearest_distances, perplexity_from_counts
from memvae.data import load_data, to_input
from memvae.training.runs import load_run


@torch.no_grad()
def resolution(run_dir: Path, images: torch.Tensor) -> dict | None:
    """The measures above for one run on uint8 N×3×H×W images; None for FSQ."""
    model, cfg, state = load_run(run_dir)
    if isinstance(model.bottleneck, FSQ):
        return None
    model.eval()
    z = torch.cat([flatten_positions(model.encoder(to_input(batch))) for batch in images.split(500)])
    slots = model.bottleneck.slots().detach().float()
    codes, distances = nearest_distances(z, slots)
    spread = float((z - z.mean(0)).pow(2).sum(1).mean())
    gaps = torch.cdist(slots, slots).pow(2).fill_diagonal_(float("inf")).min(1).values
    counts = code_counts(codes, slots.shape[0])
    return {
        "run": run_dir.name,
        "step": int(state["step"]),
        "spread": spread,
        "distortion": float(distances.mean()) / spread,
        "spacing": float(gaps.mean()) / spread,
        "slots_used": int((counts > 0).sum()),
        "perplexity": float(perplexity_from_counts(counts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="writes OUT.md and OUT.json")
    parser.add_argument("--images", type=int, default=2000, help="first test images used")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    _, cfg, _ = load_run(args.run_dirs[0])
    data = load_data(cfg.data.source, args.data_dir or cfg.data.dir or None, cfg.data.image_size)
    rows = [r for r in (resolution(d, data.test[: args.images]) for d in args.run_dirs) if r]
    lines = ["| run | step | distortion / spread | slot spacing / spread | slots used | perplexity |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['step']} | {r['distortion']:.4f} | {r['spacing']:.4f} | {r['slots_used']} | {r['perplexity']:.0f} |"
              for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
