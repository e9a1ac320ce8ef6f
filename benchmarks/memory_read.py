"""Time and memory of the soft memory read alone, straightforward against memvae's.

The read (DESIGN.md, "The bottlenecks"), for N queries z (N×D) and K slots M (K×D):

    w = softmax(−β‖z − M_k‖²)   (l2)   or   softmax(β cos(z, M_k))   (cosine)     N×K
    r = w @ M                                                                   N×D

timed forward + backward (gradients to z, M and β through log β, with a fixed random
upstream gradient) for

    straightforward   the formula above, written here; holds N×K matrices
    memvae fused      memvae.MemoryRead(impl="fused"): scaled_dot_product_attention on
                      augmented queries/keys plus chunked statistics; meant never to hold
                      the N×K matrix
    memvae auto       memvae.MemoryRead(impl="auto"), as training uses it (dense below
                      N·K = 2^22, fused above; when it picks fused it is the fused row)
    memvae dense      memvae.MemoryRead(impl="dense") (not run unless asked for)

Every (similarity, N, K, implementation) runs in a fresh subprocess, which reports the
median time of ``--repeats`` updates after one warm-up, and the peak memory above what
it held before the first update: on CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs before the first update where the kernel allows, else
getrusage's ru_maxrss), on CUDA ``torch.cuda.max_memory_allocated``. On CPU the
subprocess's address space is capped (``--memory-limit`` above its size at start), so
an implementation that needs more fails cleanly instead of waking the OOM killer, and
glibc's mmap threshold is fixed (``--malloc-mmap-threshold``, 1 MiB): with its default,
dynamic threshold, freed blocks of up to 32 MiB stay resident, and the peak RSS of a
chunked computation grows with the number of chunks instead of following the tensors
alive at once (several times over, for the chunked statistics at K = 65536).
Implementations that hold N×K float32 matrices are skipped, with their estimated bytes,
when the estimate exceeds ``--memory-limit``. Where two implementations both ran, the
largest absolute differences of their outputs and gradients are reported.

    python benchmarks/memory_read.py --threads 2
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Peak N×K float32 matrices the dense versions hold during forward + backward, measured
# with this script on CPU (peak extra memory / (4·N·K)): used only to decide what to skip.
DENSE_MATRICES = {"straightforward": 4.5, "dense": 6.5}
GIB = 2**30


def straightforward_read(z: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor, similarity: str) -> torch.Tensor:
    """r = softmax(β·s(z, M)) @ M with the N×K weights held: z N×D, M K×D, β scalar -> N×D."""
    if similarity == "l2":
        # ‖z − m‖² = ‖z‖² − 2 z·m + ‖m‖², one N×K matrix product instead of N×K×D differences.
        dist2 = z.pow(2).sum(1, keepdim=True) - 2.0 * z @ memory.t() + memory.pow(2).sum(1)
        w = torch.softmax(-beta * dist2, dim=1)
    else:
        w = torch.softmax(beta * (F.normalize(z, dim=1) @ F.normalize(memory, dim=1).t()), dim=1)
    return w @ memory


# ---------------------------------------------------------------- one configuration (subprocess)
def _proc_status(key: str) -> int | None:
    """A "kB" field of /proc/self/status in bytes, or None where there is no /proc."""
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs); True if it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(spec: dict) -> dict:
    """Run one (similarity, N, K, impl) and return its measurements (see module doc)."""
    from memvae.quantizers.memory import MemoryRead
    from memvae.quantizers.memory_options import Addressing, LearnedTemperature

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    n, k, d, sim = spec["n"], spec["k"], spec["dim"], spec["similarity"]
    if device.type == "cpu" and spec["memory_limit"]:
        size = _proc_status("VmSize")
        if size is not None:
            cap = size + int(spec["memory_limit"])
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    gen = torch.Generator().manual_seed(spec["seed"])
    z0 = torch.randn(n, d, generator=gen).to(device)
    m0 = torch.randn(k, d, generator=gen).to(device)
    upstream = torch.randn(n, d, generator=gen).to(device)
    z = z0.clone().requires_grad_(True)
    result = {"path": "straightforward"}
    if spec["impl"] == "straightforward":
        memory = m0.clone().requires_grad_(True)
        log_beta = torch.tensor(math.log(spec["beta"]), device=device, requires_grad=True)
        read = lambda: straightforward_read(z, memory, log_beta.exp(), sim)  # noqa: E731
        leaves = (z, memory, log_beta)
    else:
        addressing = Addressing(sim, LearnedTemperature(spec["beta"]))
        module = MemoryRead(k, d, addressing, impl=spec["impl"], init="random").to(device)
        with torch.no_grad():
            module.memory.copy_(m0)
        fused = spec["impl"] == "fused" or (spec["impl"] == "auto" and n * k > module.fused_threshold)
        result["path"] = "fused" if fused else "dense"
        read = lambda: module(z.view(n, d, 1, 1)).quantized.reshape(n, d)  # noqa: E731
        leaves = (z, module.memory, module.log_beta)

    def update() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        out = read()
        (out * upstream).sum().backward()
        return out.detach()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        result["peak_source"] = "VmHWM" if _reset_peak_rss() else "ru_maxrss"
        base = _proc_status("VmRSS") or 0
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    try:
        for r in range(1 + spec["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            out = update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:
                times.append(time.perf_counter() - started)
    except (RuntimeError, MemoryError) as exc:
        text = str(exc)
        asked = re.search(r"allocate (\d+) bytes", text)
        if isinstance(exc, MemoryError) or asked or "out of memory" in text.lower():
            what = f" (an allocation of {int(asked.group(1)) / 2**20:.0f} MiB)" if asked else ""
            result["failed"] = f"out of memory under the {spec['memory_limit'] / GIB:g} GiB limit{what}"
        else:
            first = (text.strip().splitlines() or [type(exc).__name__])[0]
            result["failed"] = f"{type(exc).__name__}: {first[:160]}"
        return result
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    elif result["peak_source"] == "VmHWM":
        result["peak_bytes"] = (_proc_status("VmHWM") or 0) - base
    else:
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_bytes"] = ru_after - base
        if ru_after == ru_before:  # the peak predates the read: only a bound is known
            result["peak_is_upper_bound"] = True
    result["seconds_median"] = statistics.median(times)
    result["seconds_all"] = times
    if spec.get("save"):
        grads = [leaf.grad.detach().cpu() for leaf in leaves]
        torch.save({"out": out.cpu(), "grad_z": grads[0], "grad_memory": grads[1], "grad_beta": grads[2]}, spec["save"])
    return result


# ---------------------------------------------------------------- driver
def run_config(spec: dict, timeout: float, mmap_threshold: int) -> dict:
    """``spec`` in a fresh interpreter; its last stdout line is the result JSON."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)  # read by glibc at start-up
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def max_differences(a_path: str, b_path: str) -> tuple[dict, dict]:
    """Largest |a − b| of the output and of each gradient, as saved by two workers, and
    the largest |a| of each (the scale to judge the differences by)."""
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    keys = ("out", "grad_z", "grad_memory", "grad_beta")
    return {k: float((a[k] - b[k]).abs().max()) for k in keys}, {k: float(a[k].abs().max()) for k in keys}


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="2048,8192,32768", help="comma-separated numbers of queries N")
    parser.add_argument("--k", default="512,4096,65536", help="comma-separated numbers of slots K")
    parser.add_argument("--dim", type=int, default=64, help="D, the width of queries and slots")
    parser.add_argument("--similarities", default="l2", help="comma-separated: l2, cosine")
    parser.add_argument("--impls", default="straightforward,fused,auto", help="comma-separated: straightforward, fused, auto, dense")
    parser.add_argument("--beta", type=float, default=1.0, help="β of the read (the config's default beta_init)")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the read runs")
    parser.add_argument("--memory-limit", type=float, default=8.0, help="GiB: skip dense versions estimated above it; "
                        "on CPU also the cap on each subprocess's extra address space")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                        help="bytes: glibc serves larger allocations by mmap and returns them on free (0: glibc's default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    parser.add_argument("--seed", type=int, default=0, help="seed of z, M and the upstream gradient")
    parser.add_argument("--out", default="benchmarks/results/memory_read.json", help="JSON output path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _measure_grid(args: argparse.Namespace, impls: list[str], threshold: int, limit: int) -> list[dict]:
    """One row per (similarity, N, K, implementation), each measured in its own subprocess; the
    rows of one (similarity, N, K) get their ratio to, and largest differences from, the
    straightforward read."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for sim in [s.strip() for s in args.similarities.split(",") if s.strip()]:
            for n in ints(args.n):
                for k in ints(args.k):
                    saved, by_path = {}, {}
                    for impl in impls:
                        row = {"similarity": sim, "n": n, "k": k, "dim": args.dim, "impl": impl}
                        dense = impl in ("straightforward", "dense") or (impl == "auto" and n * k <= threshold)
                        if impl == "auto" and not dense and "fused" in by_path:
                            results.append({**row, **by_path["fused"], "note": "auto → fused: the fused row"})
                            continue
                        if dense:
                            estimate = DENSE_MATRICES["straightforward" if impl == "straightforward" else "dense"] * 4 * n * k
                            row["estimated_bytes"] = estimate
                            if estimate > limit:
                                results.append({**row, "skipped": f"needs about {estimate / GIB:.1f} GiB > limit {args.memory_limit:g} GiB"})
                                print(f"{sim} N={n} K={k} {impl}: skipped", flush=True)
                                continue
                        spec = {"n": n, "k": k, "dim": args.dim, "similarity": sim, "impl": impl, "beta": args.beta,
                                "repeats": args.repeats, "threads": torch.get_num_threads(), "device": args.device,
                                "seed": args.seed, "memory_limit": limit, "save": os.path.join(tmp, f"{impl}.pt")}
                        measured = run_config(spec, args.timeout, args.malloc_mmap_threshold)
                        row.update(measured)
                        by_path[measured.get("path") or impl] = measured
                        if "failed" not in measured:
                            saved[impl] = spec["save"]
                        results.append(row)
                        status = measured.get("failed") or f"{1e3 * measured['seconds_median']:.1f} ms, peak {measured['peak_bytes'] / 2**20:.0f} MiB"
                        print(f"{sim} N={n} K={k} {impl}: {status}", flush=True)
                    reference = results[-len(impls):]
                    base = next((r for r in reference if r["impl"] == "straightforward" and "seconds_median" in r), None)
                    for r in reference:
                        if base is not None and "seconds_median" in r:
                            r["ratio_to_straightforward"] = r["seconds_median"] / base["seconds_median"]
                        if r["impl"] != "straightforward" and r["impl"] in saved and "straightforward" in saved:
                            r["max_abs_diff"], r["reference_max_abs"] = max_differences(saved["straightforward"], saved[r["impl"]])
    return results


def _targets(results: list[dict]) -> list[dict]:
    """The speed targets' rows: the fused read's peak extra memory at N=8192, K=65536."""
    checks = []
    for r in results:
        if r["impl"] == "fused" and r["similarity"] == "l2" and r["n"] == 8192 and r["k"] == 65536:
            peak = r.get("peak_bytes")
            checks.append({"target": "memvae fused read, N=8192, K=65536, l2: peak extra memory ≤ 1 GiB",
                           "value": None if peak is None else peak / GIB, "limit": 1.0,
                           "met": peak is not None and peak <= GIB and "failed" not in r})
    return checks


def _print_tables(results: list[dict], checks: list[dict]) -> None:
    """The results and the targets as markdown tables."""
    header = ["sim", "N", "K", "impl", "path", "ms (median)", "× straightforward", "peak extra MiB",
              "max |Δ| out", "max |Δ| ∂z", "max |Δ| ∂M", "max |Δ| ∂β", "note"]
    rows = []
    for r in results:
        diff = r.get("max_abs_diff", {})
        peak = r.get("peak_bytes")
        note = r.get("skipped") or r.get("failed") or r.get("note") or ("peak is an upper bound" if r.get("peak_is_upper_bound") else "")
        rows.append([r["similarity"], r["n"], r["k"], r["impl"], r.get("path", ""),
                     1e3 * r["seconds_median"] if "seconds_median" in r else None, r.get("ratio_to_straightforward"),
                     None if peak is None else peak / 2**20, diff.get("out"), diff.get("grad_z"),
                     diff.get("grad_memory"), diff.get("grad_beta"), note])
    print()
    print(markdown(header, rows))
    if checks:
        print()
        print(markdown(["target", "measured (GiB)", "limit (GiB)", "met"], [[c["target"], c["value"], c["limit"], c["met"]] for c in checks]))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA device is available")
    from memvae.quantizers.memory import MemoryRead
    from memvae.training.runs import environment

    threshold = inspect.signature(MemoryRead).parameters["fused_threshold"].default
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = int(args.memory_limit * GIB)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    env = {**environment(), "device": args.device, "torch_threads": torch.get_num_threads()}
    if args.device == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name()
    print(f"device {args.device} ({env.get('cuda_device') or env['cpu_model']}), torch {torch.__version__}, "
          f"{env['torch_threads']} threads", flush=True)

    results = _measure_grid(args, impls, threshold, limit)
    checks = _targets(results)
    report = {"benchmark": "memory_read", "environment": env,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
              "results": results, "targets": checks}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))

    _print_tables(results, checks)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
