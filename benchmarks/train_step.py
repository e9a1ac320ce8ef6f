"""Time one training update of every bottleneck against the bare networks and the study's loop.

An update is what ``memvae.training.train`` does per step: draw a batch of indices
(:class:`memvae.data.EpochBatcher`), gather the uint8 images held in memory, scale them
(:func:`memvae.data.to_input`), forward, backward, Adam step. It is timed for

    vq, vq_ema, memory (l2), memory (cosine)   memvae.networks.autoencoder.Autoencoder, K×D from the config
    bare                                      memvae.networks.encoder_decoder Encoder → Decoder, no bottleneck
    study loop                                the study's notebook loop (see StudyCifar):
                                              DataLoader over PIL images, ``next(iter(loader))``
                                              every update, Adam(amsgrad=True), the same
                                              networks with the memory (l2) read

at each batch size. Variants are timed round-robin (one update each, in an order that
rotates every round) so that a change in machine load hits all of them alike; every
figure is the median over ``--repeats`` rounds after ``--warmup`` untimed ones. The
achieved FLOP rate of an update (FLOPs counted by ``torch.utils.flop_counter``) is
given as a fraction of the rate of a large float32 matmul timed in the same rounds.

Everything runs in float32 (memvae.training.train's bf16 autocast on CUDA is not used here), with
the default K = 512, D = 64 of the study. Prints markdown tables and writes JSON (``--out``). Timings are only comparable within
one run; the device, CPU, thread count and versions are recorded with them.

``--repeatability`` times, instead, what repeatable training costs (issues 12 and 14), for
each bottleneck, round-robin in the same rounds:

    before       the update as memvae.training.train did it before: PyTorch's default
                 (non-deterministic) algorithms, the loss read back after every update
    deterministic the same update under ``torch.use_deterministic_algorithms(True)``, as
                 memvae.training.train sets it on CPU (the fix of issue 12)
    engine       memvae.training.engine.Trainer.update itself: deterministic, no read back, the
                 non-finite guard on the device (a copy of weights and Adam's state per update)

    python benchmarks/train_step.py --data-dir ../shared/data --threads 2
    python benchmarks/train_step.py --repeatability --batch-sizes 32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from memvae.config.schema import Config, load_config
from memvae.data import EpochBatcher, ImageData, load_cifar10, to_input
from memvae.training.distributed import Distributed
from memvae.training.engine import Trainer
from memvae.networks.autoencoder import Autoencoder
from memvae.networks.encoder_decoder import Decoder, Encoder
from memvae.training.runs import cpu_model, environment

BOTTLENECKS = {
    "vq": {"kind": "vq"},
    "vq_ema": {"kind": "vq_ema"},
    "memory_l2": {"kind": "memory", "similarity": "l2"},
    "memory_cosine": {"kind": "memory", "similarity": "cosine"},
}
BARE, STUDY = "bare", "study_loop"


def config(bottleneck: dict, args, overrides: list[str] = ()) -> Config:
    """The defaults with ``bottleneck``'s keys (its kind first), K = args.slots, D = args.dim."""
    keys = [f"bottleneck.{key}={value}" for key, value in bottleneck.items()]
    return load_config(None, [*keys, f"bottleneck.slots={args.slots}", f"model.embedding_dim={args.dim}", *overrides])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StudyCifar(Dataset):
    """CIFAR-10 as the study's notebook fed it: torchvision's ``CIFAR10`` dataset with
    ``ToTensor()`` and ``Normalize(mean=0.5, std=1)``, rebuilt from Pillow and numpy.

    Item i: the H×W×3 uint8 image becomes a PIL image, then a 3×H×W float tensor in
    [0, 1], then minus 0.5 (per-channel normalisation) -> (3×H×W float32, label).
    """

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images_hwc, labels
        self.mean = torch.tensor([0.5, 0.5, 0.5])
        self.std = torch.tensor([1.0, 1.0, 1.0])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        x = x.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous().float().div(255)
        x = x.sub_(self.mean[:, None, None]).div_(self.std[:, None, None])
        return x, int(self.labels[i])


