"""Bits per dimension (memvae.prior.bits_per_dim): the discretised Gaussian, the σ fit, the bound
of a model whose decoder is exact, the command on real runs, and the tables that show it."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memvae.config import presets
from memvae.prior.bits_per_dim import (
    BPD_FILE,
    decoder_bits,
    discretized_gaussian_log_prob,
    fit_sigma,
    measure,
    rate_bits_per_position,
    score,
)
from memvae.cli.main import main
from memvae.experiments.report import BPD_CAPTION, _summarise, results_table
from memvae.config.schema import load_config
from memvae.data import ImageData, to_input
from memvae.errors import MemvaeError
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.codes import extract_codes, nll_bits
from memvae.prior.fit import PriorOptions, train_prior
from memvae.quantizers import bottleneck_class
from memvae.experiments.sweep import rate_tables
from memvae.training.train import train
from tests.cli_util import SMOKE

LOSSLESS_NAME = "cifar10-lossless-subset.npz"
# The study's networks made small (the smoke config's), with vq_ema_reseed's bottleneck at K = 64.
SMALL_NETS = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16", "bottleneck.slots=64",
              "train.threads=1", "train.log_every=10", "data.eval_images=200"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def phi(t: float) -> float:
    """Φ, the standard normal CDF, from math.erfc: full relative precision in the left tail."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def bin_mass(lo: float, hi: float) -> float:
    """Φ(hi) − Φ(lo), from the tail the bin lies in (a right-hand bin mirrored to the left)."""
    return phi(-lo) - phi(-hi) if lo > 0 else phi(hi) - phi(lo)


# ---------------------------------------------------------------- the likelihood
@pytest.mark.parametrize("mean", [-3.0, -0.7, -0.5, -0.31, 0.0, 0.2037, 0.5, 0.61, 4.0])
@pytest.mark.parametrize("sigma", [1e-7, 1e-4, 0.5 / 255, 0.02, 0.3, 20.0])
def test_the_256_masses_sum_to_one(mean, sigma):
    """For any mean (inside the pixel range or far outside it) and any σ, the edge bins
    take the tails and the 256 masses sum to 1; each log-mass is finite and ≤ 0."""
    x = torch.arange(256, dtype=torch.uint8)
    logp = discretized_gaussian_log_prob(x, torch.tensor(mean), torch.tensor(sigma))
    assert logp.dtype == torch.float64 and torch.isfinite(logp).all() and (logp <= 0).all()
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("mean,sigma", [(0.0, 0.05), (-0.45, 0.01), (0.3, 3 / 255), (0.49, 0.2), (-0.6, 0.1)])
def test_each_mass_is_the_normal_cdf_over_its_bin(mean, sigma):
    """Brute force: Φ((x + ½ − μ)/σ) − Φ((x − ½ − μ)/σ) on the 0..255 scale, from math.erfc,
    with the bins of 0 and 255 open to −∞ and +∞."""
    x = torch.arange(256, dtype=torch.uint8)
    got = discretized_gaussian_log_prob(x, torch.tensor(mean, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)).exp()
    mu, s = (mean + 0.5) * 255, sigma * 255
    for v in range(256):
        hi = math.inf if v == 255 else (v + 0.5 - mu) / s
        lo = -math.inf if v == 0 else (v - 0.5 - mu) / s
        assert float(got[v]) == pytest.approx(bin_mass(lo, hi), rel=1e-9, abs=1e-300), v


def test_far_tails_keep_their_digits():
    """A bin 40 σ from the mean: Φ differences underflow in float64, the log-mass does not
    (it is −40²/2 − log(40·√(2π)) to first order, the normal's Mills ratio)."""
    x = torch.tensor([200], dtype=torch.uint8)
    sigma = 1.0 / 255  # one level
    mean = torch.tensor((200 + 40.5) / 255 - 0.5)  # the bin's upper end 40 σ below the mean
    logp = float(discretized_gaussian_log_prob(x, mean, torch.tensor(sigma)))
    mills = -40.0 ** 2 / 2 - math.log(40.0 * math.sqrt(2 * math.pi))
    assert math.isfinite(logp) and logp == pytest.approx(mills, rel=1e-3)


