"""The trainer (:class:`Trainer`): model, Adam, batch order and update count; one update;
evaluation; checkpoint state; the mark a non-finite update is undone back to. With it the
training measures summed on the device between log records (:class:`IntervalMeter`).

The rest of training, one concern per module: :mod:`memvae.training.distributed` (device,
ranks, repeatability, threads), :mod:`memvae.training.guard` (the non-finite guard) and
:mod:`memvae.training.loop` (the loop, the run log, stop requests, saving).

No update reads a value back from the device. The non-finite check, the interval's sums
and the update's own measures stay on the device; the loop reads them only when it logs,
evaluates, saves a checkpoint or stops (see :meth:`Trainer.settle`).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from memvae.config import schema as C
from memvae.config.upgrade import upgrade_checkpoint
from memvae.data import EpochBatcher, ImageData, to_input
from memvae.errors import MemvaeError
from memvae.networks.autoencoder import Autoencoder, AutoencoderOutput
from memvae.training.checkpoint import latest_checkpoint, save_checkpoint
from memvae.training.distributed import Distributed
from memvae.training.evaluate import evaluate_read
from memvae.training.guard import NonfiniteGuard
from memvae.training.metrics import nmse
from memvae.training.runs import config_mismatch


class IntervalMeter:
    """Sums of the training measures since the last log record, held on the device.

    ``sums`` is float64 [recon_mse, perplexity, updates, skipped]: each update adds its
    float32 measures, converted exactly, in update order, so the sums are those a Python
    float accumulator would hold, without reading anything back per update.
    """

    KEYS = ("recon_mse", "perplexity", "updates", "skipped")

    def __init__(self, device: torch.device, state: dict | None = None):
        values = [0.0] * 4 if state is None else [float(state[k]) for k in self.KEYS]
        self.sums = torch.tensor(values, dtype=torch.float64, device=device)
        self._counts = torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)
        self._skipped = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
        self._nan = torch.full((), float("nan"), dtype=torch.float64, device=device)  # made once: no copy per update

    def add(self, out: AutoencoderOutput, applied: torch.Tensor) -> None:
        """One update: its reconstruction MSE and perplexity when ``applied`` (a device
        bool), else one more skipped update."""
        # A bottleneck without codes (the continuous control) has no perplexity: NaN in the log.
        perplexity = out.bottleneck.metrics.get("perplexity", self._nan)
        measures = torch.cat([torch.stack([out.recon_mse.detach().double(), perplexity.detach().double()]), self._counts])
        self.sums += torch.where(applied, measures, self._skipped)

    def totals(self, ranks: Distributed) -> dict[str, float]:
        """The sums over all ranks, read (a host sync: only at log and checkpoint updates)."""
        return dict(zip(self.KEYS, ranks.sum_(self.sums.clone()).tolist()))

    def record(self, step: int, variance: float, ranks: Distributed, last: AutoencoderOutput, train_seconds: float,
               logged: tuple[str, ...] = ()) -> dict:
        """The log record of the interval ending at ``step``, with the bottleneck's ``logged``
        metrics of the interval's last batch; the sums start again."""
        s = self.totals(ranks)
        # An interval whose updates were all skipped has no training error: NaN, not 0.
        updates = s["updates"] if s["updates"] else float("nan")
        record = {
            "kind": "train",
            "step": step,
            "train_nmse": nmse(s["recon_mse"] / updates, variance),
            "train_perplexity": s["perplexity"] / updates,
            "skipped": int(s["skipped"] / ranks.world),
            "train_seconds": train_seconds,
        }
        for key in logged:
            if key in last.bottleneck.metrics:
                record[key] = float(last.bottleneck.metrics[key])
        self.sums.zero_()
        return record


# ------------------------------------------------------------------ the non-finite guard
def _in_parameter_layout(p: torch.Tensor):
    """A gradient hook giving ``p``'s gradient ``p``'s strides. The convolution backward
    gives a 1×1 kernel's weight gradient strides (8, 1, 8, 8) where the weight has
    (8, 1, 1, 1): the same layout to autograd (the strides of size-1 dimensions do not
    count), a mismatch to DDP's buckets, which copy it and warn at every run."""
    strides = p.stride()
    return lambda g: g if g.stride() == strides else g.clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ one update, and its state
