"""The timing half of benchmarks/gpu_check.sh: training updates on a CUDA device, none of
which may wait for the host.

Every update is :meth:`memvae.training.engine.Trainer.update`, as ``memvae train`` runs it (batch
indices on the device, bf16 autocast for the networks, the non-finite guard, Adam with its
step count on the GPU), with the packaged config's networks (the study's: hidden 128, D = 64)
and K = 512, on CIFAR-10 when ``--data-dir`` (or $MEMVAE_DATA_DIR) holds it, else on random
images of CIFAR-10's size (the ops do not depend on the pixels; the JSON says which).

1. One update of every packaged config (and the discrete memory with the top-k read),
   at each batch size: ``--warmup`` untimed updates (the first forward pass reads the slots'
   initialisation flag once), then ``--reps`` updates timed together.
2. ``--updates`` (1,000) updates in a row of the discrete memory, dense and top-k, and of
   ``vq_ema_reseed`` (its reference), at each batch size.

Timed updates run under ``torch.cuda.set_sync_debug_mode("error")``: any operation that
makes the host wait for the GPU raises, and the JSON records the first one's message
for that row (the row is then timed again with the mode off, so that a number still
comes back). The device is synchronised only before and after each timed block. Rows
stop being started once ``--budget`` seconds have passed.

    python benchmarks/gpu_check.py --out gpu_check.json
Without a CUDA device it stops at once with a one-line message (``--device cpu`` runs the
same code on the CPU with no sync check: a dry run of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 16


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load_images(data_dir: str | None):
    """(ImageData, where it came from): CIFAR-10 if it is there, else random uint8 images."""
    from memvae.data import ImageData, default_data_dir, load_cifar10
    from memvae.errors import MemvaeError

    try:
        return load_cifar10(data_dir or default_data_dir(), download=False), "cifar10"
    except MemvaeError:
        gen = torch.Generator().manual_seed(0)
        train = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=gen)
        test = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=gen)
        return ImageData(train, test, torch.zeros(50000, dtype=torch.int64), torch.zeros(1000, dtype=torch.int64)), "random"


def rows() -> list[tuple[str, str, list[str]]]:
    """(row name, packaged config, overrides): every packaged config, and the top-k read."""
    from memvae.config import presets

    found = [(name, name, []) for name in presets.names() if name != "smoke"]
    return found + [(f"memory_discrete_top{TOP_K}", "memory_discrete", [f"bottleneck.top_k={TOP_K}"])]


@contextmanager
def sync_check(device: torch.device):
    """sync debug mode "error" inside the block, on CUDA (nothing to check on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(trainer, updates: int, device: torch.device, check: bool) -> tuple[float, str | None]:
    """Seconds for ``updates`` updates (device synchronised before and after), and the first
    line of the error the sync check raised (None when none did)."""
    synchronize(device)
    started = time.perf_counter()
    try:
        with sync_check(device) if check else _nothing():
            for _ in range(updates):
                trainer.update()
    except RuntimeError as exc:
        return float("nan"), (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    synchronize(device)
    return time.perf_counter() - started, None


@contextmanager
def _nothing():
    yield


def measure(name: str, config: str, overrides: list[str], batch: int, updates: int, warmup: int, data, device) -> dict:
    """One row: a fresh Trainer of the config at batch ``batch``, warmed up, then timed."""
    from memvae.config import presets
    from memvae.training import distributed, engine

    cfg = presets.load(config, [*overrides, f"train.batch_size={batch}", f"train.device={device}"])
    torch.manual_seed(cfg.train.seed)
    with tempfile.TemporaryDirectory() as run_dir, distributed.repeatable(device, cfg.train.deterministic):
        trainer = engine.Trainer(cfg, data, distributed.Distributed(str(device)), Path(run_dir))
        for _ in range(warmup):
            trainer.update()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, error = timed(trainer, updates, device, check=True)
        row = {"row": name, "config": config, "overrides": overrides, "batch": batch, "updates": updates,
               "sync_error": error}
        if error is not None:  # time it anyway, without the check
            seconds, _ = timed(trainer, updates, device, check=False)
        trainer.settle()  # the updates' non-finite flags, read once (raises on a NaN loss)
        row.update(seconds=seconds, ms_per_update=1e3 * seconds / updates)
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        last = trainer.last.bottleneck.metrics
        row["metrics"] = {k: float(v) for k, v in last.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json", help="JSON output path")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    parser.add_argument("--batch", default="32,256", help="comma-separated batch sizes")
    parser.add_argument("--updates", type=int, default=1000, help="updates in a row of the long runs")
    parser.add_argument("--reps", type=int, default=20, help="updates timed together per row of the one-update table")
    parser.add_argument("--warmup", type=int, default=5, help="untimed updates before each timed block")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no new row is started")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 (default $MEMVAE_DATA_DIR); random images if absent")
    parser.add_argument("--pytest", action="append", default=[], metavar="NAME=LOG",
                        help="a pytest run's log to include (its last line and exit status); repeatable")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: gpu_check needs a CUDA device; this torch {torch.__version__} (CUDA build "
              f"{torch.version.cuda or 'none'}) sees none", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "src"))  # memvae from this checkout when it is not installed
    from memvae.training.runs import environment

    device = torch.device(args.device)
    data, source = load_images(args.data_dir)
    started = time.perf_counter()
    report = {"benchmark": "gpu_check", "environment": {**environment(), "device": str(device)},
              "data": source, "sync_debug_mode": "error" if device.type == "cuda" else None,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "pytest")},
              "one_update": [], "long_runs": [], "skipped": []}

    def over_budget(what: str) -> bool:
        if time.perf_counter() - started > args.budget:
            report["skipped"].append(what)
            return True
        return False

    for batch in ints(args.batch):
        for name, config, overrides in rows():
            if over_budget(f"one_update {name} B={batch}"):
                continue
            row = measure(name, config, overrides, batch, args.reps, args.warmup, data, device)
            report["one_update"].append(row)
            print(f"B={batch} {name}: {row['ms_per_update']:.2f} ms/update" + (f"  SYNC: {row['sync_error']}" if row["sync_error"] else ""),
                  flush=True)
    long_rows = [r for r in rows() if r[0] in ("memory_discrete", f"memory_discrete_top{TOP_K}", "vq_ema_reseed")]
    for batch in ints(args.batch):
        for name, config, overrides in long_rows:
            if over_budget(f"long_run {name} B={batch}"):
                continue
            row = measure(name, config, overrides, batch, args.updates, args.warmup, data, device)
            report["long_runs"].append(row)
            print(f"B={batch} {name}: {args.updates} updates in {row['seconds']:.2f} s" +
                  (f"  SYNC: {row['sync_error']}" if row["sync_error"] else ""), flush=True)
    report["pytest"] = [pytest_result(item) for item in args.pytest]
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def pytest_result(item: str) -> dict:
    """NAME=LOG (the log ends with pytest's summary line, then 'exit N' and 'seconds S'
    written by gpu_check.sh) -> {name, summary, exit, seconds}."""
    name, _, log = item.partition("=")
    lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()] if Path(log).exists() else []
    tail = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in lines[-2:] if ln.split(" ", 1)[0] in ("exit", "seconds")}
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), None)
    failed = [ln for ln in lines if ln.startswith("FAILED ") or ln.startswith("ERROR ")]
    return {"name": name, "summary": summary, "exit": int(tail["exit"]) if "exit" in tail else None,
            "seconds": float(tail["seconds"]) if "seconds" in tail else None, "failed": failed[:50]}


if __name__ == "__main__":
    sys.exit(main())
