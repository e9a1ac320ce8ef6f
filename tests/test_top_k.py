"""The top-k read of MemoryRead (``top_k`` = k): checked against the dense read it restricts.

1. k = K is the dense read: output, loss, codes, statistics and every gradient (z, M, β),
   for the learned and the relative temperature, l2 and cosine, the gradient and the soft
   moving-average write, in one piece and chunk by chunk.
2. Small k: the read is the dense weights renormalised over the k largest (recomputed by
   brute force), ``outside_mass`` is the dense mass outside them, and the read is within
   2·outside·max‖M‖ of the dense read at every position; in training, above
   OUTSIDE_MASS_ROWS queries, the outside mass is that of every s-th query.
3. Repeatable: the same update twice at two threads gives the same bits, and a short
   training run (smoke networks) gives the same metrics and checkpoint twice, and when
   stopped and resumed.
"""
from __future__ import annotations

import pytest
import torch

from memvae.config import schema as C
from memvae.quantizers import MemoryRead
from memvae.training.checkpoint import load_latest
from memvae.data import ImageData
from memvae.errors import MemvaeError
from memvae.training.metrics import MetricsLog
from memvae.networks.autoencoder import build_bottleneck
from memvae.training.train import train
from tests.cli_util import strip_times
from tests.conftest import CONFIGS, memory_read

K, D = 48, 8
SETTINGS = {
    "l2_learned": dict(beta_init=0.5),
    "cosine_learned": dict(similarity="cosine", beta_init=4.0),
    "l2_relative_soft_ema": dict(temperature="relative", write="soft_ema", tau_start=1.0, tau_end=0.5),
    "l2_chunked": dict(beta_init=0.5, impl="fused", fused_threshold=5 * K, chunk=7),
}


def pair(name: str, k: int, **extra) -> tuple[MemoryRead, MemoryRead]:
    """(dense read, top-k read) of the same slots and β, in training mode."""
    options = {**SETTINGS[name], **extra}
    torch.manual_seed(1)
    dense = memory_read(K, D, init="random", **{**options, "impl": "dense"})
    top = memory_read(K, D, init="random", top_k=k, **options)
    top.load_state_dict(dense.state_dict())
    return dense.train(), top.train()


def update(read: MemoryRead, z: torch.Tensor, upstream: torch.Tensor):
    """One forward and backward: (output, d/dz, d/dM or None, d/dlog β)."""
    z = z.clone().requires_grad_(True)
    read.zero_grad(set_to_none=True)
    out = read(z)
    ((out.quantized * upstream).sum() + out.loss).backward()
    memory_grad = read.memory.grad if isinstance(read.memory, torch.nn.Parameter) else None
    beta_grad = read.log_beta.grad if isinstance(getattr(read, "log_beta", None), torch.nn.Parameter) else None
    return out, z.grad, memory_grad, beta_grad


def inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, D, 5, 4, generator=gen), torch.randn(3, D, 5, 4, generator=gen)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_top_k_with_k_equal_to_the_slots_is_the_dense_read(name):
    dense, top = pair(name, K)
    z, upstream = inputs()
    a, b = update(dense, z, upstream), update(top, z, upstream)
    assert b[0].weights is None  # the N×K weights are never held
    assert torch.allclose(a[0].quantized, b[0].quantized, atol=1e-6)
    assert torch.allclose(a[0].loss, b[0].loss, atol=1e-7)
    assert torch.equal(a[0].codes, b[0].codes)
    for key in ("entropy_bits", "max_weight", "confident", "perplexity", "beta"):
        assert torch.allclose(a[0].metrics[key], b[0].metrics[key], atol=1e-5), key
    assert float(b[0].metrics["outside_mass"]) == 0.0
    for grad_a, grad_b in zip(a[1:], b[1:]):
        assert (grad_a is None) == (grad_b is None)
        if grad_a is not None:
            assert torch.allclose(grad_a, grad_b, atol=1e-5), name
    if "soft_ema" in name:  # the soft write by the k weights is the dense one
        for buffer in ("memory", "cluster_size", "embed_sum", "distortion"):
            assert torch.allclose(getattr(dense, buffer), getattr(top, buffer), atol=1e-6), buffer


def brute_force(read: MemoryRead, z: torch.Tensor, k: int):
    """Per position (rows N): the dense weights, the top-k renormalised read and the dense
    mass outside the top k, in float64 from −β‖z − m‖² (or β cos)."""
    x = z.permute(0, 2, 3, 1).reshape(-1, D).double()
    memory, beta = read.memory.detach().double(), read.beta().detach().double()
    if read.similarity == "l2":
        logits = -beta * torch.cdist(x, memory).pow(2)
    else:
        logits = beta * torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(memory, dim=1).t()
    w = logits.softmax(1)
    top, slots = w.topk(k, dim=1)
    renormalised = top / top.sum(1, keepdim=True)
    read_k = (renormalised[:, :, None] * memory[slots]).sum(1)
    return w @ memory, read_k, 1.0 - top.sum(1), slots[:, 0]


@pytest.mark.parametrize("name", ["l2_learned", "cosine_learned", "l2_chunked"])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_small_k_reads_the_renormalised_top_weights_within_the_outside_mass(name, k):
    dense, top = pair(name, k)
    z, _ = inputs()
    with torch.no_grad():
        out = top(z)
        reference = dense(z).quantized.permute(0, 2, 3, 1).reshape(-1, D).double()
    dense_read, read_k, outside, codes = brute_force(top, z, k)
    got = out.quantized.permute(0, 2, 3, 1).reshape(-1, D).double()
    assert torch.allclose(got, read_k, atol=1e-5)
    assert torch.equal(out.codes.reshape(-1), codes)
    assert abs(float(out.metrics["outside_mass"]) - float(outside.mean())) < 1e-5
    assert float(outside.mean()) > 1e-3  # the settings leave real mass outside: the bound below is not vacuous
    largest = top.memory.detach().double().norm(dim=1).max()
    assert torch.allclose(reference, dense_read, atol=1e-5)
    assert ((got - reference).norm(dim=1) <= 2 * outside * largest + 1e-5).all()


