"""The parts of training that sit around the loop in :mod:`memvae.training.train`, one concern each.

    Distributed      rank, world size and the few collectives the loop needs (torchrun)
    repeatable       the settings under which a run gives the same numbers every time
    choose_threads   the CPU thread count, kept from the checkpoint on resume
    NonfiniteGuard   a non-finite loss undone on the device, read only at log points
    Trainer          model, Adam, batch order and update count; one update; evaluation;
                     checkpoint state; the mark a non-finite update is undone back to
    IntervalMeter    the training measures summed on the device between log records
    StopRequest      SIGINT/SIGTERM turned into a flag the loop reads
    RunLog           what rank 0 writes as it goes: metrics.jsonl, TensorBoard, the bar
    run_updates      the loop itself: update, and at due updates log, evaluate, save, stop;
                     the autoencoder's (:mod:`memvae.training.train`) and the prior's (:mod:`memvae.prior.fit`)

No update reads a value back from the device. The non-finite check, the interval's sums
and the update's own measures stay on the device; the loop reads them only when it logs,
evaluates, saves a checkpoint or stops (see :meth:`Trainer.settle`).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from memvae.config import schema as C
from memvae.training.checkpoint import latest_checkpoint, save_checkpoint
from memvae.data import EpochBatcher, ImageData, to_input
from memvae.errors import MemvaeError
from memvae.training.evaluate import evaluate_read
from memvae.training.metrics import MetricsLog, nmse, progress_line
from memvae.networks.autoencoder import Autoencoder, AutoencoderOutput
from memvae.training.runs import config_mismatch, environment, with_update_count, without_untrained_parameters


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemvaeError(f"device {name!r} asked for, but no CUDA device is available")
    return device


# ------------------------------------------------------------------ distributed setup
class Distributed:
    """One process, or one of several launched by ``torchrun`` (DistributedDataParallel).

    Every rank walks the same permutation and takes its share ``batch[rank::world]`` of
    each global batch; only rank 0 writes the run directory. ``device`` is this rank's.
    """

    @classmethod
    def single(cls, device: torch.device) -> "Distributed":
        """This process alone on ``device``, whatever torchrun set (e.g. the prior's fit)."""
        self = cls.__new__(cls)
        self.rank, self.world, self.device = 0, 1, device
        return self

    def __init__(self, device_name: str = "auto"):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(device_name)
        if world > 1 and not dist.is_initialized():
            # The backend follows the device training runs on: NCCL for CUDA, gloo for
            # CPU, also on a machine that has a GPU.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(device)
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s minimum over ranks, in place, without reading it."""
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, in place, without reading it (a no-op on one process)."""
        if dist.is_initialized():
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any, so that all ranks take the same
        branch (a rank that stops or skips alone leaves the others waiting in a collective)."""
        if not dist.is_initialized():
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=self.device)).item() > 0)


# ------------------------------------------------------------------ repeatable numbers
@contextmanager
def repeatable(device: torch.device, deterministic: bool = False):
    """While training: the settings under which a run gives the same numbers every time
    at a fixed thread count; PyTorch's previous settings come back on exit.

    CPU, always: ``torch.use_deterministic_algorithms(True)``. With more than one thread,
    the backward of ``memory[idx]`` (VQ's codebook gradient: ``index_put_`` with
    ``accumulate=True``) adds rows from several threads with atomic float additions, in
    an order that changes from run to run; in deterministic mode PyTorch adds them one
    after another in index order, the order one thread uses, so 1-thread numbers do not
    change. Every other operation here was found repeatable at a fixed thread count (the
    thread count itself changes how convolutions and reductions split their sums, so
    1 and 2 threads give different, each repeatable, numbers). Uninitialised memory is not
    filled (``fill_uninitialized_memory``): nothing here reads it, and filling costs time.

    CUDA, with ``deterministic``: also cuDNN's deterministic algorithms without
    benchmarking, and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which
    must be set before the process first uses cuBLAS). Ops with no deterministic kernel
    warn (``warn_only``) rather than stop the run.
    """
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                det.fill_uninitialized_memory, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if device.type == "cpu" or deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            det.fill_uninitialized_memory = device.type != "cpu"
        if device.type == "cuda" and deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        det.fill_uninitialized_memory = previous[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[3], previous[4]


def choose_threads(requested: int, saved: int | None, step: int, resuming: bool) -> tuple[int, str | None]:
    """The CPU thread count to train with, and a one-line note when it breaks exactness.

    The thread count changes the numbers (how convolutions and sums split their work), so
    a resumed run keeps the count recorded in its checkpoint unless ``train.threads``
    asks for another; then the note says from which update the numbers differ.
    ``requested`` 0 means torch's default (or, resuming, the recorded count).
    """
    if not resuming:
        return requested or torch.get_num_threads(), None
    if saved is None:
        threads = requested or torch.get_num_threads()
        return threads, (f"note: the checkpoint of update {step} does not record its thread count; if it was not "
                         f"{threads}, the numbers differ from update {step} on from an unbroken run")
    threads = requested or saved
    if threads != saved:
        return threads, (f"note: trained with {saved} threads up to update {step}, continuing with {threads}: the "
                         f"numbers differ from update {step} on from an unbroken run (set train.threads={saved} to keep them exact)")
    return threads, None


# ------------------------------------------------------------------ interval logging
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
def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """destinations[i] ← sources[i], in one call where torch has it (fewer dispatches)."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(destinations, sources)
    else:  # pragma: no cover - torch < 2.1
        for d, s in zip(destinations, sources):
            d.copy_(s)