def test_sigma_fit_recovers_a_known_sigma():
    """Pixels drawn as round(μ + σ·ε) clipped to 0..255 have exactly the discretised
    Gaussian's law: the fit recovers σ, also below a level (where the root-mean-square
    residual, √(σ² + 1/12) levels, is 10 % off) and with many pixels in the edge bins."""
    gen = torch.Generator().manual_seed(0)
    n = 300
    means = torch.rand(n, 3, 32, 32, generator=gen) * 1.2 - 0.6  # a fifth of the means outside the range
    true = torch.tensor([0.6, 4.0, 25.0], dtype=torch.float64)  # levels
    noise = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64) * true.view(1, 3, 1, 1)
    images = ((means.double() + 0.5) * 255 + noise).round().clamp(0, 255).to(torch.uint8)
    fitted = fit_sigma(images, means, chunk=100) * 255
    assert torch.allclose(fitted, true, rtol=0.01), fitted
    red, inside = images[:, 0].double() - (means[:, 0].double() + 0.5) * 255, (images[:, 0] > 0) & (images[:, 0] < 255)
    assert float(red[inside].pow(2).mean().sqrt()) / 0.6 > 1.05  # the naive estimate misses the first


def test_the_fit_maximises_the_likelihood():
    """The likelihood at the fitted σ beats σ one percent either side, channel by channel."""
    gen = torch.Generator().manual_seed(1)
    means = torch.rand(50, 3, 8, 8, generator=gen) - 0.5
    images = ((means + 0.5) * 255 + torch.randn(50, 3, 8, 8, generator=gen) * 3).round().clamp(0, 255).to(torch.uint8)
    sigma = fit_sigma(images, means)
    best = decoder_bits(images, means, sigma).sum()
    for c in range(3):
        for factor in (0.99, 1.01):
            other = sigma.clone()
            other[c] *= factor
            assert decoder_bits(images, means, other).sum() > best


# ---------------------------------------------------------------- a model with an exact decoder
class ExactModel(nn.Module):
    """A stand-in for an autoencoder whose decoder returns the image itself, and whose codes
    (one of K per 4×4 block, from the block's first red pixel) a prior scores."""

    def __init__(self, codebook_size: int = 16):
        super().__init__()
        self.bottleneck = SimpleNamespace(codebook_size=codebook_size, stages=1, discrete=True, eval_read="nearest",
                                          symbol_sizes=lambda: (codebook_size,), bits_per_position=math.log2(codebook_size))

    def forward(self, x):
        pixels = ((x + 0.5) * 255).round().long()
        codes = pixels[:, 0, ::4, ::4] % self.bottleneck.codebook_size  # B×8×8
        quantized = torch.zeros(x.shape[0], 2, *codes.shape[1:])
        return SimpleNamespace(reconstruction=x.clone(), bottleneck=SimpleNamespace(codes=codes, quantized=quantized))


def test_an_exact_decoder_scores_the_priors_bits_over_3072(cifar):
    images = cifar.test[:64]
    # The decoder term alone: exact means and a tiny σ cost nothing.
    assert float(decoder_bits(images, to_input(images.clone()), torch.full((3,), 1e-4)).abs().max()) < 1e-9
    model = ExactModel(16)
    prior = GatedPixelCNN(16, width=8, layers=2).eval()  # untrained: some law over the codes, not the uniform one
    result = score(model, images, torch.full((3,), 1e-4, dtype=torch.float64), prior, batch_size=20)
    prior_bits = nll_bits(prior, extract_codes(model, images), batch_size=20) * 64  # 8×8 codes per image, batched alike
    assert result["decoder_bits_per_image"] == pytest.approx(0.0, abs=1e-9)
    assert result["bits_per_dim"] == pytest.approx(prior_bits / 3072, rel=1e-12)
    assert result["prior_bits_per_image"] == pytest.approx(prior_bits, rel=1e-12)
    assert result["uniform_bits_per_dim"] == pytest.approx(4 * 64 / 3072, rel=1e-12)  # log2 16 bits at 64 positions
    assert result["images"] == 64 and result["dims"] == 3072 and result["positions"] == 64