def test_in_training_the_outside_mass_is_that_of_every_s_th_query():
    """Above OUTSIDE_MASS_ROWS queries a training update measures the outside mass on every
    s-th query only (s = ⌈N / OUTSIDE_MASS_ROWS⌉); evaluation measures it on all of them.
    The read itself uses every query's k slots either way."""
    from memvae.quantizers.memory_top_k import OUTSIDE_MASS_ROWS

    dense, top = pair("l2_learned", 4)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(7, D, 10, 10, generator=gen)  # N = 700 queries
    n = z.shape[0] * 100
    step = -(-n // OUTSIDE_MASS_ROWS)
    assert step > 1
    _, read_k, outside, codes = brute_force(top, z, 4)
    with torch.no_grad():
        trained = top.train()(z)
        evaluated = top.eval()(z)
    assert abs(float(trained.metrics["outside_mass"]) - float(outside[::step].mean())) < 1e-5
    assert abs(float(evaluated.metrics["outside_mass"]) - float(outside.mean())) < 1e-5
    assert abs(float(outside[::step].mean()) - float(outside.mean())) > 1e-5  # the two differ: the test tells them apart
    got = trained.quantized.permute(0, 2, 3, 1).reshape(-1, D).double()
    assert torch.allclose(got, read_k, atol=1e-5)
    assert torch.equal(trained.codes.reshape(-1), codes)


def test_at_the_end_of_the_schedule_a_few_slots_hold_almost_all_the_mass():
    """The discrete memory's setting (relative temperature, τ = 0.02): with k = 8 the read
    matches the dense one to the outside mass, which is tiny."""
    read = memory_read(K, D, temperature="relative", tau_start=1.0, tau_end=0.02, tau_anneal_updates=1, top_k=8, init="random").train()
    dense = memory_read(K, D, temperature="relative", tau_start=1.0, tau_end=0.02, tau_anneal_updates=1, init="random").train()
    dense.load_state_dict(read.state_dict())
    z, _ = inputs()
    with torch.no_grad():
        for module in (read, dense):  # one update moves τ to its end value and sets q̄
            module(z)
        a, b = dense(z), read(z)
    assert float(read.tau()) == pytest.approx(0.02)
    assert float(b.metrics["outside_mass"]) < 1e-3
    assert torch.allclose(a.quantized, b.quantized, atol=1e-3 * float(read.memory.detach().norm(dim=1).max()))


def test_repeatable_at_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for _ in range(2):
            _, top = pair("l2_learned", 6)
            z, upstream = inputs()
            out, *grads = update(top, z, upstream)
            results.append([out.quantized, out.codes, *out.metrics.values(), *grads])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_top_k_is_refused_outside_zero_to_the_slots():
    with pytest.raises(ValueError, match="top_k"):
        memory_read(K, D, top_k=K + 1)
    with pytest.raises(MemvaeError, match="top_k"):
        C.load_config(CONFIGS / "memory_discrete.toml", ["bottleneck.slots=64", "bottleneck.top_k=65"])
    with pytest.raises(MemvaeError, match="top_k"):
        C.load_config(CONFIGS / "memory_discrete.toml", ["bottleneck.top_k=-1"])
    cfg = C.load_config(CONFIGS / "memory_discrete.toml", ["bottleneck.top_k=16"])
    assert build_bottleneck(cfg.bottleneck, 64).top_k == 16


# ---------------------------------------------------------------- in training
SMOKE = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16", "bottleneck.slots=64",
         "data.eval_images=100", "train.lr=1e-3", "train.threads=2", "train.steps=20", "train.log_every=5",
         "train.eval_every=10", "train.checkpoint_every=10", "bottleneck.top_k=8", "bottleneck.tau_anneal_updates=10",
         "train.device=cpu"]  # a statement about CPU threads: CUDA is repeatable only with train.deterministic


@pytest.fixture(scope="module")
def small_cifar(cifar) -> ImageData:
    return ImageData(cifar.train[:1000], cifar.test[:100], cifar.train_labels[:1000], cifar.test_labels[:100])


def test_training_with_top_k_is_repeatable_and_resumes_exactly(tmp_path, small_cifar):
    cfg = C.load_config(CONFIGS / "memory_discrete.toml", SMOKE)
    for run in ("a", "b"):
        train(cfg, tmp_path / run, show_progress=False, data=small_cifar)
    train(cfg, tmp_path / "resumed", show_progress=False, data=small_cifar, stop_after=10)
    train(cfg, tmp_path / "resumed", resume=True, show_progress=False, data=small_cifar)
    logs = [strip_times(MetricsLog(tmp_path / run / "metrics.jsonl").read()) for run in ("a", "b", "resumed")]
    assert logs[0] == logs[1] == logs[2]
    assert all("outside_mass" in r for r in logs[0] if r["kind"] == "train")
    assert all("eval_outside_mass" in r for r in logs[0] if r["kind"] == "eval")
    states = [load_latest(tmp_path / run / "checkpoints") for run in ("a", "b", "resumed")]
    for other in states[1:]:
        for key, value in states[0]["model"].items():
            assert torch.equal(value, other["model"][key]), key
