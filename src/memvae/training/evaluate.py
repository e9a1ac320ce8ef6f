"""Whole-test-set evaluation, the same for every model (DESIGN.md, "Measuring")."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from memvae.data import to_input, to_uint8
from memvae.networks.autoencoder import Autoencoder
from memvae.quantizers.functional import perplexity_from_counts
from memvae.training.metrics import nmse, psnr


@torch.no_grad()
def evaluate_read(
    model: Autoencoder, images: torch.Tensor, train_variance: float, batch_size: int = 500, device: str | torch.device = "cpu"
) -> dict:
    """Reconstruction and slot usage of ``model`` (as it reads now) on uint8 N×3×H×W images.

    MSE is over all pixels and channels on the [0, 1] scale; PSNR is computed from it;
    perplexity and slots used come from the slot counts over the whole set (not per
    batch). Memory reads add mean weight entropy (bits), mean max weight, the fraction
    of positions with max weight > 0.99, and β; the top-k read also the mean weight mass
    its k slots leave out (``outside_mass``).
    """
    model.eval()
    k = model.bottleneck.codebook_size
    counts = None  # the bottleneck's slot counts (S·K for S stages of K slots), summed over batches
    sq_error, pixels, positions = 0.0, 0, 0
    sums: dict[str, float] = {}
    for batch in images.split(batch_size):
        x = to_input(batch.to(device))
        out = model(x)
        sq_error += float((out.reconstruction.float() - x).pow(2).sum(dtype=torch.float64))
        pixels += x.numel()
        if out.bottleneck.codes is None:  # the continuous control: no codes to count
            continue
        codes = out.bottleneck.codes
        batch_counts = model.bottleneck.slot_counts(codes)
        counts = batch_counts if counts is None else counts + batch_counts
        n = codes.numel()
        positions += n
        for key in model.bottleneck.averaged_metrics:
            if key in out.bottleneck.metrics:
                sums[key] = sums.get(key, 0.0) + float(out.bottleneck.metrics[key]) * n
    mse = sq_error / pixels
    result = {
        "images": int(images.shape[0]),
        "mse": mse,
        "nmse": nmse(mse, train_variance),
        "psnr": psnr(mse),
    }
    if k:
        counts = counts if counts is not None else torch.zeros(1, dtype=torch.int64)  # no images: no slot read
        result["perplexity"] = float(perplexity_from_counts(counts))
        result["slots_used"] = int((counts > 0).sum())
    for key, name in model.bottleneck.averaged_metrics.items():
        if key in sums:
            result[name] = sums[key] / positions
    result.update(model.bottleneck.evaluation_constants())
    return result


def reads_of(model: Autoencoder) -> list[str]:
    """The reads a model can be evaluated with, as its bottleneck declares them ("soft" and
    "hard" for the memory, "nearest" for VQ and FSQ, "continuous" for none)."""
    return list(model.bottleneck.reads)


@contextmanager
def reading_with(model: Autoencoder, read: str):
    """Evaluate with ``read`` (one its bottleneck declares) inside the block."""
    bottleneck = model.bottleneck
    saved, bottleneck.eval_read = bottleneck.eval_read, read
    try:
        yield model
    finally:
        bottleneck.eval_read = saved


@torch.no_grad()
def evaluate_model(model: Autoencoder, images: torch.Tensor, train_variance: float, batch_size: int = 500, device="cpu") -> dict:
    """{read: evaluate_read(...)} for every read of the model, and for each read after the
    bottleneck's own one ``READ_gap`` = its NMSE − the own read's (the memory's
    ``hard_gap``: what reading one slot costs a model trained on the soft read). The
    model's read mode is restored afterwards."""
    reads = reads_of(model)
    results = {}
    for read in reads:
        with reading_with(model, read):
            results[read] = evaluate_read(model, images, train_variance, batch_size, device)
    for read in reads[1:]:
        results[f"{read}_gap"] = results[read]["nmse"] - results[reads[0]]["nmse"]
    return results


def evaluation_record(run_dir, step: int, model: Autoencoder, image_sets: dict[str, torch.Tensor],
                      train_variance: float, batch_size: int = 500, device="cpu") -> dict:
    """What RUN_DIR/eval.json holds: the run, its update, the variance NMSE divides by, and
    :func:`evaluate_model` on each named set of uint8 N×3×H×W images ("test", "lossless", ...)."""
    record = {"run_dir": str(run_dir), "step": int(step), "train_variance": train_variance}
    for name, images in image_sets.items():
        record[name] = evaluate_model(model, images, train_variance, batch_size, device)
    return record


def is_gap(key: str) -> bool:
    """Whether ``key`` of :func:`evaluate_model`'s result is a read's gap, not a read."""
    return key.endswith("_gap")


@torch.no_grad()
def reconstructions(model: Autoencoder, images: torch.Tensor, device="cpu") -> dict[str, torch.Tensor]:
    """{read: uint8 N×3×H×W reconstructions of uint8 ``images``} for every read of the model."""
    model.eval()
    result = {}
    for read in reads_of(model):
        with reading_with(model, read):
            result[read] = to_uint8(model(to_input(images.to(device))).reconstruction).cpu()
    return result
