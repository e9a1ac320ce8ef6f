"""memvae's bottlenecks against vector-quantize-pytorch, the quantiser library people use.

The rows and their peers, and the rules that pair them: ``benchmarks/peer_rows.py``.

What is timed is one training-mode update of the bottleneck alone: forward on a B×64×8×8
map (N = 64·B positions), a loss (the sum of the output times a fixed random upstream
gradient, plus the module's own loss), backward to the input and the slots; the EMA
modules update their averages as in training. For each (B, K, threads) one fresh
subprocess builds every contestant and times them round-robin, one update each in an
order that rotates every round, so that machine load hits them alike; each figure is the
median over the rounds (as many as fit in ``--seconds``, between ``--min-rounds`` and
``--max-rounds``) after one untimed warm-up update. The same rounds time the distance
product alone (N×64 times 64×K, 2·N·K·64 FLOPs, in chunks of 2²² products written into
one reused buffer), which gives the matmul rate the lower bound of a row is computed from: FLOPs of memvae's update (counted by
``torch.utils.flop_counter``, with the CPU flash-attention kernels added) divided by that
rate. A row whose peer time over 3 is below this bound cannot be 3× faster than the peer
without doing less arithmetic. When a row reads the top k slots (``top_k``), the same rounds
also time the selection alone (``top_k_select``: ``torch.topk`` of N×K negative squared distances, k per
row, in the same chunks, into reused outputs), the part of that row which no arithmetic
bound sees; its ratios to the top-k row and to ``vq_ema_reseed`` are tabulated beside the
targets.

Peak extra memory: each contestant again in its own fresh subprocess, with the helpers of
``benchmarks/memory_read.py``: the peak resident set of two updates above the resident set
after one warm-up update (so one-time allocations, such as the slots' initialisation from
data and the libraries' lazy workspaces, do not count), the address space capped at
``--memory-limit``, glibc's mmap threshold fixed so that freed large blocks leave the
resident set. Memory is measured at the first thread count only.

    pip install -e ".[bench]"
    python benchmarks/peer.py --threads 1,2 --out benchmarks/results/peer.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory_read import GIB, _proc_status, _reset_peak_rss, ints, markdown  # noqa: E402
from peer_rows import DIM, ROWS, SIDE, plan_rows  # noqa: E402
from train_step import cpu_model  # noqa: E402

PEER = "vector-quantize-pytorch"
INSTALL = 'pip install -e ".[bench]"   (or: pip install vector-quantize-pytorch==1.32.0)'
MATMUL_CHUNK = 1 << 22  # distances per chunk, as memvae.quantizers.functional.nearest_distances

TARGET_SPEEDUP = 3.0
# Time ratios with a ceiling: (row, against: another row or the distance product alone, ceiling).
RATIO_TARGETS = (
    ("memory_discrete", "vq_ema", 1.2),                    # issue 13
    ("memory_discrete:top_k=16", "vq_ema_reseed", 1.3),    # issue 20: the top-k read at VQ's cost
    ("vq_ema", "distance_matmul", 3.0),                    # issue 20: VQ near its N×K×D floor
)
# Time ratios without a ceiling: what bounds the top-k row. The selection alone (torch.topk of
# the N×K logits, k per row, in the distance product's chunks) against the row it is part of
# and against the VQ row that row is held to.
BOUND_RATIOS = (("top_k_select", "memory_discrete:top_k=16"), ("top_k_select", "vq_ema_reseed"),
                # IBQ (no peer) against the read of the same softmax over all K codes (issue 34).
                ("ibq", "memory_l2:impl=dense"))


# ---------------------------------------------------------------- FLOPs of the CPU attention kernels
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ---------------------------------------------------------------- subprocess side
def _build(contestant: dict, n: int, k: int, seed: int):
    """-> (update function, module or None) for one contestant of the worker's spec."""
    gen = torch.Generator().manual_seed(seed)
    if contestant["side"] == "matmul":
        # The distance product in the chunks memvae computes it in, into one reused buffer:
        # the arithmetic alone, without the page faults of a fresh N×K allocation per call.
        x, m = torch.randn(n, DIM, generator=gen), torch.randn(k, DIM, generator=gen)
        rows = max(1, MATMUL_CHUNK // k)
        buffer = torch.empty(rows, k)

        def products() -> None:
            for part in x.split(rows):
                torch.mm(part, m.t(), out=buffer[: part.shape[0]])

        return products, None
    if contestant["side"] == "select":
        # torch.topk of N×K logits (negative squared distances of random queries to random
        # slots, as the memory's l2 addressing gives), k per row, in the same chunks, into
        # reused outputs.
        x, m = torch.randn(n, DIM, generator=gen), torch.randn(k, DIM, generator=gen)
        logits, rows = -torch.cdist(x, m).square(), max(1, MATMUL_CHUNK // k)
        values, slots = torch.empty(rows, contestant["top_k"]), torch.empty(rows, contestant["top_k"], dtype=torch.long)

        def select() -> None:
            for part in logits.split(rows):
                torch.topk(part, contestant["top_k"], dim=1, out=(values[: part.shape[0]], slots[: part.shape[0]]))

        return select, None
    b = n // (SIDE * SIDE)
    memvae = contestant["side"] == "memvae"
    z = torch.randn(b, DIM, SIDE, SIDE, generator=gen).requires_grad_(True)
    upstream = torch.randn(b, DIM, SIDE, SIDE, generator=gen)
    if contestant["side"] == "memvae":
        from memvae.config.schema import bottleneck_options
        from memvae.networks.autoencoder import build_bottleneck

        module = build_bottleneck(dataclasses.replace(bottleneck_options(contestant["config"]["kind"]), **contestant["config"]), DIM)
    else:
        import vector_quantize_pytorch as vqp

        module = getattr(vqp, contestant["peer"]["class"])(**contestant["peer"]["kwargs"])
    call = {} if memvae else contestant["peer"].get("call", {})
    module.train()
    params = list(module.parameters())

    def update() -> None:
        z.grad = None
        for p in params:
            p.grad = None
        out = module(z, **call)
        if memvae:
            quantized, aux = out.quantized, out.loss
        else:  # VectorQuantize, SimVQ, LFQ: (quantized, indices, loss); FSQ: (quantized, indices)
            quantized, aux = out[0], (out[2] if len(out) > 2 else None)
        loss = (quantized * upstream).sum()
        if aux is not None:
            loss = loss + aux
        loss.backward()

    return update, module


def time_worker(spec: dict) -> dict:
    """Every contestant of one (B, K, threads), round-robin; median seconds and FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(spec["threads"])
    n, k = spec["n"], spec["k"]
    updates = {c["name"]: _build(c, n, k, spec["seed"])[0] for c in spec["contestants"]}
    names = list(updates)
    for name in names:  # warm-up: data initialisation of the slots, lazy buffers, allocator
        updates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds, r = spec["max_rounds"], 0
    while r < rounds:
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            updates[name]()
            times[name].append(time.perf_counter() - started)
        if r == 0:  # as many rounds as fit in the budget, within the bounds
            per_round = sum(t[0] for t in times.values())
            rounds = max(spec["min_rounds"], min(spec["max_rounds"], math.ceil(spec["seconds"] / per_round)))
        r += 1
    flops = {}
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    for name in names:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            updates[name]()
        flops[name] = counter.get_total_flops()
    return {"rounds": rounds, "threads": torch.get_num_threads(),
            "seconds_median": {name: statistics.median(t) for name, t in times.items()},
            "seconds_all": times, "flops": flops}


def memory_worker(spec: dict) -> dict:
    """One contestant alone: peak resident memory of two updates above what it held after one."""
    torch.set_num_threads(spec["threads"])
    size = _proc_status("VmSize")
    if size is not None and spec["memory_limit"]:
        cap = size + int(spec["memory_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    update, _ = _build(spec["contestant"], spec["n"], spec["k"], spec["seed"])
    try:
        # One update first: what is allocated once (the slots' data initialisation, the
        # libraries' lazy workspaces) is not the memory an update needs.
        update()
        source = "VmHWM" if _reset_peak_rss() else "ru_maxrss"
        base = _proc_status("VmRSS") or 0
        for _ in range(2):
            update()
    except (RuntimeError, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"failed": f"{type(exc).__name__} under the {spec['memory_limit'] / GIB:g} GiB limit: {first[:120]}"}
    if source == "VmHWM":
        peak = (_proc_status("VmHWM") or 0) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "peak_source": source}


def run_worker(spec: dict, timeout: float, mmap_threshold: int = 0) -> dict:
    """``spec`` in a fresh interpreter (this file with --worker); its last stdout line is the result."""
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)  # read by glibc at start-up
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated packaged config names")
    parser.add_argument("--batch", default="32,256", help="comma-separated batch sizes B (N = 64·B positions)")
    parser.add_argument("--k", default="512,4096,16384", help="comma-separated numbers of slots K")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget of the rounds per (B, K, threads)")
    parser.add_argument("--min-rounds", type=int, default=5, help="fewest timed rounds per (B, K, threads)")
    parser.add_argument("--max-rounds", type=int, default=25, help="most timed rounds per (B, K, threads)")
    parser.add_argument("--memory-limit", type=float, default=10.0, help="GiB: cap on each memory subprocess's extra address space")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                        help="bytes, memory subprocesses only: glibc returns larger blocks on free (see memory_read.py)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per subprocess")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs, upstream gradients and slots")
    parser.add_argument("--out", default="benchmarks/results/peer.json", help="JSON output path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(time_worker(spec) if spec["mode"] == "time" else memory_worker(spec)))
        return 0
    try:
        import vector_quantize_pytorch  # noqa: F401
        from importlib.metadata import version

        peer_version = version("vector-quantize-pytorch")
    except ImportError:
        print(f"error: {PEER} is not installed; install it with: {INSTALL}", file=sys.stderr)
        return 2
    from memvae.training.runs import environment

    row_names = [r.strip() for r in args.rows.split(",") if r.strip()]
    thread_counts = ints(args.threads)
    env = {**environment(), "device": "cpu", "cpu_model": cpu_model(), "peer": PEER, "peer_version": peer_version,
           "load_average_start": os.getloadavg()}
    print(f"cpu ({env['cpu_model']}), torch {torch.__version__}, {PEER} {peer_version}, threads {thread_counts}, "
          f"load average {env['load_average_start'][0]:.2f}", flush=True)

    results = []
    for b in ints(args.batch):
        n = b * SIDE * SIDE
        for k in ints(args.k):
            rows, contestants = plan_rows(row_names, k, b * SIDE * SIDE)
            memory = {}
            for c in contestants:
                if c["side"] in ("matmul", "select"):
                    continue
                spec = {"mode": "memory", "n": n, "k": k, "threads": thread_counts[0], "seed": args.seed,
                        "memory_limit": int(args.memory_limit * GIB), "contestant": c}
                memory[c["name"]] = run_worker(spec, args.timeout, args.malloc_mmap_threshold)
                got = memory[c["name"]]
                print(f"B={b} K={k} {c['name']}: " + (got.get("failed") or f"peak {got['peak_bytes'] / 2**20:.0f} MiB"), flush=True)
            for threads in thread_counts:
                spec = {"mode": "time", "n": n, "k": k, "threads": threads, "seed": args.seed, "seconds": args.seconds,
                        "min_rounds": args.min_rounds, "max_rounds": args.max_rounds, "contestants": contestants}
                timed = run_worker(spec, args.timeout) if contestants else {"failed": "no contestants"}
                if "failed" in timed:
                    print(f"B={b} K={k} threads={threads}: {timed['failed']}", flush=True)
                else:
                    print(f"B={b} K={k} threads={threads}: {timed['rounds']} rounds, " + ", ".join(
                        f"{name} {1e3 * s:.1f} ms" for name, s in timed["seconds_median"].items()), flush=True)
                results.append(assemble(b, k, threads, rows, timed, memory))

    report = {"benchmark": "peer", "environment": {**env, "load_average_end": os.getloadavg()},
              "settings": {key: v for key, v in vars(args).items() if key not in ("out", "worker")},
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print()
    print(tables(results))
    print(f"\nwrote {out}")
    return 0


def assemble(b: int, k: int, threads: int, rows: list[dict], timed: dict, memory: dict) -> dict:
    """One (B, K, threads): every row with its times, ratio, memory and lower bound."""
    entry = {"batch": b, "n": b * SIDE * SIDE, "k": k, "threads": threads, "rows": [],
             **({"failed": timed["failed"]} if "failed" in timed else {"rounds": timed["rounds"]})}
    median = timed.get("seconds_median", {})
    flops = timed.get("flops", {})
    n = b * SIDE * SIDE
    matmul = median.get("distance_matmul")
    rate = 2.0 * n * k * DIM / matmul if matmul else None  # FLOP/s of the distance product
    entry["distance_matmul_seconds"], entry["matmul_flops_per_second"] = matmul, rate
    for row in rows:
        out = {key: row[key] for key in ("row", "skipped", "config", "peer", "peer_spec") if key in row}
        if "skipped" not in row and median and row["peer"] is None:
            mine = f"memvae:{row['row']}"
            out.update(memvae_seconds=median[mine], memvae_flops=flops[mine], memvae_peak_bytes=memory[mine].get("peak_bytes"),
                       bound_seconds=flops[mine] / rate if rate else None)
        elif "skipped" not in row and median:
            mine, theirs = f"memvae:{row['row']}", f"peer:{row['peer']}"
            out.update(memvae_seconds=median[mine], peer_seconds=median[theirs],
                       speedup=median[theirs] / median[mine], memvae_flops=flops[mine], peer_flops=flops[theirs],
                       memvae_peak_bytes=memory[mine].get("peak_bytes"), peer_peak_bytes=memory[theirs].get("peak_bytes"),
                       memory_failed=[m["failed"] for m in (memory[mine], memory[theirs]) if "failed" in m])
            # The least time memvae's arithmetic can take at the rate the distance product reached.
            out["bound_seconds"] = flops[mine] / rate if rate else None
        entry["rows"].append(out)
    seconds = {r["row"]: r["memvae_seconds"] for r in entry["rows"] if "memvae_seconds" in r}
    for name in ("distance_matmul", "top_k_select"):
        if name in median:
            seconds[name] = median[name]
    entry["top_k_select_seconds"] = median.get("top_k_select")
    entry["ratios"] = [{"row": row, "against": against, "ratio": seconds[row] / seconds[against], "ceiling": ceiling}
                       for row, against, ceiling in RATIO_TARGETS + tuple((*pair, None) for pair in BOUND_RATIOS)
                       if row in seconds and against in seconds]
    return entry


def tables(results: list[dict]) -> str:
    """The markdown tables printed at the end (and pasted into docs/benchmarks.md)."""
    mib = lambda v: None if v is None else v / 2**20  # noqa: E731
    header = ["row", "B", "K", "threads", "memvae ms", "peer", "peer ms", "peer / memvae", f"≥ {TARGET_SPEEDUP:g}×",
              "memvae peak MiB", "peer peak MiB", "memory ≤ peer", "bound ms"]
    lines, skipped, ratios = [], {}, []
    for e in results:
        for r in e["rows"]:
            if "skipped" in r:
                skipped[r["row"]] = r["skipped"]
                continue
            if "speedup" not in r:
                continue
            mem_ok = None if r["memvae_peak_bytes"] is None or r["peer_peak_bytes"] is None else r["memvae_peak_bytes"] <= r["peer_peak_bytes"]
            lines.append([r["row"], e["batch"], e["k"], e["threads"], 1e3 * r["memvae_seconds"], r["peer"],
                          1e3 * r["peer_seconds"], r["speedup"], r["speedup"] >= TARGET_SPEEDUP,
                          mib(r["memvae_peak_bytes"]), mib(r["peer_peak_bytes"]), mem_ok,
                          None if r["bound_seconds"] is None else 1e3 * r["bound_seconds"]])
        for r in e.get("ratios", []):
            ratios.append([f"{r['row']} / {r['against']}", e["batch"], e["k"], e["threads"], r["ratio"], r["ceiling"],
                           None if r["ceiling"] is None else r["ratio"] <= r["ceiling"]])
        for failed in [e.get("failed")] if e.get("failed") else []:
            lines.append(["(all)", e["batch"], e["k"], e["threads"], None, failed] + [None] * 7)
    text = markdown(header, lines)
    if ratios:
        text += "\n\n" + markdown(["time ratio", "B", "K", "threads", "ratio", "ceiling", "met"], sorted(ratios, key=lambda r: r[0]))
    if results:
        rates = [[e["batch"], e["k"], e["threads"], None if not e.get("matmul_flops_per_second") else e["matmul_flops_per_second"] / 1e9]
                 for e in results]
        text += "\n\n" + markdown(["B", "K", "threads", "distance matmul GFLOP/s"], rates)
    for name, why in skipped.items():
        text += f"\n\nskipped {name}: {why}"
    return text


if __name__ == "__main__":
    sys.exit(main())
