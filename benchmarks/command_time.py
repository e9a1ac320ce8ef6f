"""Time one shell command as a user runs it, and record where: the figures the README gives for
its two commands come from the JSON this writes (docs/benchmarks.md, "What the commands cost").

    python benchmarks/command_time.py --name test_command --out benchmarks/results/test_command.json \
        -- bash .ci/run

Records the wall time, the exit status, the last lines of the command's output (pytest's
summary, compare's table), and the machine: CPU model, cores, the 1-minute load average
before and after (another job on the cores makes every figure slower: say which it was),
the date and the git commit. Prints one line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from memvae.training.runs import cpu_model


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="what the command is (test_command, main_command_short, ...)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--note", default="", help="what else the machine was doing, in words")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    load_before, commit = os.getloadavg()[0], git_commit()  # the code the command ran, not what came after
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - clock
    output = (done.stdout + done.stderr).strip().splitlines()
    load_after = os.getloadavg()[0]
    record = {
        "benchmark": f"command_time ({args.name})",
        "command": command,
        "returncode": done.returncode,
        "wall_seconds": seconds,
        "started_utc": started.isoformat(timespec="seconds"),
        "note": args.note,
        "output_tail": output[-15:],
        # As every benchmark file records its machine (docs/benchmarks.md's table of files).
        "environment": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "git_commit": commit, "load_average_start": [load_before],
                        "load_average_end": [load_after]},
        "settings": {"threads": os.environ.get("OMP_NUM_THREADS", "default (1 per run)")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    env = record["environment"]
    print(f"{args.name}: exit {done.returncode} after {seconds / 60:.1f} min on {env['cpu_model']} "
          f"({env['cpu_count']} cores, load {load_before:.2f} before, {load_after:.2f} after); wrote {args.out}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
