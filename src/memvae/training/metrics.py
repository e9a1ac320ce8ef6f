"""Reconstruction measures and the JSON-lines metrics log."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def nmse(mse: float, variance: float) -> float:
    """MSE normalised by the training pixels' variance (both on the [0, 1] pixel scale)."""
    return mse / variance


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels on the [0, 1] scale."""
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each with a ``step`` and a ``kind``
    ("train" or "eval"). Plots and tables are derived from it, never recomputed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        """All complete records; a line cut short by a crash is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (on resume, so the log matches an unbroken run)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_metrics(run_dir: str | os.PathLike, kind: str = "train") -> list[dict]:
    """The records of one kind from a run directory's metrics.jsonl."""
    return [r for r in MetricsLog(Path(run_dir) / "metrics.jsonl").read() if r.get("kind") == kind]


def rate_since(start: tuple[int, float] | None, record: dict) -> float | None:
    """Updates per second of training time from ``start`` (update, training seconds) to a
    train record; None before there is a measured interval."""
    if start is None or record["step"] <= start[0] or record["train_seconds"] <= start[1]:
        return None
    return (record["step"] - start[0]) / (record["train_seconds"] - start[1])


# Progress bars show one rate and one time left, the log's (:func:`rate_text`), not tqdm's own.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def rate_text(record: dict, total: int, clock: tuple[int, float] | None) -> str:
    """``, r updates/s, about t left`` for a train record, the rate measured from ``clock``
    (the first record this process saw: update, training seconds); empty before there is
    a measured interval. Both the progress bars and the plain progress lines show it."""
    rate = rate_since(clock, record)
    return f", {rate:.2f} updates/s, about {duration_text((total - record['step']) / rate)} left" if rate else ""


def progress_line(name: str, record: dict, total: int, clock: tuple[int, float] | None) -> str:
    """``name: update s/total, train NMSE x, r updates/s, about t left`` for a train record
    (see :func:`rate_text`)."""
    return f"{name}: update {record['step']}/{total}, train NMSE {record['train_nmse']:.4f}{rate_text(record, total, clock)}"


def duration_text(seconds: float) -> str:
    """3.2 h, 14 min or 40 s."""
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
