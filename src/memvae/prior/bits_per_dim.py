"""Bits per dimension: the likelihood bound of the VQ-VAE paper's CIFAR-10 table.

A discrete autoencoder is a latent-variable model: codes c ~ p(c) (the run's PixelCNN
prior, :mod:`memvae.prior.fit`) and an image x ~ p(x | c), a discretised Gaussian around the
decoder's output (van den Oord et al. 2017, section 4.1; the per-sub-pixel bins of
PixelCNN++, Salimans et al. 2017, eq. 2, with one Gaussian instead of a logistic mixture).
With c the encoder's codes of x,

    −log2 p(x) ≤ −log2 p(c) − log2 p(x | c)        (p(x) = Σ_c' p(c') p(x | c') ≥ p(c) p(x | c))
    bits / dim = (prior bits of c + decoder bits of x) / (3·H·W)

and with the prior replaced by the uniform one over the codes (every code costs its fixed
rate, bits_per_position × positions) the same sum is a looser bound. For a model with no
codes (the continuous control ``none``, or a soft read) only the decoder term exists: it is
reported, but it is not a bound on anything (the latent is continuous and costs nothing).

The discretised Gaussian: a pixel value x ∈ {0, …, 255} sits on the decoder's scale at
x/255 − 0.5 (:func:`memvae.data.to_input`) and owns the bin of half-width 0.5/255 around it;
bins 0 and 255 take the tails, so the 256 masses sum to 1 for every mean and σ:

    p(x | μ, σ) = Φ((x⁺ − μ)/σ) − Φ((x⁻ − μ)/σ),   x⁻ = −∞ if x = 0,  x⁺ = +∞ if x = 255.

σ is one number per colour channel, fitted by maximum likelihood (of this discretised
likelihood, not the continuous one) on training images, never on the images scored: any σ
fixed before the scored images are seen keeps the bound valid, and the training images'
maximiser is a good one. (The autoencoder trained on those images too, so its errors there
are, if anything, a little smaller than on the test set: σ errs low, which costs test bits.)

Layout: ``RUN_DIR/bits_per_dim.json`` (see :func:`measure`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from memvae.data import load_array_images, load_data, to_input
from memvae.errors import MemvaeError
from memvae.networks.autoencoder import Autoencoder
from memvae.prior.codes import extract_codes, nll_bits
from memvae.prior.fit import prior_dir
from memvae.prior.sample import load_prior
from memvae.training.runlock import run_lock
from memvae.training.runs import load_run

BPD_FILE = "bits_per_dim.json"
SIGMA_IMAGES = 5000  # the last 5,000 of the training images fit σ (CIFAR-10: images 45,000-49,999)
HALF_BIN = 0.5 / 255.0  # half a pixel level on the decoder's scale
LN2 = math.log(2.0)
# σ is searched between a hundredth of a level and the whole range (on the decoder's scale).
SIGMA_FLOOR, SIGMA_CEIL = 0.01 / 255.0, 1.0


# ---------------------------------------------------------------- the likelihood
def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(d)) for d ≤ 0, accurate at both ends (Mächler 2012): expm1 near 0, log1p far."""
    return torch.where(d > -LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _standardised_bins(images: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin of each pixel in σ units around its mean: (lo, hi), float64, ±inf at the edge bins."""
    x = images.double() / 255.0 - 0.5
    centred, sigma = x - mean.double(), sigma.double()
    lo = torch.where(images == 0, -math.inf, (centred - HALF_BIN) / sigma)
    hi = torch.where(images == 255, math.inf, (centred + HALF_BIN) / sigma)
    return lo, hi


def _log_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi (float64), without cancellation in either tail.

    A bin right of 0 is mirrored to the left (Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi)), so that
    the upper end is where Φ is small and ``log_ndtr`` keeps its digits; then
    log(Φ(hi) − Φ(lo)) = log Φ(hi) + log(1 − Φ(lo)/Φ(hi)).
    """
    right = lo > 0
    lo, hi = torch.where(right, -hi, lo), torch.where(right, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + _log1mexp(torch.special.log_ndtr(lo) - log_hi)


def discretized_gaussian_log_prob(images: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log p(x | μ, σ) in nats of each sub-pixel (see the module docstring), float64.

    Args:
        images: uint8 pixel values x (any shape, e.g. N×3×H×W).
        mean: μ on the decoder's scale ([−0.5, 0.5] for x in 0..255), broadcastable to
            ``images``; any real value (a decoder's output may leave the range).
        sigma: σ > 0 on the same scale, broadcastable (one per channel: 1×3×1×1).
    """
    return _log_mass(*_standardised_bins(images, mean, sigma))


def decoder_bits(images: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """−log2 p(x | μ, σ) summed over each image: uint8 N×C×H×W, μ N×C×H×W, σ C -> float64 N."""
    logp = discretized_gaussian_log_prob(images, mean, sigma.reshape(1, -1, 1, 1))
    return -logp.flatten(1).sum(1) / LN2


def _sigma_derivatives(images: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives, per channel, of the NLL Σ −log p(x | μ, σ) in s = log σ.

    With a, b the bin's ends in σ units (da/ds = −a), P = Φ(b) − Φ(a) and g_t = t·φ(t)/P:
    d log P/ds = g_a − g_b and d² log P/ds² = g_a(a² − 1) − g_b(b² − 1) − (g_a − g_b)²
    (an infinite end contributes g = 0).
    """
    lo, hi = _standardised_bins(images, mean, sigma.reshape(1, -1, 1, 1))
    log_p = _log_mass(lo, hi)

    def g(t: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(t)
        t = torch.where(finite, t, 0.0)
        return torch.where(finite, t * torch.exp(-0.5 * t * t - 0.5 * math.log(2 * math.pi) - log_p), 0.0)

    g_lo, g_hi = g(lo), g(hi)
    first = g_lo - g_hi
    second = g_lo * (torch.where(torch.isfinite(lo), lo, 0.0) ** 2 - 1) - g_hi * (torch.where(torch.isfinite(hi), hi, 0.0) ** 2 - 1)
    second = second - first * first
    return -first.transpose(0, 1).flatten(1).sum(1), -second.transpose(0, 1).flatten(1).sum(1)


def fit_sigma(images: torch.Tensor, means: torch.Tensor, chunk: int = 500, tolerance: float = 1e-7,
              max_iterations: int = 100) -> torch.Tensor:
    """Per-channel σ of maximum likelihood under :func:`discretized_gaussian_log_prob`.

    Newton's method on s = log σ for each channel, kept inside a bracket of the
    derivative's sign change (a step that leaves it, or meets negative curvature, bisects
    instead), from [SIGMA_FLOOR, SIGMA_CEIL]; it stops when every step is below
    ``tolerance`` in log σ. The likelihood has no closed-form maximiser: the bins
    (Sheppard's correction, about 1/12 level² of variance) and the tail-taking edge bins
    move it away from the root-mean-square residual, where the search starts.

    Args:
        images: uint8 N×C×H×W.  means: the decoder's outputs N×C×H×W on its scale.
        chunk: images per pass (bounds the memory of the float64 temporaries).
    Returns:
        float64 C: σ per channel on the decoder's scale.
    """
    channels = images.shape[1]
    residual = (images.double() / 255.0 - 0.5 - means.double()).transpose(0, 1).reshape(channels, -1)
    rms = residual.pow(2).mean(1).sqrt()
    s = rms.clamp(SIGMA_FLOOR, SIGMA_CEIL).log()
    lo = torch.full_like(s, math.log(SIGMA_FLOOR))
    hi = torch.full_like(s, math.log(SIGMA_CEIL))
    for _ in range(max_iterations):
        first, second = torch.zeros_like(s), torch.zeros_like(s)
        for x, mu in zip(images.split(chunk), means.split(chunk)):
            d1, d2 = _sigma_derivatives(x, mu, s.exp())
            first, second = first + d1, second + d2
        # The NLL falls while the derivative is negative: the minimum lies above s then.
        lo, hi = torch.where(first < 0, s, lo), torch.where(first > 0, s, hi)
        newton = s - first / second
        usable = (second > 0) & (newton > lo) & (newton < hi)
        step = torch.where(first == 0, s, torch.where(usable, newton, (lo + hi) / 2)) - s
        s = s + step
        if bool((step.abs() < tolerance).all()):
            break
    return s.exp()


# ---------------------------------------------------------------- a model's numbers
def rate_bits_per_position(bottleneck) -> float:
    """The fixed rate of a position's code: the bottleneck's ``bits_per_position``."""
    return float(bottleneck.bits_per_position)


@torch.no_grad()
def decoder_means(model: Autoencoder, images: torch.Tensor, batch_size: int = 500,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, int]:
    """The model's reconstructions of uint8 N×3×H×W ``images`` with its own (evaluation)
    read, float32 on the decoder's scale on the CPU, and the positions of its latent map."""
    model.eval()
    outputs, positions = [], 0
    for batch in images.split(batch_size):
        out = model(to_input(batch.to(device)))
        outputs.append(out.reconstruction.float().cpu())
        positions = out.bottleneck.quantized[0, 0].numel()  # B×D×h×w: h·w positions
    return torch.cat(outputs), positions


def score(model: Autoencoder, images: torch.Tensor, sigma: torch.Tensor, prior=None,
          batch_size: int = 500, device: str | torch.device = "cpu") -> dict:
    """The bits of uint8 N×3×H×W ``images`` under a model, σ per channel and a prior.

    ``prior``: a PixelCNN over the model's codes (:func:`memvae.prior.sample.load_prior`), or None
    for a model whose own read is continuous (then only the decoder term is returned, and
    ``bits_per_dim`` is that term). Means over the images, in bits.
    """
    dims = images[0].numel()
    total, count, positions = 0.0, 0, 0
    for batch in images.split(batch_size):
        means, positions = decoder_means(model, batch, batch_size, device)
        total += float(decoder_bits(batch, means, sigma).sum())
        count += len(batch)
    result = {"images": count, "dims": dims, "sigma": sigma.tolist(), "sigma_levels": (sigma * 255).tolist(),
              "decoder_bits_per_image": total / count}
    result["decoder_bits_per_dim"] = result["decoder_bits_per_image"] / dims
    if prior is None:
        result["bits_per_dim"] = result["decoder_bits_per_dim"]
        return result
    codes = extract_codes(model, images, batch_size, device)
    per_index = nll_bits(prior, codes, batch_size, device)
    indices = codes[0].numel()  # code symbols per image (stages or a mixture's parts side by side)
    uniform = rate_bits_per_position(model.bottleneck) * positions
    result.update({
        "positions": positions,
        "code_symbols": indices,
        "prior_bits_per_index": per_index,
        "prior_bits_per_image": per_index * indices,
        "prior_bits_per_dim": per_index * indices / dims,
        "uniform_bits_per_image": uniform,
        "bits_per_dim": (per_index * indices + result["decoder_bits_per_image"]) / dims,
        "uniform_bits_per_dim": (uniform + result["decoder_bits_per_image"]) / dims,
    })
    return result


def measure(run_dir: str | os.PathLike, prior: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
            lossless: str | os.PathLike | None = None, sigma_images: int = SIGMA_IMAGES, test_images: int = 0,
            batch_size: int = 500, device: str | torch.device = "cpu", write: bool = True) -> dict:
    """Bits per dimension of a run on its whole test set (and on ``lossless`` images),
    written to RUN_DIR/bits_per_dim.json (``write``) and returned.

    σ per channel is fitted on the last ``sigma_images`` training images of the run's data
    for its test set, and on the lossless file's own ``x_train`` for its ``x_test`` (the
    JPEG'd copy's errors are smaller than the originals': each set gets its own σ).

    Args:
        run_dir: a trained run directory (its newest checkpoint).
        prior: the prior's folder (default RUN_DIR/prior); needed for a discrete model, not
            read for a continuous one.
        data_dir: overrides the run's data directory.
        lossless: an .npz with uint8 ``x_train`` and ``x_test`` (N×H×W×3), e.g.
            cifar10-lossless-subset.npz.
        test_images: score only the first N test images (0: all), for quick checks.
    """
    if sigma_images <= 0 or test_images < 0:
        raise MemvaeError(f"sigma images must be > 0 and test images >= 0, got {sigma_images} and {test_images}")
    model, cfg, state = load_run(run_dir, device)
    discrete = bool(model.bottleneck.discrete)
    pixelcnn, prior_state = None, None
    if discrete:
        pixelcnn, prior_state = load_prior(run_dir, device, prior)
        if int(prior_state["model_step"]) != int(state["step"]):
            raise MemvaeError(f"the prior in {prior_dir(run_dir, prior)} was fitted to the model at update "
                              f"{prior_state['model_step']}, but the run is now at update {state['step']}; fit it again "
                              f"with `memvae prior {run_dir} --overwrite`")
    data = load_data(cfg.data.source, data_dir or cfg.data.dir or None, cfg.data.image_size)
    fit = data.train[-sigma_images:]
    first_fit = len(data.train) - len(fit)
    sets = {"test": (data.test[: test_images or None], fit, f"training images {first_fit}..{len(data.train) - 1}")}
    if lossless is not None:
        sets["lossless"] = (load_array_images(lossless, "x_test")[: test_images or None],
                            load_array_images(lossless, "x_train"), f"x_train of {lossless}")
    result = {
        "run_dir": str(run_dir),
        "name": cfg.name,
        "kind": cfg.bottleneck.kind,
        "read": model.bottleneck.eval_read,
        "model_step": int(state["step"]),
        "bound": discrete,
        "likelihood": "discretised Gaussian around the decoder's output, sigma per channel by maximum likelihood",
    }
    if discrete:
        result["prior"] = {"dir": str(prior_dir(run_dir, prior)), "prior_step": int(prior_state["step"])}
        result["bits_per_position"] = rate_bits_per_position(model.bottleneck)
    else:
        result["note"] = (f"its own read ({model.bottleneck.eval_read}) is not discrete, so it has no codes to cost: "
                          "the decoder term alone, not a bound on the likelihood")
    for name, (images, fit_images, fit_text) in sets.items():
        means, _ = decoder_means(model, fit_images, batch_size, device)
        sigma = fit_sigma(fit_images, means)
        scored = score(model, images, sigma, pixelcnn, batch_size, device)
        result[name] = {"sigma_fit": {"images": len(fit_images), "which": fit_text}, **scored}
    if write:
        with run_lock(run_dir, create=False):  # a file in the run: one writer (memvae.training.runlock)
            (Path(run_dir) / BPD_FILE).write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    """:func:`measure`'s result as a short markdown table, one row per image set."""
    header = ["images", "count", "σ R G B (levels)", "decoder", "prior", "bits / dim", "uniform prior"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ("test", "lossless"):
        r = result.get(name)
        if r is None:
            continue
        sigma = " ".join(f"{s:.2f}" for s in r["sigma_levels"])
        bound = "" if result["bound"] else " (not a bound)"
        prior = f"{r['prior_bits_per_dim']:.4f}" if "prior_bits_per_dim" in r else "—"
        uniform = f"{r['uniform_bits_per_dim']:.4f}" if "uniform_bits_per_dim" in r else "—"
        lines.append(f"| {name} | {r['images']} | {sigma} | {r['decoder_bits_per_dim']:.4f} | {prior} | "
                     f"{r['bits_per_dim']:.4f}{bound} | {uniform} |")
    return "\n".join(lines)