def brute_force_decoder_bits(images: torch.Tensor, means: torch.Tensor, sigma: list[float]) -> list[float]:
    """Σ −log2 p over each image's sub-pixels, one bin at a time from math.erfc (no torch)."""
    totals = []
    for image, mean in zip(images.tolist(), means.double().tolist()):
        bits = 0.0
        for c, (plane, mplane) in enumerate(zip(image, mean)):
            for row, mrow in zip(plane, mplane):
                for v, mu in zip(row, mrow):
                    centre = (v / 255 - 0.5 - mu) / sigma[c]
                    hi = math.inf if v == 255 else centre + 0.5 / 255 / sigma[c]
                    lo = -math.inf if v == 0 else centre - 0.5 / 255 / sigma[c]
                    bits -= math.log2(bin_mass(lo, hi))
        totals.append(bits)
    return totals


class BlurryModel(ExactModel):
    """ExactModel with a decoder that errs: each output pixel is 0.8 x + 0.03, shifted by one
    column, so that every sub-pixel pays bits and the per-channel σ matters."""

    def forward(self, x):
        out = super().forward(x)
        out.reconstruction = 0.8 * torch.roll(x, 1, dims=3) + 0.03
        return out


def test_decoder_bits_are_the_brute_force_sum_of_minus_log2_bin_masses():
    """A small batch with means off the pixels (some outside the range) and a σ per channel:
    bits, not nats, summed per image."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 4, 4), generator=gen, dtype=torch.uint8)
    images[0, 0, 0, 0], images[1, 2, 3, 3] = 0, 255  # both edge bins
    means = images.double() / 255 - 0.5 + torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 0.04
    means[0, 1, 2, 2] = 0.7  # beyond the range
    sigma = [0.02, 0.05, 3 / 255]
    got = decoder_bits(images, means, torch.tensor(sigma, dtype=torch.float64))
    want = brute_force_decoder_bits(images, means, sigma)
    assert got.tolist() == pytest.approx(want, rel=1e-10)
    assert min(want) > 16 * 3  # more than a bit per sub-pixel: a term no rounding could hide


def test_the_score_of_a_decoder_that_errs_is_the_brute_force_decoder_bits_plus_the_priors(cifar):
    """score() on real images through a decoder that errs: its decoder term per image is the
    brute-force sum, and bits/dim adds the prior's bits to it, over 3·32·32."""
    images = cifar.test[:3]
    model, sigma = BlurryModel(16), [0.03, 0.06, 0.1]
    prior = GatedPixelCNN(16, width=8, layers=2).eval()
    result = score(model, images, torch.tensor(sigma, dtype=torch.float64), prior, batch_size=2)
    means = 0.8 * torch.roll(to_input(images), 1, dims=3) + 0.03
    decoder = sum(brute_force_decoder_bits(images, means, sigma)) / 3
    prior_bits = nll_bits(prior, extract_codes(model, images), batch_size=2) * 64
    assert result["decoder_bits_per_image"] == pytest.approx(decoder, rel=1e-9)
    assert result["decoder_bits_per_dim"] == pytest.approx(decoder / 3072, rel=1e-9)
    assert result["bits_per_dim"] == pytest.approx((decoder + prior_bits) / 3072, rel=1e-9)
    assert decoder > 3072  # over a bit per sub-pixel: the decoder term dominates what is checked


def test_the_uniform_rate_prefers_the_bottlenecks_own_bits_per_position():
    assert rate_bits_per_position(bottleneck_class("residual_vq")(512, 8, stages=2)) == 18.0
    assert rate_bits_per_position(SimpleNamespace(bits_per_position=17.5)) == 17.5


