"""How far the top-k read is from the dense read it restricts, on a trained memory model.

The memory model of ``--run-dir`` (or, without one, a short run of the packaged
``memory_discrete`` config trained here, with its τ annealed to the end value over
``--steps`` updates) reads test images with its soft read at the trained τ, once dense and
once per k in ``--k``. For each k, over all positions of ``--images`` test images:

    outside mass      mean weight of the dense softmax outside the k largest (the metric
                      the top-k read logs)
    max ‖Δr‖ / ‖r‖    the largest difference between the two reads at any position,
                      relative to the dense read's norm there
    mean ‖Δr‖ / ‖r‖   its mean
    codes equal       the fraction of positions whose code (largest weight) is the same
    ΔNMSE             soft-read NMSE with top-k minus the dense one (whole images decoded)

    python benchmarks/top_k_read.py --data-dir ../shared/data --out benchmarks/results/top_k_read.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory_read import ints, markdown  # noqa: E402


@torch.no_grad()
def reads(model, images: torch.Tensor, top_k: int, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(soft reads N×D, codes N, outside mass N or empty, squared error sum) with top_k."""
    from memvae.quantizers import functional as Fn
    from memvae.data import to_input

    bottleneck = model.bottleneck
    saved = bottleneck.top_k, bottleneck.eval_read
    bottleneck.top_k, bottleneck.eval_read = top_k, "soft"
    model.eval()
    out_reads, out_codes, outside, error = [], [], [], 0.0
    try:
        for part in images.split(batch):
            x = to_input(part)
            z = model.encoder(x)
            out = bottleneck(z.float())
            out_reads.append(Fn.flatten_positions(out.quantized))
            out_codes.append(out.codes.reshape(-1))
            if top_k:
                outside.append(out.metrics["outside_mass"].expand(out.codes.numel()))
            error += float((model.decoder(out.quantized) - x).pow(2).sum(dtype=torch.float64))
    finally:
        bottleneck.top_k, bottleneck.eval_read = saved
    return torch.cat(out_reads), torch.cat(out_codes), torch.cat(outside) if outside else torch.empty(0), error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="a trained memory run (default: train a short memory_discrete run here)")
    parser.add_argument("--steps", type=int, default=300, help="updates of the short run (τ anneals over all of them)")
    parser.add_argument("--k", default="8,16,32", help="comma-separated k")
    parser.add_argument("--images", type=int, default=1000, help="test images read")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 (default $MEMVAE_DATA_DIR)")
    parser.add_argument("--out", default="benchmarks/results/top_k_read.json", help="JSON output path")
    args = parser.parse_args(argv)

    from memvae.config import presets
    from memvae.data import load_cifar10
    from memvae.training.metrics import nmse
    from memvae.training.runs import environment, load_run
    from memvae.training.train import train

    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data_dir, download=False)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run_dir) if args.run_dir else Path(scratch) / "memory_discrete"
        if not args.run_dir:
            cfg = presets.load("memory_discrete", [
                f"train.steps={args.steps}", f"bottleneck.tau_anneal_updates={args.steps}", f"train.threads={args.threads}",
                f"train.checkpoint_every={args.steps}", f"train.eval_every={args.steps}", "train.log_every=50"])
            train(cfg, run_dir, show_progress=False, data=data)
        model, cfg, state = load_run(run_dir)
    images = data.test[: args.images]
    variance = data.train_variance()
    pixels = images.numel()
    dense, dense_codes, _, dense_error = reads(model, images, 0)
    dense_nmse = nmse(dense_error / pixels, variance)
    rows, results = [], []
    for k in ints(args.k):
        read, codes, outside, error = reads(model, images, k)
        relative = (read - dense).norm(dim=1) / dense.norm(dim=1).clamp_min(1e-12)
        entry = {"k": k, "outside_mass": float(outside.mean()), "max_relative_difference": float(relative.max()),
                 "mean_relative_difference": float(relative.mean()),
                 "codes_equal": float((codes == dense_codes).double().mean()),
                 "delta_nmse": nmse(error / pixels, variance) - dense_nmse}
        results.append(entry)
        rows.append([k, entry["outside_mass"], entry["max_relative_difference"], entry["mean_relative_difference"],
                     entry["codes_equal"], entry["delta_nmse"]])
    tau = float(model.bottleneck.tau())
    print(f"{cfg.name}, update {state['step']}, τ = {tau:g}, K = {model.bottleneck.codebook_size}, {args.images} test images, "
          f"dense soft-read NMSE {dense_nmse:.5f}")
    print(markdown(["k", "outside mass", "max ‖Δr‖/‖r‖", "mean ‖Δr‖/‖r‖", "codes equal", "ΔNMSE"], rows))
    report = {"benchmark": "top_k_read", "environment": environment(), "run_dir": args.run_dir, "step": state["step"],
              "tau": tau, "dense_soft_nmse": dense_nmse, "settings": vars(args), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
