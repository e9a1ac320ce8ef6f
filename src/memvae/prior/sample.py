"""New images from a run's prior (VQ-VAE paper, section 4): slot maps drawn from the fitted
PixelCNN (:mod:`memvae.prior.fit`) in raster order, decoded by the run's decoder."""
from __future__ import annotations

import os

import torch

from memvae.data import to_uint8
from memvae.errors import MemvaeError
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.codes import codes_from_map
from memvae.prior.fit import prior_dir
from memvae.training.checkpoint import load_latest
from memvae.training.runs import load_run


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
