"""The training loop: generic over models, exact to resume, safe to interrupt.

Runs on one process, or on several under ``torchrun`` (DistributedDataParallel). The loop
is :func:`train` (its body, ``_train``, runs with the run directory locked: one writer per
run, :mod:`memvae.training.runlock`); what it calls is named in :mod:`memvae.training.engine`: the update and
its non-finite guard, the interval's sums, evaluation, checkpoints, signals, distributed setup.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from memvae.config import schema as C
from memvae.data import ImageData, load_data
from memvae.errors import MemvaeError
from memvae.training.checkpoint import latest_checkpoint, load_checkpoint
from memvae.training.distributed import Distributed, choose_threads, repeatable, resolve_device
from memvae.training.engine import Trainer
from memvae.training.loop import RunLog, run_updates
from memvae.training.runlock import run_lock
from memvae.training.runs import prepare_run_dir

__all__ = ["train", "resolve_device"]


def train(
    cfg: C.Config,
    run_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    data_dir: str | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
    data: ImageData | None = None,
) -> dict:
    """Train ``cfg``'s model, writing the run directory; returns the last log record.

    Args:
        cfg: validated config.
        run_dir: where the run lives (refused if it exists, unless resume/overwrite).
        resume: continue from the newest checkpoint in ``run_dir``.
        overwrite: delete an existing ``run_dir`` first.
        data_dir: overrides ``cfg.data.dir``.
        show_progress: tqdm progress bar.
        stop_after: stop (with a checkpoint, as on SIGTERM) after this many updates in
            total; for tests and for splitting long runs.
        data: images already in memory (skips loading ``cfg.data``), e.g. your own tensors.

    While it runs, rank 0 holds the run directory's lock (:mod:`memvae.training.runlock`): another
    process that would write the same run fails at once. A checkpoint that cannot be
    saved mid-run is a warning; the last one (at the end, or at a stop) is an error that
    names the newest checkpoint on disk (:func:`memvae.training.engine.save`).
    """
    run_dir, ranks = Path(run_dir), Distributed(cfg.train.device)
    if cfg.train.batch_size % ranks.world:
        raise MemvaeError(f"batch size {cfg.train.batch_size} does not split evenly over {ranks.world} processes")
    new = not run_dir.exists()  # a run that fails before writing anything leaves no folder behind
    if ranks.is_main and not (resume or overwrite):
        prepare_run_dir(run_dir, resume, overwrite)  # an existing folder is refused before it gets a lock file
    with run_lock(run_dir, remove_if_unused=new) if ranks.is_main else nullcontext():
        return _train(cfg, run_dir, ranks, resume, overwrite, data_dir, show_progress, stop_after, data)


def _train(cfg: C.Config, run_dir: Path, ranks: Distributed, resume: bool, overwrite: bool, data_dir: str | None,
           show_progress: bool, stop_after: int | None, data: ImageData | None) -> dict:
    """:func:`train`, with the run directory locked."""
    tc = cfg.train
    if ranks.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
    ranks.barrier()
    found, state = _checkpoint_to_resume(run_dir, resume, ranks)
    if state is not None and int(state["step"]) > tc.steps:
        raise MemvaeError(f"run {run_dir} is already at update {int(state['step'])}, past train.steps {tc.steps}: nothing "
                          f"to train (a run is not shortened; resume with --steps above {int(state['step'])} to train further)")
    thread_history = _set_threads(tc.threads, state, ranks)
    torch.manual_seed(tc.seed)
    if data is None:
        data = load_data(cfg.data.source, data_dir or cfg.data.dir or None, cfg.data.image_size)
    t = Trainer(cfg, data, ranks, run_dir)
    t.thread_history = thread_history
    if state is not None:
        t.load_state_dict(state, found)
    t.wrap()
    log = RunLog(run_dir, cfg, ranks, t.step, resume, thread_history, show_progress)

    with repeatable(ranks.device, tc.deterministic):
        return run_updates(t, log, ranks, tc.steps, (tc.log_every, tc.eval_every, tc.checkpoint_every), stop_after,
                           f"memvae train --run-dir {run_dir} --resume")


def _checkpoint_to_resume(run_dir: Path, resume: bool, ranks: Distributed) -> tuple[Path | None, dict | None]:
    """(path, state) of the newest checkpoint when resuming, else (None, None)."""
    found = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and found is None and ranks.is_main:
        print(f"no checkpoint in {run_dir}: starting from update 0")
    if found is None:
        return None, None
    return found[0], load_checkpoint(*found, map_location=ranks.device)


def _set_threads(requested: int, state: dict | None, ranks: Distributed) -> list[list[int]]:
    """Set torch's CPU thread count (see :func:`memvae.training.distributed.choose_threads`); returns the
    run's thread history, [update from which, threads] pairs, for its checkpoints and meta.json."""
    step = 0 if state is None else int(state["step"])
    saved = None if state is None or "threads" not in state else int(state["threads"])
    threads, note = choose_threads(requested, saved, step, state is not None)
    torch.set_num_threads(threads)
    if note and ranks.is_main and ranks.device.type == "cpu":
        print(note)
    history = [[int(a), int(b)] for a, b in state.get("thread_history", [])] if state is not None else []
    if not history or history[-1][1] != threads:
        history.append([step, threads])
    return history
