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
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memvae.training.checkpoint import latest_checkpoint, load_checkpoint, load_latest, save_checkpoint
from memvae.data import load_data, to_input, to_uint8
from memvae.training.distributed import Distributed, repeatable, resolve_device
from memvae.training.guard import NonfiniteGuard
from memvae.training.loop import run_updates
from memvae.errors import MemvaeError
from memvae.training.metrics import MetricsLog
from memvae.networks.autoencoder import Autoencoder
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.options import PriorOptions
from memvae.training.runlock import run_lock
from memvae.training.runs import load_run

PRIOR_DIR = "prior"


def bits(nats: float) -> float:
    return nats / math.log(2.0)


@torch.no_grad()
def extract_codes(model: Autoencoder, images: torch.Tensor, batch_size: int = 500, device: str | torch.device = "cpu") -> torch.Tensor:
    """The slot map of every image: uint8 N×3×H×W -> int64 N×h×w (on the CPU); for S stages
    of codes per position (residual VQ, N×h×w×S) an N×h×(w·S) map, each position's stages
    side by side, so that the PixelCNN's raster order reads stage s of a position after its
    stages < s and after every earlier position (:func:`stages_from_map` undoes it).

    A code whose symbols take different values (a mixture's k slot indices in [0, K) and its
    grid index in [0, C)) is written in the prior's vocabulary (:func:`symbol_ranges`):
    symbol s of a position shifted to its own range; :func:`codes_from_map` undoes both.

    The model runs in eval mode, so a memory model reads with its evaluation read; its
    codes are the argmax weights either way. The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        maps = [model(to_input(batch.to(device))).bottleneck.codes.cpu() for batch in images.split(batch_size)]
    finally:
        model.train(was_training)
    codes = torch.cat(maps)
    ranges = symbol_ranges(model.bottleneck)
    if ranges is not None:
        codes = codes + torch.tensor([first for first, _ in ranges])
    return codes.flatten(2) if codes.dim() == 4 else codes


def symbol_ranges(bottleneck) -> list[tuple[int, int]] | None:
    """The prior's vocabulary for a bottleneck's codes: None when every symbol of a position
    takes the same K values (one code, or residual VQ's stages: the vocabulary is K), else
    (first, size) per symbol of a position, each symbol its own range of the vocabulary
    Σ sizes, in order (a mixture: k ranges of K slot indices, then one of C grid indices).
    The PixelCNN gives each column only its symbol's range, so its NLL is the cost of the
    codes themselves, with no mass on values a symbol cannot take."""
    sizes = bottleneck.symbol_sizes()
    if len(set(sizes)) == 1:
        return None
    firsts = [sum(sizes[:s]) for s in range(len(sizes))]
    return list(zip(firsts, sizes))


def vocabulary(bottleneck) -> int:
    """The number of values a prior over ``bottleneck``'s codes models (see :func:`symbol_ranges`)."""
    ranges = symbol_ranges(bottleneck)
    return bottleneck.codebook_size if ranges is None else sum(size for _, size in ranges)


def stages_from_map(codes: torch.Tensor, stages: int) -> torch.Tensor:
    """N×h×(w·S) -> N×h×w×S, the inverse of :func:`extract_codes`' layout (S = 1: unchanged)."""
    return codes if stages == 1 else codes.view(codes.shape[0], codes.shape[1], -1, stages)


def codes_from_map(codes: torch.Tensor, bottleneck) -> torch.Tensor:
    """A map in the prior's vocabulary (:func:`extract_codes`) -> the bottleneck's own codes,
    N×h×w or N×h×w×S, ready for its ``decode_codes``."""
    codes = stages_from_map(codes, bottleneck.stages)
    ranges = symbol_ranges(bottleneck)
    if ranges is not None:
        codes = codes - torch.tensor([first for first, _ in ranges], device=codes.device)
    return codes


@torch.no_grad()
def nll_bits(prior: GatedPixelCNN, codes: torch.Tensor, batch_size: int = 500, device: str | torch.device = "cpu") -> float:
    """Mean negative log2-likelihood per index of N×h×w codes under ``prior`` (float64 sum)."""
    prior.eval()
    total, count = 0.0, 0
    for batch in codes.split(batch_size):
        batch = batch.to(device)
        total += float(F.cross_entropy(prior(batch), batch, reduction="sum").double())
        count += batch.numel()
    return bits(total / count)


def unigram_bits(train_codes: torch.Tensor, test_codes: torch.Tensor, num_slots: int,
                 ranges: list[tuple[int, int]] | None = None) -> float:
    """Bits per index of the test codes under the training codes' slot frequencies
    (add-one smoothed): the baseline a prior that models context must beat. With
    ``ranges`` (:func:`symbol_ranges`) each kind of symbol (column j mod S) has its own
    frequencies over its own range."""
    if ranges is None:
        counts = torch.bincount(train_codes.reshape(-1), minlength=num_slots).double() + 1.0
        logp = (counts / counts.sum()).log()
        return bits(float(-logp[test_codes.reshape(-1)].mean()))
    total, count = 0.0, 0
    for kind, (first, size) in enumerate(ranges):
        train_s = train_codes[..., kind::len(ranges)].reshape(-1) - first
        test_s = test_codes[..., kind::len(ranges)].reshape(-1) - first
        counts = torch.bincount(train_s, minlength=size).double() + 1.0
        total += float(-(counts / counts.sum()).log()[test_s].sum())
        count += test_s.numel()
    return bits(total / count)


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
    """
    options = dataclasses.replace(options or PriorOptions()).validate()
    # RUN_DIR/prior has one writer, and the run does not train on meanwhile (memvae.training.runlock).
    with run_lock(run_dir, create=False):
        return _train_prior(run_dir, options, data_dir, overwrite, progress, prior_dir(run_dir, out), resume, stop_after)


# Options a resumed prior may change: they change when it logs, stops or where it runs, not what it fits.
RESUMABLE = ("steps", "log_every", "eval_every", "eval_maps", "extract_batch", "device", "threads", "on_nonfinite")


def _train_prior(run_dir: str | os.PathLike, options: PriorOptions, data_dir: str | os.PathLike | None,
                 overwrite: bool, progress, out_dir: Path, resume: bool, stop_after: int | None) -> dict:
    """:func:`train_prior`, with the run directory locked."""
    exists = out_dir.exists() and any(out_dir.iterdir())
    if exists and not (overwrite or resume):
        raise MemvaeError(f"{out_dir} already exists; pass --overwrite to fit the prior again, or --resume to continue it")
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    model, cfg, state = load_run(run_dir, device)
    saved = _prior_to_resume(out_dir, options, int(state["step"]), device) if resume else None
    data = load_data(cfg.data.source, data_dir or cfg.data.dir or None, cfg.data.image_size)
    train_images = data.train[: options.train_images or None]
    test_images = data.test[: options.test_images or None]
    if not model.bottleneck.discrete:
        raise MemvaeError(f"{run_dir}'s model reads continuously at test (its {model.bottleneck.reads[0]} read): "
                          "a prior needs one code per position")
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
    resume_command = f"memvae prior {run_dir}{'' if out_dir == prior_dir(run_dir) else f' --out {out_dir}'} --resume"
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
    symbol_ranges, see :func:`symbol_ranges`), kept in
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


def load_prior(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
               prior: str | os.PathLike | None = None) -> tuple[GatedPixelCNN, dict]:
    """The trained prior of a run directory (in ``prior``, default RUN_DIR/prior), in eval
    mode, and its checkpoint dict."""
    state = load_latest(prior_dir(run_dir, prior) / "checkpoints", map_location=device)
    if state is None:
        where = f" in {prior}" if prior is not None else ""
        out = f" --out {prior}" if prior is not None else ""
        raise MemvaeError(f"{run_dir} has no trained prior{where}; run `memvae prior {run_dir}{out}` first")
    opts = state["options"]
    ranges = state.get("symbol_ranges")
    prior = GatedPixelCNN(int(state["num_slots"]), int(opts["width"]), int(opts["layers"]), int(opts["kernel"]),
                          None if ranges is None else [tuple(r) for r in ranges]).to(device)
    try:
        prior.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise MemvaeError(f"the prior checkpoint of {run_dir} does not fit its own options: {str(exc).splitlines()[0]}") from None
    return prior.eval(), state


@torch.no_grad()
def sample_codes(
    prior: GatedPixelCNN,
    n: int,
    map_shape: tuple[int, int],
    temperature: float = 1.0,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Draw ``n`` maps from the prior in raster order -> int64 n×h×w.

    Each position is drawn from softmax(logits / temperature) given the positions
    already drawn; temperature < 1 sharpens the distribution, > 1 flattens it. The
    draws use their own generator seeded with ``seed`` (None: a fresh random seed), so
    they are repeatable and leave torch's global random state alone. One forward pass
    per position: h·w passes in all.
    """
    if not temperature > 0:
        raise MemvaeError(f"temperature must be > 0, got {temperature!r}")
    if n <= 0:
        raise MemvaeError(f"number of samples must be > 0, got {n!r}")
    prior.eval()
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    h, w = map_shape
    codes = torch.zeros(n, h, w, dtype=torch.int64, device=device)
    for i in range(h):
        for j in range(w):
            # Positions from (i, j) on are still zeros; causality makes them irrelevant here.
            probs = (prior(codes)[:, :, i, j].double() / temperature).softmax(1)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return codes


def sample_images(
    run_dir: str | os.PathLike,
    n: int,
    temperature: float = 1.0,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    prior_path: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` slot maps from a run's prior (in ``prior_path``, default RUN_DIR/prior)
    and decode them with the run's model.

    Returns (uint8 images n×3×H×W, int64 codes n×h×w). Refuses a prior fitted to an
    earlier checkpoint of the run than the one loaded.
    """
    prior, state = load_prior(run_dir, device, prior_path)
    model, _, model_state = load_run(run_dir, device)
    if int(model_state["step"]) != int(state["model_step"]):
        raise MemvaeError(
            f"the prior of {run_dir} was fitted to the model at update {state['model_step']}, but the run is now at "
            f"update {model_state['step']}; fit it again with `memvae prior {run_dir} --overwrite`"
        )
    codes = sample_codes(prior, n, tuple(state["map_shape"]), temperature, seed, device)
    images = to_uint8(model.decode_codes(codes_from_map(codes, model.bottleneck)))
    return images.cpu(), codes.cpu()