class Trainer:
    """What changes as training goes (model, Adam, batch order, update count, interval
    sums) and how it changes: one update at a time, with no read from the device (see
    :class:`NonfiniteGuard`); :meth:`settle` reads what the updates left, before anything
    reads the weights."""

    def __init__(self, cfg: C.Config, data: ImageData, ranks: Distributed, run_dir: Path):
        tc = cfg.train
        self.cfg, self.ranks, self.device, self.run_dir = cfg, ranks, ranks.device, run_dir
        self.variance = data.train_variance()
        if cfg.data.train_images > len(data.train):
            raise MemvaeError(f"config key 'data.train_images' is {cfg.data.train_images}, but the data has only "
                              f"{len(data.train)} training images")
        # The whole set (or its first data.train_images) stays resident (uint8).
        self.train_images = data.train[: cfg.data.train_images or None].to(self.device)
        self.eval_images = data.test[: cfg.data.eval_images]
        # Batch indices on the images' device: indexing them with CPU indices would copy the
        # indices to the GPU and wait for that copy at every update.
        self.batcher = EpochBatcher(len(self.train_images), tc.batch_size, tc.seed, device=self.device)
        self.model = Autoencoder.from_config(cfg).to(self.device)
        if tc.reconstruction == "nmse":  # the loss's reconstruction term divided by Var(training pixels)
            self.model.reconstruction_weight = 1.0 / self.variance
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # On CUDA, Adam keeps its step counts on the GPU (capturable), so that the guard can
        # undo a step there; on the CPU they stay where Adam puts them (its default).
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, capturable=self.device.type == "cuda")
        self.networks: torch.nn.Module = self.model  # DDP wraps it once the state is restored
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and tc.amp else nullcontext())
        self.step, self.train_seconds = 0, 0.0
        self.thread_history = [[0, torch.get_num_threads()]]  # [update from which, CPU threads] pairs
        self.meter = IntervalMeter(self.device)
        self.guard = NonfiniteGuard(self.model, self.optimizer, ranks, stop=tc.on_nonfinite == "stop")
        self.last: AutoencoderOutput | None = None
        self._since = time.perf_counter()

    def wrap(self) -> None:
        """DDP and torch.compile, after any restore (DDP broadcasts rank 0's weights)."""
        if self.ranks.world > 1:
            # No buffer broadcast: the bottlenecks keep their buffers equal on every rank
            # themselves (moving averages summed, draws from the global batch).
            self.networks = torch.nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
            for p in self.model.parameters():
                p.register_hook(_in_parameter_layout(p))
        if self.cfg.train.compile:
            self.model.encoder.compile()
            self.model.decoder.compile()

    def update(self) -> AutoencoderOutput:
        """One update: draw a batch, forward, backward, Adam step (undone on the device
        when the loss is not finite). Reads nothing back from the device."""
        tc = self.cfg.train
        indices = self.batcher.next()[self.ranks.rank :: self.ranks.world]
        x = to_input(self.train_images[indices])
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        buffers = self.guard.buffers()
        with self.autocast:
            out = self.networks(x)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        ok = self.guard.ok(out.loss)
        self.guard.step(ok, buffers)
        self.meter.add(out, ok)
        self.step += 1
        self.guard.remember(self.step, ok, {"loss": out.loss, "recon_mse": out.recon_mse,
                                            "bottleneck_loss": out.bottleneck.loss}, indices)
        self.last = out
        return out

    def settle(self) -> None:
        """Read what the updates since the last call left on the device (one host sync,
        at log, evaluation, checkpoint and stop updates only); in stop mode, a non-finite
        update ends the run here (:meth:`report_nonfinite`), before anything is written."""
        bad = self.guard.first_bad()
        self.train_seconds += time.perf_counter() - self._since
        if bad is not None and self.cfg.train.on_nonfinite != "skip":
            self.report_nonfinite(**bad)

    def resume_clock(self) -> None:
        """Start timing updates again (evaluation and checkpoints are not training time)."""
        self._since = time.perf_counter()

    def record(self) -> dict:
        """The "train" log record of the interval ending now (after :meth:`settle`)."""
        return self.meter.record(self.step, self.variance, self.ranks, self.last, self.train_seconds,
                                 self.model.bottleneck.logged_metrics)

    def save(self, final: bool) -> None:
        save(self, final)

    def evaluate(self) -> dict:
        """The eval record: the model's read on the fixed held-out subset of the test set,
        on rank 0 only (the others, which write nothing, get the bare record)."""
        if not self.ranks.is_main:
            return {"kind": "eval", "step": self.step}
        result = evaluate_read(self.model, self.eval_images, self.variance, device=self.device)
        self.model.train()
        return {"kind": "eval", "step": self.step, **{f"eval_{k}": v for k, v in result.items()}}

    def state_dict(self) -> dict:
        """The checkpoint: plain tensors and numbers (the interval's sums over all ranks, so
        that a resumed run logs what the unbroken one would). Every rank must call it."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "batcher": self.batcher.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "interval": self.meter.totals(self.ranks),
            "config": C.to_dict(self.cfg),
            "threads": self.thread_history[-1][1],
            "thread_history": self.thread_history,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Continue from checkpoint ``state`` (read from ``path``), refusing another model's."""
        problem = config_mismatch(state["config"], self.cfg)
        if problem:
            raise MemvaeError(f"checkpoint {path} is from a different model configuration ({problem})")
        state = upgrade_checkpoint(state, self.model, f"checkpoint {path}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's rate, not the saved one: a resumed
            group["lr"] = self.cfg.train.lr  # run may change train.lr, and config.toml says it did
        self.batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.step, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        # The checkpoint holds the interval's sums over all ranks: rank 0 takes them.
        self.meter = IntervalMeter(self.device, state["interval"] if self.ranks.is_main else None)

    def report_nonfinite(self, step: int, loss: float, recon_mse: float, bottleneck_loss: float,
                         batch_indices: torch.Tensor) -> None:
        """Save what is needed to look into a NaN/Inf loss, then stop with a clear message."""
        where = ""
        if self.ranks.is_main:
            path = self.run_dir / f"nonfinite_step_{step:08d}.pt"
            report = {
                "step": step,
                "loss": loss,
                "recon_mse": recon_mse,
                "bottleneck_loss": bottleneck_loss,
                "batch_indices": batch_indices.cpu(),
                "model": self.model.state_dict(),  # as before update ``step``: the guard kept it so
            }
            try:
                torch.save(report, path)
                where = f"; the model before this update and the batch are in {path}"
            except (OSError, RuntimeError):  # a full disk must not hide the message below
                path.unlink(missing_ok=True)
        what = f"loss is {loss}" if not math.isfinite(loss) else f"a gradient is not finite (loss {loss:.4g})"
        raise MemvaeError(
            f"{what} at update {step}; stopped (the last good checkpoint is kept{where}); "
            "lower train.lr, or set train.on_nonfinite=skip to skip such updates"
        )


# ------------------------------------------------------------------ checkpoints


def save(trainer: Trainer, final: bool = False) -> None:
    """Checkpoint the trainer's state (every rank calls this at the same update; rank 0 writes).

    Mid-run, a disk that refuses is a warning, not the end of the run: the previous
    checkpoint stays, and the next save may work. A ``final`` save (the last update, or a
    stop: SIGINT/SIGTERM, ``stop_after``) writes the model the run leaves; when it fails,
    MemvaeError on every rank, naming the newest checkpoint on disk, so that a run which
    lost its model never ends as if it were done.
    """
    state = trainer.state_dict()
    failure = None
    if trainer.ranks.is_main:
        try:
            save_checkpoint(trainer.run_dir / "checkpoints", state, trainer.step)
        except OSError as exc:
            failure = exc
    # Every rank saves at the same update, so the collective here cannot leave one waiting.
    if final and trainer.ranks.any(failure is not None):
        raise MemvaeError(_final_save_failed(trainer, failure))
    if failure is not None:
        tqdm.write(f"warning: could not save checkpoint at update {trainer.step} ({failure}); the previous one is kept")


def _final_save_failed(trainer: Trainer, failure: OSError | None) -> str:
    """The one line for a run whose last checkpoint could not be written (``failure``:
    rank 0's error; None on the other ranks)."""
    try:
        found = latest_checkpoint(trainer.run_dir / "checkpoints")
    except MemvaeError:  # a damaged pointer: nothing on disk can be trusted to resume from
        found = None
    resume = f"memvae train --run-dir {trainer.run_dir} --resume"
    kept = (f"the newest checkpoint on disk is update {found[1]['step']} ({found[0]}); {resume} continues from it"
            if found else f"no checkpoint of this run is on disk; {resume} starts it again from update 0")
    reason = failure if failure is not None else "rank 0 could not write it"
    return f"could not save the checkpoint of update {trainer.step}, the last of this run ({reason}); {kept}"


# ------------------------------------------------------------------ signals and stop_after