class Variant:
    """One way of doing a training update; ``step()`` does one and returns the loss."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fetch, loss_of,
                 deterministic: bool = True):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.fetch, self.loss_of = fetch, loss_of
        self.deterministic = deterministic  # torch.use_deterministic_algorithms, as memvae.training.train sets it on CPU
        self.times: list[float] = []
        self.flops = 0

    def step(self) -> float:
        deterministic_algorithms(self.deterministic)
        x = self.fetch()
        loss = self.loss_of(self.model, x)
        value = float(loss.detach())  # the loop before issue 14 read it each update (finite check)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value


class EngineVariant:
    """memvae.training.engine.Trainer.update, the update memvae.training.train runs (deterministic algorithms on)."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer, self.model = name, trainer, trainer.model
        self.times: list[float] = []
        self.flops = 0

    def step(self) -> None:
        deterministic_algorithms(True)
        self.trainer.update()


def deterministic_algorithms(on: bool) -> None:
    """PyTorch's deterministic mode as memvae.training.distributed.repeatable sets it on CPU (or off)."""
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def build_variants(batch_size: int, images: torch.Tensor, study_set: StudyCifar, device, args) -> list[Variant]:
    """The variants of one batch size, each with its own model, optimizer and batch source."""
    variants = []

    def memvae_fetch(seed: int):
        batcher = EpochBatcher(len(images), batch_size, seed)
        return lambda: to_input(images[batcher.next()])

    def autoencoder_loss(model, x):
        return model(x).loss

    def bare_loss(model, x):
        return F.mse_loss(model(x), x)

    torch.manual_seed(0)
    bare = torch.nn.Sequential(Encoder(dim=args.dim), Decoder(dim=args.dim)).to(device)
    variants.append(Variant(BARE, bare, torch.optim.Adam(bare.parameters(), lr=args.lr), memvae_fetch(0), bare_loss))
    for name, bottleneck in BOTTLENECKS.items():
        torch.manual_seed(0)
        model = Autoencoder.from_config(config(bottleneck, args)).to(device)
        variants.append(Variant(name, model, torch.optim.Adam(model.parameters(), lr=args.lr), memvae_fetch(0), autoencoder_loss))

    torch.manual_seed(0)
    study = Autoencoder.from_config(config(BOTTLENECKS["memory_l2"], args)).to(device)
    loader = DataLoader(study_set, batch_size=batch_size, shuffle=True, num_workers=args.loader_workers)

    def study_fetch():
        x, _ = next(iter(loader))  # the notebook re-created the iterator every update
        return x.to(device)

    optimizer = torch.optim.Adam(study.parameters(), lr=args.lr, amsgrad=True)
    variants.append(Variant(STUDY, study, optimizer, study_fetch, autoencoder_loss))
    return variants


def build_repeatability_variants(batch_size: int, data: ImageData, device, args) -> list:
    """Per bottleneck: "before", "deterministic" and "engine" (see the module docstring),
    each with its own model, optimizer and batch order, all from the same seed."""
    images = data.train.to(device)
    variants = []
    for name, bottleneck in BOTTLENECKS.items():
        cfg = config(bottleneck, args, [f"train.batch_size={batch_size}", f"train.lr={args.lr}", f"train.device={device}"])
        for mode in ("before", "deterministic"):
            torch.manual_seed(0)
            model = Autoencoder.from_config(cfg).to(device)
            batcher = EpochBatcher(len(images), batch_size, 0)
            variants.append(Variant(f"{name} {mode}", model, torch.optim.Adam(model.parameters(), lr=args.lr),
                                    lambda b=batcher: to_input(images[b.next()]), lambda m, x: m(x).loss,
                                    deterministic=mode == "deterministic"))
        torch.manual_seed(0)
        variants.append(EngineVariant(f"{name} engine", Trainer(cfg, data, Distributed(str(device)), run_dir=Path("."))))
    return variants


