"""Training a plan's missing runs: each run is one command, ``memvae leaderboard PLAN --only RUN``,
that trains the run (or continues it from its checkpoint) and completes its row
(:func:`memvae.experiments.row.complete_row`). ``memvae leaderboard PLAN`` runs these commands
``jobs`` at a time, in the plan's order; ``--plan FILE`` writes them, one per line, for a Slurm
array, GNU parallel or bash. A command run twice does nothing the second time."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from memvae.data import default_data_dir, load_data
from memvae.errors import MemvaeError
from memvae.experiments.leaderboard import Plan, Run, missing, run_missing
from memvae.experiments.row import LOSSLESS_FILE, complete_row


def lossless_file(plan: Plan, data_dir: str | None, lossless: str | None) -> str | None:
    """The lossless originals' .npz when the plan's rows need them: ``lossless``, else
    DATA_DIR/cifar10-lossless-subset.npz; a missing file is one line."""
    if "lossless" not in plan.sets:
        return None
    path = Path(lossless) if lossless else (Path(data_dir) if data_dir else default_data_dir()) / LOSSLESS_FILE
    if not path.is_file():
        raise MemvaeError(f"the plan's rows include the lossless originals, but {path} does not exist (--lossless FILE)")
    return str(path)


def train_one(plan: Plan, name: str, data_dir: str | None = None, lossless: str | None = None) -> list[str]:
    """Train run ``name`` of ``plan`` to its updates (continuing from its checkpoint) and
    complete its row; returns the steps it did (nothing for a complete run)."""
    from memvae.training.train import train

    run = plan.run(name)
    todo = run_missing(plan, run)
    if not todo:
        print(f"{name}: complete, nothing to do", flush=True)
        return []
    lossless = lossless_file(plan, data_dir, lossless)
    cfg = run.cfg
    data = load_data(cfg.data.source, data_dir or cfg.data.dir or None, cfg.data.image_size)
    if "train" in todo:
        # An existing folder is continued, from its checkpoint or from update 0 when it has none (a run killed
        # before its first checkpoint); one that another process is training is refused by its lock, naming it.
        train(cfg, run.run_dir, resume=run.run_dir.exists(), data=data, show_progress=False)
    complete_row(run.run_dir, cfg, data, plan.sets, lossless, data_dir,
                 say=lambda text: print(text, flush=True))
    print(f"{name}: row complete", flush=True)
    return todo


def command(plan: Plan, run: Run, data_dir: str | None, lossless: str | None) -> list[str]:
    """The argv that trains ``run`` and completes its row (absolute paths: it runs anywhere)."""
    argv = [sys.executable, "-m", "memvae", "leaderboard", str(plan.path.resolve()), "--only", run.name]
    data = data_dir or os.environ.get("MEMVAE_DATA_DIR")
    if data:
        argv += ["--data-dir", str(Path(data).resolve())]
    if lossless:
        argv += ["--lossless", str(Path(lossless).resolve())]
    return argv


def runs_to_train(plan: Plan) -> list[Run]:
    """The plan's incomplete runs that can be trained here, in its order; an earlier run
    without its committed files is an error (its study is not this plan's to repeat)."""
    todo = missing(plan)
    lost = [run.name for run, _ in todo if run.earlier]
    if lost:
        raise MemvaeError(f"earlier runs {', '.join(lost)} lack their committed eval.json; restore them or drop "
                          "them from earlier_seeds")
    return [run for run, _ in todo]


def write_commands(plan: Plan, path: str | Path, data_dir: str | None, lossless: str | None) -> list[Run]:
    """One shell line per run to train (``memvae leaderboard PLAN --only RUN``) into ``path``."""
    todo = runs_to_train(plan)
    lossless = lossless_file(plan, data_dir, lossless)
    Path(path).write_text("".join(shlex.join(command(plan, r, data_dir, lossless)) + "\n" for r in todo))
    return todo


def train_missing(plan: Plan, jobs: int, data_dir: str | None, lossless: str | None) -> dict[str, int]:
    """Run the commands of the plan's incomplete runs, ``jobs`` at a time in the plan's order,
    each in its own process (one thread each, unless $OMP_NUM_THREADS says otherwise); returns
    {run: exit status} of those that failed."""
    todo = runs_to_train(plan)
    lossless = lossless_file(plan, data_dir, lossless)
    print(f"{len(todo)} run{'s' * (len(todo) != 1)} to train or complete, {jobs} at a time: "
          f"{', '.join(r.name for r in todo) or 'none'}", file=sys.stderr, flush=True)

    def one(run: Run) -> tuple[str, int]:
        return run.name, subprocess.run(command(plan, run, data_dir, lossless)).returncode

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, todo))
    return {name: code for name, code in results if code != 0}


def submit_missing(plan: Plan, data_dir: str | None, lossless: str | None, options,
                   poll_seconds: float = 10.0) -> dict[str, str]:
    """The same commands as jobs of submitit (Slurm, or its local executor), one per run, with
    ``options`` (:class:`memvae.experiments.cluster_options.LauncherOptions`); a job stopped by
    its time limit is requeued and its command continues the run. Waits for every job and
    returns {run: why} of those that failed. Logs and submitit's files: PLAN's folder/jobs/."""
    from memvae.experiments.cluster import Run as Job, follow, launch
    from memvae.experiments.plan import RunCommand

    todo = runs_to_train(plan)
    lossless = lossless_file(plan, data_dir, lossless)
    jobs = [Job(r.name, RunCommand(r.run_dir.resolve(), tuple(command(plan, r, data_dir, lossless)[1:])), plan.steps)
            for r in todo]
    if not jobs:
        return {}
    watched, _ = launch(jobs, plan.path.parent / "jobs", options)
    return follow(watched, poll_seconds)
