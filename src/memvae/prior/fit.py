"""A prior over the slot maps of a trained run, for generation (VQ-VAE paper, section 4).

A trained autoencoder turns every image into an h×w map of slot indices (its codes:
nearest slot for VQ, argmax weight for the memory read). A gated PixelCNN
(:mod:`memvae.networks.pixelcnn`) fitted to the training images' maps gives p(c); sampling c in
raster order and decoding it with the run's decoder gives new images.

Layout inside a run directory::

    prior/metrics.jsonl    "train" records (bits per index) and "eval" records (on
                           the first ``eval_maps`` test maps)
    prior/checkpoints/     memvae.training.checkpoint files: {"model", "optimizer", "step",
                           "options", "num_slots", "map_shape", "model_step"} (and
                           "symbol_ranges" for codes of several kinds of symbol)
    prior/eval.json        test NLL of the final prior on the test maps

The prior is tied to the run's checkpoint it was fitted on (``model_step``): if the run
trains further, its codes change meaning and the prior must be refitted.

The codes themselves (extraction, vocabulary, bits) are :mod:`memvae.prior.codes`; drawing
and decoding samples is :mod:`memvae.prior.sample`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path

import torch

from memvae.data import ImageData, load_data
from memvae.errors import MemvaeError
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.codes import bits, extract_codes, nll_bits, symbol_ranges, unigram_bits, vocabulary
from memvae.prior.options import PriorOptions
from memvae.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memvae.training.distributed import Distributed, default_threads, repeatable, resolve_device
from memvae.training.guard import NonfiniteGuard
from memvae.training.loop import run_updates
from memvae.training.metrics import MetricsLog
from memvae.training.runlock import run_lock
from memvae.training.runs import load_run

PRIOR_DIR = "prior"


def prior_dir(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Where a run's prior lives: ``out`` if given (a second prior beside the first), else RUN_DIR/prior."""
    return Path(out) if out is not None else Path(run_dir) / PRIOR_DIR


def train_prior(
    run_dir: str | os.PathLike,
    options: PriorOptions | None = None,
    data_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress=None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    data: ImageData | None = None,
) -> dict:
    """Fit a gated PixelCNN to the slot maps of a trained run, then evaluate it.

    Writes ``RUN_DIR/prior/`` (metrics.jsonl, checkpoints/, eval.json; see the module
    docstring) and returns the evaluation (the contents of eval.json). The updates run on
    the autoencoder's loop (:func:`memvae.training.loop.run_updates`): no host read between log
    records, a non-finite loss undone on the device (``options.on_nonfinite``), SIGINT or
    SIGTERM saving a checkpoint, and ``resume`` continuing it exactly.

    Args:
        run_dir: a run directory with a checkpoint (see :func:`memvae.training.runs.load_run`).
        options: see :class:`PriorOptions` (None: the defaults).
        data_dir: overrides the run's data directory.
        overwrite: replace an existing prior; without it (or ``resume``) an existing one is refused.
        progress: optional callable taking each log record (e.g. to print it).
        out: the prior's directory instead of RUN_DIR/prior (e.g. a second prior of other
            options beside the first); sample from it with ``memvae sample --prior OUT``.
        resume: continue the prior in the folder from its newest checkpoint (same options
            but for those in :data:`RESUMABLE`; ``steps`` may grow).
        stop_after: stop with a checkpoint after this many updates in total, as on
            SIGTERM (for tests); returns ``{"stopped_at": update}`` then.
        data: the run's images already in memory (skips loading them, as ``train``'s ``data``).
    """
    options = dataclasses.replace(options or PriorOptions()).validate()
    # RUN_DIR/prior has one writer, and the run does not train on meanwhile (memvae.training.runlock).
    with run_lock(run_dir, create=False):
        return _train_prior(run_dir, options, data_dir, overwrite, progress, prior_dir(run_dir, out), resume, stop_after,
                            data)


# Options a resumed prior may change: they change when it logs, stops or where it runs, not what it fits.
RESUMABLE = ("steps", "log_every", "eval_every", "eval_maps", "extract_batch", "device", "threads", "on_nonfinite")


