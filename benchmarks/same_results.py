"""Do results move between two versions of memvae? Train every packaged config for a few
hundred updates at one thread with a fixed seed, and compare the training logs bit for bit.

Run it once with each version's ``memvae`` (for example an install of the commit before a
refactoring and one of the commit after it), then compare the two JSON files::

    python benchmarks/same_results.py run --memvae /path/to/old/venv/bin/memvae --out before.json --data-dir ../shared/data
    python benchmarks/same_results.py run --memvae .venv/bin/memvae --out after.json --data-dir ../shared/data
    python benchmarks/same_results.py compare before.json after.json

``run`` writes, per config, every record of the run's metrics.jsonl without its wall-clock
fields (``train_seconds`` and the like). ``compare`` prints one line per config: "same"
when every number is equal as a float (bit for bit), else the first key that differs.
It exits 1 when any config differs or is missing on one side.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING = ("seconds", "per_second", "elapsed")  # fields that hold wall-clock time, not results


def configs(memvae: str) -> list[str]:
    """The packaged configs this ``memvae`` lists (first word of each line of ``memvae configs``)."""
    out = subprocess.run([memvae, "configs"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith(" ")]


def train_log(memvae: str, config: str, steps: int, data_dir: str, work: Path) -> list[dict]:
    """The metrics.jsonl records of ``steps`` updates of ``config``, seed 0, one thread,
    without timing fields."""
    run_dir = work / config
    cmd = [memvae, "train", "--config", config, "--run-dir", str(run_dir), "--data-dir", data_dir, "--no-progress",
           "--train.steps", str(steps), "--train.threads", "1", "--train.seed", "0",
           "--train.log_every", "100", "--train.eval_every", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return [{"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in records]


def run(args) -> None:
    names = args.configs.split(",") if args.configs else configs(args.memvae)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = train_log(args.memvae, name, args.steps, args.data_dir, Path(tmp))
            print(f"{name}: {len(results[name])} records", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))


def compare(args) -> int:
    before, after = json.loads(Path(args.before).read_text()), json.loads(Path(args.after).read_text())
    differ = 0
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            print(f"{name:28s} only in {'after' if name in after else 'before'}")
            differ += 1
            continue
        a, b = before[name], after[name]
        # json.dumps compares floats bit for bit (repr round-trips) and NaN equal to NaN.
        first = next(((i, k) for i, (ra, rb) in enumerate(zip(a, b)) for k in sorted(set(ra) | set(rb))
                      if json.dumps(ra.get(k)) != json.dumps(rb.get(k))), None)
        if first is None and len(a) == len(b):
            last = next((r for r in reversed(a) if "eval_nmse" in r), {})
            print(f"{name:28s} same ({len(a)} records; at update {last.get('step')} eval NMSE {last.get('eval_nmse')})"
                  if a else f"{name:28s} same (no records)")
        else:
            differ += 1
            i, key = first if first else (min(len(a), len(b)), "(record count)")
            print(f"{name:28s} DIFFERS at record {i}, {key}: {a[i].get(key) if i < len(a) else None} "
                  f"-> {b[i].get(key) if i < len(b) else None}")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--memvae", default="memvae", help="the memvae executable of the version to measure")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--configs", help="comma-separated names (default: every packaged config)")
    p = sub.add_parser("compare")
    p.add_argument("before")
    p.add_argument("after")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
