"""The training loop: generic over models, exact to resume, safe to interrupt.

Runs on one process, or on several under ``torchrun`` (DistributedDataParallel): every
rank walks the same permutation and takes its share ``batch[rank::world]`` of each
global batch; only rank 0 writes the run directory.
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

from memvae import config as C
from memvae.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memvae.data import EpochBatcher, ImageData, load_data, to_input
from memvae.errors import MemvaeError
from memvae.evaluate import evaluate_read
from memvae.metrics import MetricsLog, nmse
from memvae.model import Autoencoder
from memvae.runs import config_mismatch, environment, prepare_run_dir


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemvaeError(f"device {name!r} asked for, but no CUDA device is available")
    return device


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
    on = device.type == "cpu" or deterministic
    try:
        if on:
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


class _StopRequest:
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


class _Interval:
    """Sums of the training measures since the last log record."""

    KEYS = ("recon_mse", "perplexity", "updates", "skipped")

    def __init__(self, state: dict | None = None):
        self.sums = {k: 0.0 for k in self.KEYS} if state is None else {k: float(state[k]) for k in self.KEYS}

    def state_dict(self) -> dict:
        return dict(self.sums)


def _distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world size), initialising the process group when launched by torchrun.

    The backend follows the device training runs on (``train.device``): NCCL for CUDA,
    gloo for CPU, also on a machine that has a GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_reduce_sum(values: list[float], device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any, so that all ranks take the same
    branch (a rank that stops or skips alone leaves the others waiting in a collective)."""
    if not dist.is_initialized():
        return flag
    return _all_reduce_sum([float(flag)], device)[0] > 0


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
    """
    run_dir = Path(run_dir)
    rank, world = _distributed(cfg.train.device)
    is_main = rank == 0
    tc = cfg.train
    if tc.batch_size % world:
        raise MemvaeError(f"batch size {tc.batch_size} does not split evenly over {world} processes")
    if is_main:
        prepare_run_dir(run_dir, resume, overwrite)
    if dist.is_initialized():
        dist.barrier()
    found = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and found is None and is_main:
        print(f"no checkpoint in {run_dir}: starting from update 0")
    device = resolve_device(tc.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    state = load_checkpoint(*found, map_location=device) if found is not None else None
    saved_threads = None if state is None or "threads" not in state else int(state["threads"])
    threads, note = choose_threads(tc.threads, saved_threads, 0 if state is None else int(state["step"]), state is not None)
    torch.set_num_threads(threads)
    if note and is_main and device.type == "cpu":
        print(note)
    thread_history = [list(map(int, pair)) for pair in state.get("thread_history", [])] if state is not None else []
    if not thread_history or thread_history[-1][1] != threads:
        thread_history.append([0 if state is None else int(state["step"]), threads])
    torch.manual_seed(tc.seed)

    if data is None:
        data = load_data(cfg.data.source, data_dir or cfg.data.dir or None, cfg.data.image_size)
    variance = data.train_variance()
    train_images = data.train.to(device)  # the whole set stays resident (uint8)
    eval_images = data.test[: cfg.data.eval_images]
    batcher = EpochBatcher(len(train_images), tc.batch_size, tc.seed)

    model = Autoencoder.from_config(cfg).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
    step, train_seconds, interval = 0, 0.0, _Interval()
    log = MetricsLog(run_dir / "metrics.jsonl")

    if state is not None:
        problem = config_mismatch(state["config"], cfg)
        if problem:
            raise MemvaeError(f"checkpoint {found[0]} is from a different model configuration ({problem})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the config's rate, not the saved one: a resumed
            group["lr"] = tc.lr  # run may change train.lr, and config.toml says it did
        batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        step, train_seconds = int(state["step"]), float(state["train_seconds"])
        # The checkpoint holds the interval's sums over all ranks (see save): rank 0 takes them.
        interval = _Interval(state["interval"]) if is_main else _Interval()
    if resume and is_main:
        # Records after the checkpoint (all of them, when a run died before its first
        # checkpoint) come again from this run: drop them so that none appears twice.
        log.truncate_after(step)
    if is_main:
        (run_dir / "config.toml").write_text(C.to_toml(cfg))
        meta = {"config_name": cfg.name, "device": str(device), "world_size": world, **environment(),
                "thread_history": thread_history}
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=1))

    def checkpoint_state() -> dict:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "train_seconds": train_seconds,
            "batcher": batcher.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "interval": interval.state_dict(),
            "config": C.to_dict(cfg),
            "threads": threads,
            "thread_history": thread_history,
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        return state

    def save() -> None:
        # Every rank calls save at the same update; the log interval's sums are summed over
        # ranks so that a resumed run logs what the unbroken one would.
        summed = _all_reduce_sum([interval.sums[k] for k in _Interval.KEYS], device)
        if not is_main:
            return
        try:
            state = checkpoint_state()
            state["interval"] = dict(zip(_Interval.KEYS, summed))
            save_checkpoint(run_dir / "checkpoints", state, step)
        except OSError as exc:
            tqdm.write(f"warning: could not save checkpoint at update {step} ({exc}); the previous one is kept")

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    networks = ddp
    if tc.compile:
        model.encoder.compile()
        model.decoder.compile()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and tc.amp) else nullcontext()
    )
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if resume else None)

    bar = tqdm(total=tc.steps, initial=step, disable=not (show_progress and is_main), desc=cfg.name, dynamic_ncols=True)
    last_record: dict = {}
    with _StopRequest() as stop, repeatable(device, tc.deterministic):
        while step < tc.steps:
            model.bottleneck.set_progress(step / tc.steps)
            indices = batcher.next()[rank::world]
            x = to_input(train_images[indices])
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            started = time.perf_counter()
            # The forward pass may write buffers (moving-average slots, data initialisation):
            # keep a copy, so that a skipped or reported update leaves no trace of a bad batch.
            buffers = [b.clone() for b in model.buffers()]
            with autocast:
                out = networks(x)
            loss_value = float(out.loss.detach())
            if _any_rank(not math.isfinite(loss_value), device):
                with torch.no_grad():
                    for b, saved in zip(model.buffers(), buffers):
                        b.copy_(saved)
                if tc.on_nonfinite != "skip":
                    _report_nonfinite(run_dir if is_main else None, step + 1, loss_value, model, indices, out)
                # Skipped: no step, but logging, evaluation, checkpoints and signals below
                # still happen at their updates.
                optimizer.zero_grad(set_to_none=True)
                interval.sums["skipped"] += 1
            else:
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                interval.sums["recon_mse"] += float(out.recon_mse.detach())
                interval.sums["perplexity"] += float(out.bottleneck.metrics["perplexity"])
                interval.sums["updates"] += 1
            del buffers
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - started
            step += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == tc.steps:
                mse_sum, ppl_sum, updates, skipped = _all_reduce_sum(
                    [interval.sums[k] for k in _Interval.KEYS], device
                )
                # An interval whose updates were all skipped has no training error: NaN, not 0.
                updates_all = updates if updates else float("nan")
                record = {
                    "kind": "train",
                    "step": step,
                    "train_nmse": nmse(mse_sum / updates_all, variance),
                    "train_perplexity": ppl_sum / updates_all,
                    "skipped": int(skipped / world),
                    "train_seconds": train_seconds,
                }
                for key in ("beta", "entropy_bits", "max_weight"):
                    if key in out.bottleneck.metrics:
                        record[key] = float(out.bottleneck.metrics[key])
                interval = _Interval()
                if is_main:
                    log.append(record)
                    for key, value in record.items():
                        if key not in ("kind", "step"):
                            writer.add_scalar(f"train/{key}", value, step)
                bar.set_postfix(nmse=f"{record['train_nmse']:.4f}", ppl=f"{record['train_perplexity']:.1f}")
                last_record = record
            if step % tc.eval_every == 0 or step == tc.steps:
                result = evaluate_read(model, eval_images, variance, device=device)
                model.train()
                record = {"kind": "eval", "step": step, **{f"eval_{k}": v for k, v in result.items()}}
                if is_main:
                    log.append(record)
                    for key in ("eval_nmse", "eval_perplexity", "eval_slots_used"):
                        writer.add_scalar(key.replace("eval_", "eval/"), record[key], step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save()
            signalled = _any_rank(stop.signal is not None, device)  # every rank stops at the same update
            if signalled or (stop_after is not None and step >= stop_after and step < tc.steps):
                save()
                bar.close()
                if writer:
                    writer.close()
                if signalled:
                    name = signal.Signals(stop.signal).name if stop.signal is not None else "a signal to another process"
                    raise KeyboardInterrupt(
                        f"{name}: stopped at update {step}, checkpoint saved; resume with "
                        f"memvae train --run-dir {run_dir} --resume"
                    )
                return last_record
    bar.close()
    if writer:
        writer.close()
    return last_record


def _report_nonfinite(run_dir: Path | None, step: int, value: float, model, indices, out) -> None:
    """Save what is needed to look into a NaN/Inf loss, then stop with a clear message."""
    where = ""
    if run_dir is not None:
        path = run_dir / f"nonfinite_step_{step:08d}.pt"
        report = {
            "step": step,
            "loss": value,
            "recon_mse": float(out.recon_mse.detach()),
            "bottleneck_loss": float(out.bottleneck.loss.detach()),
            "batch_indices": indices.cpu(),
            "model": model.state_dict(),
        }
        try:
            torch.save(report, path)
            where = f"; the model before this update and the batch are in {path}"
        except (OSError, RuntimeError):  # a full disk must not hide the message below
            path.unlink(missing_ok=True)
    raise MemvaeError(
        f"loss is {value} at update {step}; stopped (the last good checkpoint is kept{where}); "
        "lower train.lr, or set train.on_nonfinite=skip to skip such updates"
    )