def _train_prior(run_dir: str | os.PathLike, options: PriorOptions, data_dir: str | os.PathLike | None,
                 overwrite: bool, progress, out_dir: Path, resume: bool, stop_after: int | None,
                 data: ImageData | None) -> dict:
    """:func:`train_prior`, with the run directory locked."""
    exists = out_dir.exists() and any(out_dir.iterdir())
    if exists and not (overwrite or resume):
        raise MemvaeError(f"{out_dir} already exists; pass --overwrite to fit the prior again, or --resume to continue it")
    torch.set_num_threads(options.threads or default_threads())
    device = resolve_device(options.device)
    model, cfg, state = load_run(run_dir, device)
    if not model.bottleneck.discrete:  # before the data loads: nothing to wait for
        raise MemvaeError(f"{run_dir}'s model reads continuously at test (its {model.bottleneck.reads[0]} read): "
                          "a prior needs one code per position")
    saved = _prior_to_resume(out_dir, options, int(state["step"]), device) if resume else None
    if data is None:
        data = load_data(cfg.data.source, data_dir or cfg.data.dir or None, cfg.data.image_size)
    train_images = data.train[: options.train_images or None]
    test_images = data.test[: options.test_images or None]
    say = progress or (lambda record: None)
    # Encoding the training set takes minutes on a CPU: say so before it starts.
    say({"kind": "stage", "text": f"encoding {len(train_images)} training and {len(test_images)} test images to slot maps"})
    train_codes = extract_codes(model, train_images, options.extract_batch, device)
    test_codes = extract_codes(model, test_images, options.extract_batch, device)
    num_slots, map_shape = vocabulary(model.bottleneck), list(train_codes.shape[1:])
    ranges = symbol_ranges(model.bottleneck)
    meta = {"num_slots": num_slots, "map_shape": map_shape, "model_step": int(state["step"])}
    if ranges is not None:
        meta["symbol_ranges"] = [list(r) for r in ranges]
    first = 0 if saved is None else int(saved["step"])
    say({"kind": "stage", "text": f"fitting the PixelCNN prior: updates {first + 1} to {options.steps} of {options.batch_size} maps"})

    if exists and not resume:  # only now: a failure while loading leaves the old prior in place
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    ranks = Distributed.single(device)
    t = PriorTrainer(GatedPixelCNN(num_slots, options.width, options.layers, options.kernel, ranges).to(device), options,
                     train_codes, test_codes[: options.eval_maps or None], out_dir, ranks, meta)
    if saved is not None:
        t.load_state_dict(saved)
    log = PriorLog(out_dir / "metrics.jsonl", t.step, progress)
    every = (options.log_every, options.eval_every, options.eval_every)  # a checkpoint at each evaluation
    # A command that continues this fit as it was asked for: its target, network and data (issue 35).
    resume_command = shlex.join(["memvae", "prior", str(run_dir), *options.command_flags(),
                                 *([] if out_dir == prior_dir(run_dir) else ["--out", str(out_dir)]),
                                 *([] if data_dir is None else ["--data-dir", str(data_dir)]), "--resume"])
    with repeatable(device):
        run_updates(t, log, ranks, options.steps, every, stop_after, resume_command)
    if t.step < options.steps:
        return {"stopped_at": t.step}

    say({"kind": "stage", "text": f"evaluating the prior on all {len(test_codes)} test maps"})
    per_index = nll_bits(t.prior, test_codes, device=device)
    positions = map_shape[0] * map_shape[1]
    result = {
        "run_dir": str(run_dir),
        "model_step": int(state["step"]),
        "prior_step": options.steps,
        "train_maps": len(train_codes),
        "test_maps": len(test_codes),
        "num_slots": num_slots,
        "map_shape": map_shape,
        "bits_per_index": per_index,
        "bits_per_image": positions * per_index,
        # A uniform law over each symbol's own values (one vocabulary of K: log2 K).
        "uniform_bits_per_index": (math.log2(num_slots) if ranges is None
                                   else sum(math.log2(size) for _, size in ranges) / len(ranges)),
        "unigram_bits_per_index": unigram_bits(train_codes, test_codes, num_slots, ranges),
        **({"symbol_ranges": meta["symbol_ranges"]} if ranges is not None else {}),
        "skipped_updates": t.skipped,
        "options": dataclasses.asdict(options),
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result


def _prior_to_resume(out_dir: Path, options: PriorOptions, model_step: int, device: torch.device) -> dict | None:
    """The newest checkpoint of the prior in ``out_dir`` to continue, checked against
    ``options`` and the run's update ``model_step``; None (a fresh start) when there is none."""
    found = latest_checkpoint(out_dir / "checkpoints")
    if found is None:
        print(f"no prior checkpoint in {out_dir}: starting from update 0")
        return None
    saved = load_checkpoint(*found, map_location=device)
    if "order" not in saved:
        raise MemvaeError(f"the prior checkpoint {found[0]} predates resumable priors; fit it again with --overwrite")
    if int(saved["model_step"]) != model_step:
        raise MemvaeError(f"the prior in {out_dir} was fitted to the model at update {saved['model_step']}, but the run "
                          f"is now at update {model_step}; fit it again with --overwrite")
    current = dataclasses.asdict(options)
    changed = [f"{k} {saved['options'].get(k)!r} -> {current[k]!r}" for k in current
               if k not in RESUMABLE and saved["options"].get(k) != current[k]]
    if changed:
        raise MemvaeError(f"the prior in {out_dir} was fitted with other options ({', '.join(changed)}); resume it with "
                          "its own, or fit it again with --overwrite")
    return saved


class PriorTrainer:
    """The prior's side of :func:`memvae.training.loop.run_updates`: the PixelCNN, Adam, the batch
    order, the interval's NLL sums, and the non-finite guard, the autoencoder's own
    (:class:`memvae.training.guard.NonfiniteGuard`). No update reads from the device.

    ``codes``: int64 N×h×w training maps (moved to the prior's device once); ``eval_codes``:
    the test maps of the "eval" records; ``meta``: num_slots, map_shape, model_step (and
    symbol_ranges, see :func:`memvae.prior.codes.symbol_ranges`), kept in
    every checkpoint.
    """

    def __init__(self, prior: GatedPixelCNN, options: PriorOptions, codes: torch.Tensor, eval_codes: torch.Tensor,
                 out_dir: Path, ranks: Distributed, meta: dict):
        self.prior, self.options, self.out_dir, self.ranks, self.meta = prior, options, out_dir, ranks, meta
        self.device = ranks.device
        self.codes, self.eval_codes = codes.to(self.device), eval_codes
        self.optimizer = torch.optim.Adam(prior.parameters(), lr=options.lr, capturable=self.device.type == "cuda")
        # The batch order has its own generator, so it depends on the seed alone.
        self.order = torch.Generator().manual_seed(options.seed)
        self.guard = NonfiniteGuard(prior, self.optimizer, ranks, stop=options.on_nonfinite == "stop")
        # float64 [NLL, applied updates, skipped updates] since the last record, as Python floats would sum them.
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._counts = torch.tensor([1.0, 0.0], dtype=torch.float64, device=self.device)
        self._skipped = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=self.device)
        self.step, self.train_seconds, self.skipped = 0, 0.0, 0
        self._since = time.perf_counter()

    def update(self) -> None:
        """One Adam step on a batch of maps drawn with replacement (undone when its loss is not finite)."""
        self.prior.train()
        # Drawn on the CPU generator (the same order on every device), copied without waiting.
        indices = torch.randint(len(self.codes), (self.options.batch_size,), generator=self.order)
        indices = indices.to(self.device, non_blocking=True)
        buffers = self.guard.buffers()
        loss = self.prior.nll(self.codes[indices])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ok = self.guard.ok(loss)  # after the backward pass: the loss and the gradients
        self.guard.step(ok, buffers)
        self.sums += torch.where(ok, torch.cat([loss.detach().double().reshape(1), self._counts]), self._skipped)
        self.step += 1
        self.guard.remember(self.step, ok, {"loss": loss}, indices)

    def settle(self) -> None:
        """Read the updates' flags (the one host sync, at log, checkpoint and stop updates);
        in stop mode a non-finite loss ends the fit here, the last checkpoint kept."""
        bad = self.guard.first_bad()
        self.train_seconds += time.perf_counter() - self._since
        if bad is not None and self.options.on_nonfinite == "stop":
            raise MemvaeError(f"the prior's loss is {bad['loss']} at update {bad['step']}; stopped (its last checkpoint in "
                              f"{self.out_dir / 'checkpoints'} is kept); lower --lr, or pass --on-nonfinite skip")

    def resume_clock(self) -> None:
        self._since = time.perf_counter()

    def record(self) -> dict:
        nll, updates, skipped = self.sums.tolist()
        self.sums.zero_()
        self.skipped += int(skipped)
        return {"kind": "train", "step": self.step, "train_bits_per_index": bits(nll / updates) if updates else float("nan"),
                "skipped": int(skipped), "train_seconds": self.train_seconds}

    def evaluate(self) -> dict:
        record = {"kind": "eval", "step": self.step, "eval_bits_per_index": nll_bits(self.prior, self.eval_codes, device=self.device)}
        self.prior.train()
        return record

    def state_dict(self) -> dict:
        return {"model": self.prior.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "options": dataclasses.asdict(self.options), **self.meta, "order": self.order.get_state(),
                "interval": self.sums.tolist(), "train_seconds": self.train_seconds, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.prior.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order.set_state(state["order"].cpu())
        self.sums = torch.tensor(state["interval"], dtype=torch.float64, device=self.device)
        self.step, self.train_seconds, self.skipped = int(state["step"]), float(state["train_seconds"]), int(state["skipped"])

    def save(self, final: bool) -> None:
        """A checkpoint of this update; a disk that refuses ends the fit with one line (a
        prior is minutes of work: unlike a long run's, its checkpoints are not optional)."""
        try:
            save_checkpoint(self.out_dir / "checkpoints", self.state_dict(), self.step)
        except OSError as exc:
            raise MemvaeError(f"could not save the prior's checkpoint of update {self.step} in {self.out_dir} ({exc})") from None


class PriorLog:
    """The prior's metrics.jsonl (records after ``step`` dropped when resuming) and the
    ``progress`` callable, in the shape :func:`memvae.training.loop.run_updates` writes to."""

    def __init__(self, path: Path, step: int, progress=None):
        self.metrics, self.progress = MetricsLog(path), progress or (lambda record: None)
        self.metrics.truncate_after(step)

    def advance(self) -> None:
        pass

    def train(self, record: dict) -> dict:
        self.metrics.append(record)
        self.progress(record)
        return record

    eval = train

    def close(self) -> None:
        pass