# ---------------------------------------------------------------- real runs
def _train(cfg, path: Path, cifar) -> Path:
    data = ImageData(cifar.train[:2000], cifar.test[:200], cifar.train_labels[:2000], cifar.test_labels[:200])
    train(cfg, path, show_progress=False, data=data)
    return path


@pytest.fixture(scope="module")
def none_run(tmp_path_factory, cifar) -> Path:
    """The continuous control, 3 updates of the smoke networks."""
    cfg = load_config(SMOKE, ["bottleneck.kind=none", "train.threads=1", "train.steps=3", "train.eval_every=3",
                              "train.checkpoint_every=3"])
    return _train(cfg, tmp_path_factory.mktemp("bpd") / "none", cifar)


def test_a_continuous_model_gets_its_decoder_term_marked_not_a_bound(none_run, data_dir, capsys):
    code = main(["bpd", str(none_run), "--data-dir", str(data_dir), "--sigma-images", "200", "--test-images", "100",
                 "--device", "cpu"])
    assert code == 0
    saved = json.loads((none_run / BPD_FILE).read_text())
    assert saved["bound"] is False and "prior" not in saved and "not a bound" in saved["note"]
    test = saved["test"]
    assert test["bits_per_dim"] == test["decoder_bits_per_dim"] > 0 and math.isfinite(test["bits_per_dim"])
    assert "prior_bits_per_dim" not in test and "uniform_bits_per_dim" not in test
    assert test["images"] == 100 and test["sigma_fit"] == {"images": 200, "which": "training images 49800..49999"}
    assert "(not a bound)" in capsys.readouterr().out