class NonfiniteGuard:
    """Keeps a non-finite loss from reaching the weights without reading it per update,
    the way ``torch.amp.GradScaler`` skips a step: on the device.

    Each update takes its backward pass and Adam step whatever the loss; then, in place,
    ``torch.where(ok, new, old)`` puts back the weights, Adam's state and the buffers the
    forward pass wrote (moving-average slots, data initialisation) wherever ``ok`` (the
    loss and the gradients finite on every rank) is false. A finite update is untouched, to the bit. In stop
    mode (``train.on_nonfinite = "stop"``) ``ok`` stays false after the first bad update,
    so the model stays as it was before it until the loop reads the flags
    (:meth:`first_bad`, at the next log, evaluation, checkpoint or stop) and stops.

    The price is a copy of the weights and Adam's state per update and the ``where``
    over them (measured in docs/benchmarks.md). Adam's state is created by its first step;
    a first update that is undone leaves it all zeros, which is how Adam starts it. On
    CUDA, Adam's step counts live on the GPU (``capturable``), so that ``ok`` never
    has to come to the host.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ranks: Distributed, stop: bool):
        self.model, self.optimizer, self.ranks, self.stop = model, optimizer, ranks, stop
        self.clean = torch.ones((), dtype=torch.bool, device=ranks.device)  # no bad update yet (stop mode)
        self.pending: list[tuple] = []  # (update, ok, {name: measure}, batch indices) since the last read
        self._saved: list[torch.Tensor] = []  # weights and Adam's state before the current step

    def ok(self, loss: torch.Tensor) -> torch.Tensor:
        """Device bool, after the backward pass: apply this update (``loss`` and every gradient
        finite on every rank; in stop mode, and no bad one before). The gradients are checked
        by one reduction of their norms on the device: a finite loss can still give an
        infinite gradient (an overflow in the backward pass)."""
        ok = torch.isfinite(loss.detach())
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if self.ranks.world > 1:
            ok = self.ranks.min_(ok.to(torch.int32)).bool()
        if self.stop:
            ok = ok & self.clean
            self.clean = ok
        return ok

    def buffers(self) -> list[torch.Tensor]:
        """Copies of the buffers, before the forward pass writes them."""
        return [b.clone() for b in self.model.buffers()]

    @torch.no_grad()
    def step(self, ok: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        """The optimizer step, undone in place (with the forward pass's buffer writes) unless ``ok``."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        live = params + [v for p in params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        if [(t.shape, t.dtype, t.device) for t in self._saved] != [(t.shape, t.dtype, t.device) for t in live]:
            self._saved = [torch.empty_like(t) for t in live]  # kept from update to update: no allocation per update
        _copy_all(self._saved, live)
        fresh = [p for p in params if not self.optimizer.state.get(p)]
        self.optimizer.step()  # in place: ``live`` now holds the new values
        for new, old in zip(live, self._saved):
            torch.where(ok, new, old, out=new)
        for p in fresh:  # Adam's state created by this step goes back to zeros, as Adam starts it
            for value in self.optimizer.state[p].values():
                if torch.is_tensor(value):
                    torch.where(ok, value, torch.zeros_like(value), out=value)
        for b, old in zip(self.model.buffers(), buffers):
            torch.where(ok, b, old, out=b)

    def remember(self, update: int, ok: torch.Tensor, measures: dict[str, torch.Tensor], indices: torch.Tensor) -> None:
        """Keep update ``update``'s flag, its ``measures`` (device scalars: the loss and its
        parts) and batch indices until the next :meth:`first_bad`, unread."""
        self.pending.append((update, ok, {k: v.detach() for k, v in measures.items()}, indices))

    def first_bad(self) -> dict | None:
        """Read the flags of the updates since the last read (one host sync) -> the first
        update not applied ({"step", each remembered measure as a float, "batch_indices"}),
        or None."""
        pending, self.pending = self.pending, []
        if not pending:
            return None
        oks = torch.stack([p[1] for p in pending]).tolist()
        if all(oks):
            return None
        update, _, measures, indices = pending[oks.index(False)]
        return {"step": update, **{k: float(v) for k, v in measures.items()}, "batch_indices": indices}


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
        self.train_images = data.train.to(self.device)  # the whole set stays resident (uint8)
        self.eval_images = data.test[: cfg.data.eval_images]
        # Batch indices on the images' device: indexing them with CPU indices would copy the
        # indices to the GPU and wait for that copy at every update.
        self.batcher = EpochBatcher(len(self.train_images), tc.batch_size, tc.seed, device=self.device)
        self.model = Autoencoder.from_config(cfg).to(self.device)
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
        weights, optimizer = without_untrained_parameters(state, self.model)
        self.model.load_state_dict(with_update_count(weights, self.model, int(state["step"])))
        self.optimizer.load_state_dict(optimizer)
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
                        desc=cfg.name, dynamic_ncols=True)
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
        self.bar.set_postfix(nmse=f"{record['train_nmse']:.4f}", ppl=f"{record['train_perplexity']:.1f}")
        if self.is_main and self.bar.disable:  # --no-progress: one plain line per log record
            self.clock = self.clock or (record["step"], record["train_seconds"])
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