def repeatability_main(args, data: ImageData, device, env: dict, batch_sizes: list[int]) -> int:
    """Time before / deterministic / engine per bottleneck (``--repeatability``)."""
    results = []
    for batch_size in batch_sizes:
        variants = build_repeatability_variants(batch_size, data, device, args)
        time_round_robin(variants, args.repeats, args.warmup, device)
        medians = {v.name: statistics.median(v.times) for v in variants}
        for v in variants:
            bottleneck, mode = v.name.split(" ")
            p25, p75 = quartiles(v.times)
            results.append({"batch_size": batch_size, "bottleneck": bottleneck, "mode": mode,
                            "seconds_median": medians[v.name], "seconds_p25": p25, "seconds_p75": p75,
                            "ratio_to_before": medians[v.name] / medians[f"{bottleneck} before"], "seconds_all": v.times})
        print(f"batch {batch_size} done", flush=True)
    deterministic_algorithms(False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_step --repeatability", "environment": env,
                               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}, indent=1))
    print()
    rows = [[r["batch_size"], r["bottleneck"], r["mode"], 1e3 * r["seconds_median"],
             f"{1e3 * r['seconds_p25']:.3g}–{1e3 * r['seconds_p75']:.3g}", r["ratio_to_before"]] for r in results]
    print(markdown(["batch", "bottleneck", "update", "ms / update (median)", "IQR ms", "× before"], rows))
    print(f"\nwrote {out}")
    return 0


def count_flops(variant: Variant) -> int:
    """FLOPs of one update (forward, backward, optimizer) as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        variant.step()
    return int(counter.get_total_flops())


def time_round_robin(variants: list[Variant], repeats: int, warmup: int, device) -> None:
    """Fill every variant's ``times`` with ``repeats`` single-update timings (seconds)."""
    for r in range(warmup + repeats):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            sync(device)
            started = time.perf_counter()
            variant.step()
            sync(device)
            if r >= warmup:
                variant.times.append(time.perf_counter() - started)


class MatmulReference:
    """An n×n by n×n float32 matmul (2n³ FLOPs), timed among the variants as the
    machine's reachable FLOP rate."""

    name = "matmul"

    def __init__(self, n: int, device):
        self.n = n
        self.a = torch.randn(n, n, device=device)
        self.b = torch.randn(n, n, device=device)
        self.flops = 2 * n**3
        self.times: list[float] = []

    def step(self) -> None:
        torch.mm(self.a, self.b)