def test_bad_input_gets_one_line(none_run, tmp_path, cifar, data_dir, capsys):
    assert main(["bpd", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {tmp_path} holds no checkpoint")
    cfg = load_config(SMOKE, ["train.threads=1", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"])
    discrete = _train(cfg, tmp_path / "vq", cifar)
    assert main(["bpd", str(discrete), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no trained prior; run `memvae prior" in err
    assert main(["bpd", str(none_run), "--sigma-images", "0"]) == 2
    assert "sigma images must be > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_on_a_tiny_vq_ema_reseed_run(tmp_path, cifar, data_dir, capsys):
    """30 updates of vq_ema_reseed on the smoke networks, a 20-update prior, then `memvae bpd`
    on 500 test images and the lossless file: the json holds finite, positive numbers that
    add up, a prior fitted to another update is refused, and compare's table shows them."""
    cfg = presets.load("vq_ema_reseed", SMALL_NETS + ["train.steps=30", "train.eval_every=30", "train.checkpoint_every=30"])
    run = _train(cfg, tmp_path / "run", cifar)
    train_prior(run, PriorOptions(steps=20, batch_size=16, width=16, layers=2, train_images=500, test_images=200,
                                  eval_every=0, device="cpu", threads=1), data=cifar)
    lossless = data_dir / LOSSLESS_NAME
    argv = ["bpd", str(run), "--data-dir", str(data_dir), "--sigma-images", "500", "--test-images", "500", "--device", "cpu"]
    argv += ["--lossless", str(lossless)] if lossless.exists() else []
    assert main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / BPD_FILE).read_text())
    assert f"wrote {run / BPD_FILE}" in out and "| test | 500 |" in out
    assert saved["bound"] is True and saved["model_step"] == 30 and saved["bits_per_position"] == 6.0
    for name in ["test"] + (["lossless"] if lossless.exists() else []):
        r = saved[name]
        for key in ("bits_per_dim", "uniform_bits_per_dim", "decoder_bits_per_dim", "prior_bits_per_dim", "prior_bits_per_index"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["bits_per_dim"] == pytest.approx(r["decoder_bits_per_dim"] + r["prior_bits_per_dim"], rel=1e-12)
        assert r["uniform_bits_per_dim"] == pytest.approx(r["decoder_bits_per_dim"] + 6 * 64 / 3072, rel=1e-12)
        assert r["prior_bits_per_image"] == pytest.approx(64 * r["prior_bits_per_index"], rel=1e-12)
        assert len(r["sigma"]) == 3 and all(s > 0 for s in r["sigma"])
    if lossless.exists():
        assert saved["lossless"]["sigma_fit"]["images"] == 4000 and saved["lossless"]["images"] == 500

    # The table of compare shows the column for this run, on its own read's row.
    from memvae.experiments.report import run_bits_per_dim

    numbers, bound = run_bits_per_dim(run, 30)
    assert bound is True and numbers["test"] == saved["test"]["bits_per_dim"]
    assert run_bits_per_dim(run, 31) is None  # of another update: left out (and said)
    seed = {"test": {"nearest": {"nmse": 0.5}}, "updates_to_nmse": {"0.2": None}, "seconds_per_update": 0.1,
            "bits_per_dim": numbers}
    results = {"steps": 30, "nmse_levels": [0.2], "test_images": 500, "models": {cfg.name: {
        "read": "nearest", "bits_per_dim_bound": bound, "seeds": [seed], "summary": _summarise([seed])}}}
    assert f"{saved['test']['bits_per_dim']:.3f} |" in results_table(results)

    # Training on changes what the codes mean: the prior of update 30 is refused.
    copy = tmp_path / "further"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tensorboard"))
    more = presets.load("vq_ema_reseed", SMALL_NETS + ["train.steps=32", "train.eval_every=32", "train.checkpoint_every=32"])
    train(more, copy, resume=True, data=cifar, show_progress=False)
    with pytest.raises(MemvaeError, match="fitted to the model at update 30"):
        measure(copy, data_dir=data_dir, sigma_images=100, test_images=50, write=False)


# ---------------------------------------------------------------- the tables
def _results(with_bpd: bool) -> dict:
    """compare's results of a discrete and a continuous model, two seeds each, with or
    without bits per dimension."""
    models = {}
    for name, read, bound, values in (("vq-k64", "nearest", True, (4.5, 4.6)), ("none", "continuous", False, (3.1, 3.3))):
        seeds = [{"test": {read: {"nmse": 0.05 + v / 100, "psnr": 24.0}}, "updates_to_nmse": {"0.2": 100},
                  "seconds_per_update": 0.1} for v in values]
        if with_bpd:
            for seed, v in zip(seeds, values):
                seed["bits_per_dim"] = {"test": v, "test_uniform": v + 0.2 if bound else None, "lossless": None,
                                        "lossless_uniform": None}
        entry = {"read": read, "discrete": bound, "k": 64 if bound else None, "base": name.split("-k")[0], "seeds": seeds,
                 "summary": _summarise(seeds)}
        if with_bpd:
            entry["bits_per_dim_bound"] = bound
        models[name] = entry
    return {"steps": 100, "seeds": 2, "nmse_levels": [0.2], "test_images": 100, "models": models}


def test_tables_show_bits_per_dim_only_when_a_run_has_them():
    from memvae.experiments.sweep import collect

    plain, with_bpd = _results(False), _results(True)
    dirs = {name: [] for name in plain["models"]}
    plain_md, plain_rd = results_table(plain), rate_tables(collect(plain, dirs), 100, 100)
    assert "bits / dim" not in plain_md + plain_rd and BPD_CAPTION not in plain_md
    md, rd = results_table(with_bpd), rate_tables(collect(with_bpd, dirs), 100, 100)
    assert "| test bits / dim |" in md and "lossless bits / dim" not in md and BPD_CAPTION in md
    assert "4.550 ± 0.071 |" in md and "3.200 ± 0.141 (not a bound) |" in md
    assert "### Bits per dimension at each rate, the test set" in rd
    assert "| vq | 4.550 ± 0.071 |" in rd and "| none (continuous) | 3.200 ± 0.141 (not a bound) |" in rd
    assert "| bits / dim | bits / dim, uniform prior |" in rd and "4.750 ± 0.071 |" in rd
