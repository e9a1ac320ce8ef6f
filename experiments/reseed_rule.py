"""Does the re-seeding rule leave a healthy codebook at every K? (issue 23)

Re-seeding revives a slot whose moving-average count (vectors per batch) is below a
threshold. A batch of 32 images holds N = 2,048 positions, so the mean count per slot is
N/K: 32 at K = 64, 4 at K = 512, 0.5 at K = 4,096. A fixed count of 1 is a quarter of the
mean at K = 512 but twice the mean at K = 4,096, where it would call most slots dead every
update. This trains `vq_ema_reseed` (full networks) a few hundred updates at each K under
the fixed count 1 and under a quarter of the mean count (reseed_fraction = 0.25, the
packaged rule), and reports the share of slots re-seeded per update over the last 100
updates and the slots used on the first 1,000 test images.

    python experiments/reseed_rule.py --data-dir ../shared/data --steps 400 --out docs/results/rate-distortion/reseed_rule.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from memvae.config import presets
from memvae.quantizers import functional as Fn
from memvae.data import load_data
from memvae.training.evaluate import evaluate_read
from memvae.training.runs import load_run
from memvae.training.train import train

BATCH_POSITIONS = 32 * 64  # batch 32 of 8×8 maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--slots", default="64,512,4096")
    parser.add_argument("--work", default="runs/reseed_rule", help="run directories go here")
    parser.add_argument("--out", required=True, help="markdown table (a .json beside it holds the numbers)")
    args = parser.parse_args()
    data = load_data("cifar10", args.data_dir)
    variance = data.train_variance()
    dead_shares: list[float] = []
    original = Fn.reseed_dead_slots

    def counting(memory, cluster_size, embed_sum, x, distances, threshold):
        dead_shares.append(float((cluster_size < threshold).float().mean()))  # a host read: fine in an experiment
        return original(memory, cluster_size, embed_sum, x, distances, threshold)

    Fn.reseed_dead_slots = counting
    rows = []
    for k in (int(v) for v in args.slots.split(",")):
        for rule, fraction in (("count 1 (fixed)", k / BATCH_POSITIONS), ("0.25 of N/K", 0.25)):
            cfg = presets.load("vq_ema_reseed", [f"bottleneck.slots={k}", f"bottleneck.reseed_fraction={fraction}",
                                                 f"train.steps={args.steps}", "train.threads=1", "train.eval_every=100000",
                                                 f"train.checkpoint_every={args.steps}", "train.log_every=100"])
            run_dir = Path(args.work) / f"k{k}-{'count1' if rule.startswith('count') else 'quarter'}"
            dead_shares.clear()
            train(cfg, run_dir, overwrite=True, data=data, show_progress=False)
            model, _, _ = load_run(run_dir)
            test = evaluate_read(model, data.test[:1000], variance)
            rows.append({"k": k, "rule": rule, "threshold": fraction * BATCH_POSITIONS / k,
                         "reseeded_share_last_100": sum(dead_shares[-100:]) / len(dead_shares[-100:]),
                         "slots_used": test["slots_used"], "perplexity": test["perplexity"], "nmse": test["nmse"]})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"`vq_ema_reseed`, {args.steps} updates, batch 32 (N = 2,048 positions), first 1,000 test images.", "",
             "| K | rule | threshold (vectors per batch) | slots re-seeded per update (last 100) | slots used | perplexity | NMSE |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['rule']} | {r['threshold']:.3g} | {100 * r['reseeded_share_last_100']:.1f} % | "
                     f"{r['slots_used']} | {r['perplexity']:.0f} | {r['nmse']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
