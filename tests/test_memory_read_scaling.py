"""The memory read at scale: the fused path (no N×K matrix) against the dense one.

MemoryRead computes the same read two ways: "dense" holds the N×K weights; "fused" hands
the read to scaled_dot_product_attention with augmented queries and keys and computes
codes and weight statistics chunk by chunk. "auto" picks fused when N·K exceeds
``fused_threshold`` (2^22). Here both are run on the same inputs and must agree: outputs,
gradients to z, M and log β, codes, weight statistics, the soft write.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from memvae.quantizers.memory import MemoryRead
from tests.conftest import memory_read

# N = 64·8·8 = 4096 queries against K = 1100 slots: N·K ≈ 4.5M > 2^22, so "auto" fuses.
B, H, W, K, D = 64, 8, 8, 1100, 8
# (similarity, β): for each, one β with reads spread over many slots and one where a
# good part of the reads is confident (max weight > 0.99), checked below.
SETTINGS = [("l2", 0.5), ("l2", 4.0), ("cosine", 20.0), ("cosine", 80.0)]


def make_inputs(seed: int = 0, b: int = B, k: int = K, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """(z B×D×H×W, M K×D): each query is a slot plus noise of a scale that varies from
    query to query, so that some reads are confident (max weight > 0.99) and some are
    spread over many slots."""
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(k, d, generator=gen)
    n = b * H * W
    near = memory[torch.randint(k, (n,), generator=gen)]
    scale = 2.0 * torch.rand(n, 1, generator=gen)
    z = near + scale * torch.randn(n, d, generator=gen)
    return z.view(b, H, W, d).permute(0, 3, 1, 2).contiguous(), memory


def make_read(memory: torch.Tensor, impl: str, **kwargs) -> MemoryRead:
    read = memory_read(memory.shape[0], memory.shape[1], impl=impl, **kwargs)
    with torch.no_grad():
        read.memory.copy_(memory)
        if read.write == "soft_ema":
            read.embed_sum.copy_(memory)  # the moving sums start at the slots
    return read


def run(read: MemoryRead, z: torch.Tensor, upstream: torch.Tensor):
    """Forward and backward of Σ upstream·quantized; returns (output, {name: gradient})."""
    z = z.clone().requires_grad_(True)
    out = read(z)
    (out.quantized * upstream).sum().backward()
    grads = {"z": z.grad}
    for name, p in read.named_parameters():
        grads[name] = p.grad
    return out, grads


def brute_force(z: torch.Tensor, memory: torch.Tensor, beta: float, similarity: str, upstream: torch.Tensor):
    """The read in float64 straight from its definition, w = softmax(β·s(z, M)), r = w @ M,
    with s = −‖z − m‖² (torch.cdist) or cos(z, m); returns (r B×D×H×W, {name: gradient})."""
    z = z.double().clone().requires_grad_(True)
    memory = memory.double().clone().requires_grad_(True)
    log_beta = torch.tensor(beta, dtype=torch.float64).log().requires_grad_(True)
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if similarity == "l2":
        logits = -log_beta.exp() * torch.cdist(x, memory).pow(2)
    else:
        logits = log_beta.exp() * (F.normalize(x, dim=1) @ F.normalize(memory, dim=1).t())
    r = (logits.softmax(1) @ memory).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    (r * upstream.double()).sum().backward()
    return r.detach(), {"z": z.grad, "memory": memory.grad, "log_beta": log_beta.grad}


def assert_as_accurate(fused: torch.Tensor, dense: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """The fused result's error against the float64 answer is within float32 rounding:
    at most 4× the dense float32 result's own error, or 2e-4 of the answer's scale.

    (The dense result is not the reference: for the gradient to log β, a sum of N·K
    terms, its own relative error reaches 1e-3 where the fused one is ten times smaller,
    or, on an AVX-512 Xeon whose attention kernel sums in another order, 10× larger: the
    fused gradient to log β at l2, β = 4 was 1.15e-4 of its value there against 1.2e-5
    for the dense one; float32 sums of N·K = 2·10⁶ terms round at about √(N·K)·6e-8 ≈ 1e-4.)
    """
    scale = float(exact.abs().max())
    fused_error = float((fused.detach().double() - exact).abs().max())
    dense_error = float((dense.detach().double() - exact).abs().max())
    assert dense_error <= 2e-3 * scale, f"{what}: the dense read itself is off ({dense_error:.3g} of {scale:.3g})"
    assert fused_error <= max(4 * dense_error, 2e-4 * scale), (
        f"{what}: fused error {fused_error:.3g} against dense {dense_error:.3g} (scale {scale:.3g})"
    )


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-4) -> None:
    """Elementwise within rtol, with an absolute floor of rtol × the largest |expected|."""
    expected = expected.detach()
    atol = rtol * float(expected.abs().max()) + 1e-7
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol)


def check_soft_read(similarity, beta, z, upstream, dense, fused) -> tuple:
    """Run both reads and compare them, outputs and gradients, against the brute force."""
    dense_out, dense_grads = run(dense, z, upstream)
    fused_out, fused_grads = run(fused, z, upstream)
    exact, exact_grads = brute_force(z, dense.memory.detach(), beta, similarity, upstream)
    assert dense_out.weights is not None
    assert fused_out.weights is None, "the fused path returns no N×K weights"
    assert_as_accurate(fused_out.quantized, dense_out.quantized, exact, "output")
    assert set(fused_grads) == set(exact_grads)
    for name, exact_grad in exact_grads.items():
        assert dense_grads[name] is not None and fused_grads[name] is not None, name
        assert_as_accurate(fused_grads[name], dense_grads[name], exact_grad, f"gradient to {name}")
    return dense_out, fused_out


@pytest.mark.parametrize("similarity,beta", SETTINGS)
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_fused_read_equals_dense(similarity, beta, impl):
    z, memory = make_inputs()
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    dense = make_read(memory, "dense", similarity=similarity, beta_init=beta)
    fused = make_read(memory, impl, similarity=similarity, beta_init=beta, chunk=1000)
    dense_out, fused_out = check_soft_read(similarity, beta, z, upstream, dense, fused)
    # Codes and statistics come from the chunks (1000 does not divide N = 4096).
    assert torch.equal(fused_out.codes, dense_out.codes)
    for key in ("entropy_bits", "max_weight", "confident", "perplexity", "beta"):
        torch.testing.assert_close(fused_out.metrics[key], dense_out.metrics[key], rtol=1e-5, atol=1e-6)


def test_inputs_cover_confident_and_spread_reads():
    """The comparisons above mean something only if the reads are neither all one-hot nor all flat."""
    z, memory = make_inputs()
    for similarity, spread, mixed in (("l2", 0.5, 4.0), ("cosine", 20.0, 80.0)):
        out = make_read(memory, "dense", similarity=similarity, beta_init=spread)(z)
        assert float(out.metrics["entropy_bits"]) > 3.0  # spread over more than 8 slots
        out = make_read(memory, "dense", similarity=similarity, beta_init=mixed)(z)
        assert 0.1 < float(out.metrics["confident"]) < 0.9


def test_small_forced_fused_equals_dense():
    """impl="fused" below the threshold, with a chunk that splits N unevenly."""
    z, memory = make_inputs(seed=3, b=2, k=50, d=5)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    dense, fused = make_read(memory, "dense", beta_init=1.5), make_read(memory, "fused", beta_init=1.5, chunk=7)
    dense_out, fused_out = check_soft_read("l2", 1.5, z, upstream, dense, fused)
    assert torch.equal(fused_out.codes, dense_out.codes)


@pytest.mark.parametrize("similarity", ["l2", "cosine"])
def test_eval_mode_soft_and_hard(similarity):
    """Eval mode reads with ``eval_read``: soft as in training, hard = the argmax slot."""
    z, memory = make_inputs(seed=5)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    beta = 2.0 if similarity == "l2" else 20.0
    for eval_read in ("soft", "hard"):
        dense = make_read(memory, "dense", similarity=similarity, beta_init=beta, eval_read=eval_read).eval()
        fused = make_read(memory, "auto", similarity=similarity, beta_init=beta, eval_read=eval_read, chunk=1000).eval()
        if eval_read == "soft":
            dense_out, fused_out = check_soft_read(similarity, beta, z, upstream, dense, fused)
            assert torch.equal(fused_out.codes, dense_out.codes)
            continue
        dense_out, dense_grads = run(dense, z, upstream)
        fused_out, fused_grads = run(fused, z, upstream)
        assert fused_out.weights is None
        assert torch.equal(fused_out.codes, dense_out.codes)
        # Hard: M_argmax(w), bit for bit, and the gradient reaches only the slots read.
        expected = memory[dense_out.codes].permute(0, 3, 1, 2)
        assert torch.equal(fused_out.quantized, expected)
        assert torch.equal(dense_out.quantized, expected)
        assert fused_grads["z"] is None and dense_grads["z"] is None
        assert_close_scaled(fused_grads["memory"], dense_grads["memory"])
        unread = torch.ones(K, dtype=torch.bool)
        unread[fused_out.codes.unique()] = False
        assert unread.any() and fused_grads["memory"][unread].abs().max() == 0


def test_train_and_eval_read_alike():
    """Training and eval mode give the same soft read on the fused path (no side effects)."""
    z, memory = make_inputs(seed=7)
    read = make_read(memory, "auto", beta_init=1.0)
    train_out = read.train()(z)
    eval_out = read.eval()(z)
    assert train_out.weights is None
    torch.testing.assert_close(train_out.quantized, eval_out.quantized, rtol=0, atol=0)
    assert torch.equal(read.memory.detach(), memory)


def test_soft_write_chunked_equals_dense():
    """write="soft_ema": the chunked write sums (Σ_n w_nk, Σ_n w_nk z_n) equal the dense ones,
    so the slots, counts and sums after one training update agree."""
    z, memory = make_inputs(seed=8)
    kwargs = {"write": "soft_ema", "beta_init": 1.0, "init": "random", "decay": 0.9}
    dense, fused = make_read(memory, "dense", **kwargs), make_read(memory, "auto", chunk=1000, **kwargs)
    dense_out, fused_out = dense.train()(z), fused.train()(z)
    assert fused_out.weights is None
    assert_close_scaled(fused_out.quantized, dense_out.quantized)
    torch.testing.assert_close(fused_out.loss, dense_out.loss, rtol=1e-4, atol=1e-7)
    assert not torch.equal(dense.memory, memory), "the write must have moved the slots"
    for name in ("memory", "cluster_size", "embed_sum"):
        assert_close_scaled(getattr(fused, name), getattr(dense, name))


@pytest.mark.filterwarnings("ignore:.*(kernel|dimension|dimensional).*:UserWarning")
@pytest.mark.parametrize("similarity", ["l2", "cosine"])
def test_fused_read_runs_a_fused_kernel(similarity):
    """With the math kernel switched off, the fused read must still run, forward and backward."""
    z, memory = make_inputs(seed=9, b=4, k=256, d=16)
    read = make_read(memory, "fused", similarity=similarity)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends):
        z = z.clone().requires_grad_(True)
        read(z).quantized.sum().backward()
    assert z.grad is not None and read.memory.grad is not None
