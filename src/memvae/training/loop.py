"""The loop (:func:`run_updates`): update, and at due updates log, evaluate, save, stop; the
autoencoder's (:mod:`memvae.training.train`) and the prior's (:mod:`memvae.prior.fit`). With it
what rank 0 writes as it goes (:class:`RunLog`), SIGINT/SIGTERM as a flag the loop reads
(:class:`StopRequest`) and the checkpoint save (:func:`save`)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

from tqdm import tqdm

from memvae.config import schema as C
from memvae.training.distributed import Distributed
from memvae.training.metrics import BAR_FORMAT, MetricsLog, progress_line, rate_text
from memvae.training.runs import environment


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each update."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ranks: Distributed, due: bool) -> bool:
        """Whether to stop now. One process: as soon as a signal came. Several: only at
        updates where the loop reads anyway (``due``), all ranks together, so that every
        rank stops at the same update without a collective per update."""
        if ranks.world == 1:
            return self.signal is not None
        return due and ranks.any(self.signal is not None)

    def interrupt(self, step: int, resume_command: str) -> KeyboardInterrupt:
        name = signal.Signals(self.signal).name if self.signal is not None else "a signal to another process"
        return KeyboardInterrupt(f"{name}: stopped at update {step}, checkpoint saved; resume with {resume_command}")


# ------------------------------------------------------------------ what rank 0 writes
class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar; on ranks other than 0, only a
    silent bar. Opening it writes config.toml and meta.json."""

    def __init__(self, run_dir: Path, cfg: C.Config, ranks: Distributed, step: int, resume: bool,
                 thread_history: list[list[int]], show_progress: bool):
        self.is_main = ranks.is_main
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.writer = None
        if self.is_main:
            if resume:
                # Records after the checkpoint (all of them, when a run died before its first
                # checkpoint) come again from this run: drop them so that none appears twice.
                self.metrics.truncate_after(step)
            (run_dir / "config.toml").write_text(C.to_toml(cfg))
            meta = {"config_name": cfg.name, "device": str(ranks.device), "world_size": ranks.world, **environment(),
                    "thread_history": thread_history}
            meta_path = run_dir / "meta.json"
            if resume and meta_path.exists():
                # The command that started the run stays; each resume adds its own.
                first = json.loads(meta_path.read_text())
                resumed = {"step": step, "argv": meta["argv"], "git_commit": meta["git_commit"]}
                meta = {**meta, "argv": first.get("argv"), "resumes": [*first.get("resumes", []), resumed]}
            meta_path.write_text(json.dumps(meta, indent=1))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if resume else None)
        self.bar = tqdm(total=cfg.train.steps, initial=step, disable=not (show_progress and self.is_main),
                        desc=cfg.name, dynamic_ncols=True, bar_format=BAR_FORMAT)
        self.name, self.total, self.clock = cfg.name, cfg.train.steps, None  # clock: the first record's (update, seconds)
        if self.is_main and resume and step:
            print(f"{cfg.name}: resuming {run_dir} from update {step} of {cfg.train.steps}", flush=True)

    def advance(self) -> None:
        """One update done (the bar)."""
        self.bar.update(1)

    def train(self, record: dict) -> dict:
        if self.is_main:
            self.metrics.append(record)
            for key, value in record.items():
                if key not in ("kind", "step"):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.clock = self.clock or (record["step"], record["train_seconds"])
        # The bar's one rate and time left are the plain line's: training seconds since this process's first record.
        self.bar.set_postfix_str(f"NMSE {record['train_nmse']:.4f}, perplexity {record['train_perplexity']:.1f}"
                                 + rate_text(record, self.total, self.clock))
        if self.is_main and self.bar.disable:  # --no-progress: one plain line per log record
            print(progress_line(self.name, record, self.total, self.clock), flush=True)
        return record

    def eval(self, record: dict) -> None:
        if self.is_main:
            self.metrics.append(record)
            for key in ("eval_nmse", "eval_perplexity", "eval_slots_used"):
                if key in record:  # a bottleneck without codes has no perplexity or slots
                    self.writer.add_scalar(key.replace("eval_", "eval/"), record[key], record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


# ------------------------------------------------------------------ the loop
def run_updates(t, log, ranks: Distributed, steps: int, every: tuple[int, int, int], stop_after: int | None,
                resume_command: str) -> dict:
    """Update ``t`` until update ``steps``; returns the last "train" record.

    ``t`` is a :class:`Trainer` or anything with its loop methods (``step``, ``update``,
    ``settle``, ``record``, ``evaluate``, ``save(final)``, ``resume_clock``), such as the
    prior's (:class:`memvae.prior.fit.PriorTrainer`); ``log`` has ``advance``, ``train``,
    ``eval`` and ``close`` (:class:`RunLog`). ``every`` = (log, evaluation, checkpoint)
    intervals in updates (0: only at the last update, which always does all three).

    Only at those updates, and at a stop (SIGINT/SIGTERM, ``stop_after``), does the loop
    read anything from the device (:meth:`Trainer.settle`): the updates between run ahead.
    A stop saves a checkpoint and raises KeyboardInterrupt naming ``resume_command``
    (a signal) or returns (``stop_after``).
    """
    def due(interval: int) -> bool:
        return t.step == steps or (interval > 0 and t.step % interval == 0)

    last_record: dict = {}
    with StopRequest() as stop:
        t.resume_clock()
        while t.step < steps:
            t.update()
            log.advance()
            logging, evaluating, saving = (due(interval) for interval in every)
            signalled = stop.agreed(ranks, due=logging or evaluating or saving)
            stopping = signalled or (stop_after is not None and stop_after <= t.step < steps)
            if not (logging or evaluating or saving or stopping):
                continue  # nothing reads the weights: no host sync
            t.settle()  # the one host sync: a non-finite update in stop mode ends the run here
            if logging:
                last_record = log.train(t.record())
            if evaluating:
                log.eval(t.evaluate())
            if saving or stopping:
                t.save(final=stopping or t.step == steps)
            if stopping:
                log.close()
                if signalled:
                    raise stop.interrupt(t.step, resume_command)
                return last_record
            t.resume_clock()
    log.close()
    return last_record
