"""What a compare says of its runs: its plan as it starts (runs, updates each, runs at once,
the time it expects in all), the time left in all as the runs' rates come in, and how far
each unfinished run has got.

Times are estimates from the rates the runs log (updates per second of their own
training clock); nothing here waits, polls or decides anything by the clock.
"""
from __future__ import annotations

import heapq
from pathlib import Path

from memvae.training.metrics import duration_text, rate_since, read_metrics


def _records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


def logged_step(run_dir: Path) -> int:
    """The last update a run has logged (0 before its first record): progress read from its log."""
    return max((r["step"] for r in _records(run_dir)), default=0)


def measured_rate(run_dir: Path) -> float | None:
    """A run's updates per second of training time, from its first logged record to its last
    (None before it has two)."""
    records = _records(run_dir)
    return rate_since((records[0]["step"], records[0]["train_seconds"]), records[-1]) if records else None


def time_left(running: list[tuple[int, float | None]], pending: list[int], workers: int,
              rates: list[float] = ()) -> float | None:
    """Seconds until the last run of a compare ends, or None before any rate is measured.

    ``running``: (updates left, its measured updates/s or None) of each run training now;
    ``pending``: the updates left of each run still to start, in order, each on the first of
    the ``workers`` to free; ``rates``: rates measured on runs that have ended. A run
    without a rate of its own goes at the mean of all measured ones (runs trained side by
    side share the cores alike, so one run's rate says much of the others')."""
    measured = [rate for _, rate in running if rate] + list(rates)
    if not measured:
        return None
    mean = sum(measured) / len(measured)
    ends = [left / (rate or mean) for left, rate in running] + [0.0] * max(0, workers - len(running))
    heapq.heapify(ends)
    for left in pending:
        heapq.heappush(ends, heapq.heappop(ends) + left / mean)
    return max(ends, default=0.0)


def plan_text(runs: int, steps: int, left: list[int], workers: int, seconds: float | None) -> str:
    """The line a compare opens with: ``runs`` of ``steps`` updates, the ``left`` updates of
    each run still to train, ``workers`` at a time, and ``seconds`` in all (None: not yet measured)."""
    done = runs - len(left)
    head = (f"plan: {runs} run{'s' * (runs != 1)} of {steps} updates, {len(left)} to train"
            + (f" ({done} finished already)" if done else "") + f", {workers} at a time")
    if not left:
        return head
    if seconds is None:
        return head + ("; the time in all is estimated once the first runs have logged (each run's own line "
                       "shows the time left of that run only)")
    return head + f"; about {duration_text(seconds)} in all at the rates measured so far"


def total_text(trained: int, runs: int, seconds: float | None) -> str:
    """``compare: 2 of 8 runs trained, about 3.1 h left in all`` (the whole compare's, not one run's)."""
    when = f"about {duration_text(seconds)} left in all" if seconds is not None else "time left in all not measured yet"
    return f"compare: {trained} of {runs} runs trained, {when}"


def progress_text(run_dir: Path, checkpoint_step: int, steps: int) -> str:
    """How far an unfinished run has got: ``vq-seed1 (update 400 of 25000)``, the later of its
    log and its newest checkpoint (a run training elsewhere logs ahead of its checkpoints),
    or ``vq-seed1 (not started)``."""
    step = max(checkpoint_step, logged_step(run_dir))
    return f"{run_dir.name} ({f'update {step} of {steps}' if step else 'not started'})"