def quartiles(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return q[0], q[2]


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def targets(results: list[dict], batch_sizes: list[int]) -> list[dict]:
    """The issue's targets, each as measured value, limit and whether it is met."""
    by = {(r["batch_size"], r["variant"]): r for r in results}
    rows = []
    study_batch = 32 if 32 in batch_sizes else batch_sizes[0]
    for name in BOTTLENECKS:
        value = by[(study_batch, name)]["ratio_to_bare"]
        rows.append({"target": f"{name} update / bare networks, batch {study_batch}", "value": value, "limit": 1.10, "met": value <= 1.10})
    for name in ("memory_l2", "memory_cosine"):
        value = by[(study_batch, name)]["seconds_median"] / by[(study_batch, "vq")]["seconds_median"]
        rows.append({"target": f"{name} update / vq update, batch {study_batch}", "value": value, "limit": 1.10, "met": value <= 1.10})
    for b in batch_sizes:
        value = by[(b, STUDY)]["seconds_median"] / by[(b, "memory_l2")]["seconds_median"]
        rows.append({"target": f"study loop / memvae memory_l2 update, batch {b} (> 1: memvae faster)", "value": value, "limit": 1.0, "met": value > 1.0})
    return rows


def _time_batch_sizes(batch_sizes: list[int], images: torch.Tensor, study_set, device: torch.device,
                      args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Time every variant at each batch size beside the reference matmul, round-robin;
    returns (one row per batch size and variant, one matmul reference per batch size)."""
    results, references = [], []
    for batch_size in batch_sizes:
        variants = build_variants(batch_size, images, study_set, device, args)
        for variant in variants:
            variant.flops = count_flops(variant)
        matmul = MatmulReference(args.matmul_size or (8192 if device.type == "cuda" else 2048), device)
        time_round_robin([*variants, matmul], args.repeats, args.warmup, device)
        peak = matmul.flops / statistics.median(matmul.times)
        references.append({"batch_size": batch_size, "matmul_n": matmul.n, "seconds_median": statistics.median(matmul.times),
                           "flops_per_second": peak, "seconds_all": matmul.times})
        medians = {v.name: statistics.median(v.times) for v in variants}
        for variant in variants:
            p25, p75 = quartiles(variant.times)
            seconds = medians[variant.name]
            row = {
                "batch_size": batch_size,
                "variant": variant.name,
                "seconds_median": seconds,
                "seconds_p25": p25,
                "seconds_p75": p75,
                "seconds_all": variant.times,
                "flops": variant.flops,
                "flops_per_second": variant.flops / seconds,
                "fraction_of_matmul": variant.flops / seconds / peak,
                "ratio_to_bare": seconds / medians[BARE],
            }
            if variant.name == STUDY:
                row["ratio_to_memory_l2"] = seconds / medians["memory_l2"]
            results.append(row)
        print(f"batch {batch_size} done", flush=True)
    return results, references


def _print_tables(results: list[dict], references: list[dict], checks: list[dict]) -> None:
    """The matmul references, the results and the targets, as text and markdown tables."""
    for ref in references:
        print(f"\nbatch {ref['batch_size']} round: {ref['matmul_n']}×{ref['matmul_n']} float32 matmul at "
              f"{ref['flops_per_second'] / 1e9:.1f} GFLOP/s (the reference of the last column)")
    print()
    header = ["batch", "variant", "ms / update (median)", "IQR ms", "× bare", "GFLOP / update", "GFLOP/s", "of matmul rate"]
    rows = [
        [r["batch_size"], r["variant"], 1e3 * r["seconds_median"], f"{1e3 * r['seconds_p25']:.3g}–{1e3 * r['seconds_p75']:.3g}",
         r["ratio_to_bare"], r["flops"] / 1e9, r["flops_per_second"] / 1e9, f"{100 * r['fraction_of_matmul']:.1f}%"]
        for r in results
    ]
    print(markdown(header, rows))
    print()
    print(markdown(["target", "measured", "limit", "met"], [[t["target"], t["value"], t["limit"], t["met"]] for t in checks]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="32,256", help="comma-separated batch sizes (default 32,256)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size; figures are medians")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    parser.add_argument("--slots", type=int, default=512, help="K, memory slots (the study's 512)")
    parser.add_argument("--dim", type=int, default=64, help="D, slot width (the study's 64)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers of the study loop (its default: 0)")
    parser.add_argument("--matmul-size", type=int, default=0, help="n of the reference n×n matmul (0: 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--data-dir", default=None, help="holds cifar-10-batches-py (default $MEMVAE_DATA_DIR)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/train_step.json, "
                        "or train_step_repeatability.json with --repeatability)")
    parser.add_argument("--repeatability", action="store_true",
                        help="time the update before/with deterministic algorithms/as memvae.training.engine runs it, per bottleneck")
    args = parser.parse_args(argv)
    args.out = args.out or f"benchmarks/results/train_step{'_repeatability' if args.repeatability else ''}.json"

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA device is available")
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    data = load_cifar10(args.data_dir, download=False)
    images = data.train.to(device)
    study_set = StudyCifar(data.train.permute(0, 2, 3, 1).contiguous().numpy(), data.train_labels.numpy())

    env = {**environment(), "device": str(device), "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        # Convolutions may run in TF32 (cuDNN's default) while the reference matmul does not.
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    print(f"device {device} ({env.get('cuda_device') or env['cpu_model']}), torch {torch.__version__}, "
          f"{env['torch_threads']} threads, {os.cpu_count()} CPUs", flush=True)

    if args.repeatability:
        return repeatability_main(args, data, device, env, batch_sizes)
    results, references = _time_batch_sizes(batch_sizes, images, study_set, device, args)
    report = {
        "benchmark": "train_step",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)} | {"batch_sizes": batch_sizes},
        "matmul": references,
        "results": results,
        "targets": targets(results, batch_sizes),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))

    _print_tables(results, references, report["targets"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
