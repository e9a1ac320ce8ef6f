"""One face for every quantiser: the same argument names, a ``codebook``, ``bits_per_position``
and ``eval_read`` on each, checked over the registry (a new quantiser joins by registering)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from memvae.quantizers import REGISTRY, bottleneck_class
from tests.conftest import memory_read, quantiser

K, D = 16, 8
SHAPE_NAMES = {"fsq": ("levels", "dim"), "none": ("dim",)}  # FSQ's K is the product of its levels


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_constructors_name_their_arguments_alike(kind):
    params = list(inspect.signature(bottleneck_class(kind).__init__).parameters)[1:]
    first = SHAPE_NAMES.get(kind, ("codebook_size", "dim"))
    assert tuple(params[: len(first)]) == first
    if "init" in params:  # every quantiser that learns slots starts them from data by default
        assert inspect.signature(bottleneck_class(kind).__init__).parameters["init"].default == "data"
    for old in ("num_slots", "read_mode", "slots"):
        assert old not in params


@pytest.mark.parametrize("kind", sorted(set(REGISTRY) - {"none"}))
def test_codebook_bits_and_codes_agree(kind):
    torch.manual_seed(0)
    q = quantiser(kind, K, D).eval()
    codebook = q.codebook
    stages = q.stages if kind == "residual_vq" else 1
    assert tuple(codebook.shape) == ((stages, K, D) if kind == "residual_vq" else (K, D))
    assert q.codebook_size == K
    # A mixture's code: k slot indices and one of C(L + k − 1, k − 1) grid points.
    bits = (q.k * math.log2(K) + math.log2(math.comb(q.levels + q.k - 1, q.k - 1)) if kind == "mixture"
            else stages * math.log2(K))
    assert q.bits_per_position == pytest.approx(bits)
    assert q.eval_read in q.reads
    z = torch.randn(2, D, 3, 3)
    with torch.no_grad():
        out = q(z)
        if q.discrete and kind not in ("mixture", "residual_vq"):  # one code, one codebook row
            rows = codebook[out.codes.reshape(-1)]
            assert torch.allclose(rows, out.quantized.permute(0, 2, 3, 1).reshape(-1, D), atol=1e-5)
        if q.discrete:
            assert torch.allclose(q.decode_codes(out.codes), out.quantized, atol=1e-5)


def test_the_continuous_control_has_no_rate_and_an_empty_codebook():
    q = quantiser("none", K, D)
    assert q.bits_per_position == math.inf and tuple(q.codebook.shape) == (0, D) and not q.discrete


def test_the_eval_read_is_one_name_and_checked():
    q = quantiser("memory", K, D).eval()
    assert q.eval_read == "soft" and not q.discrete
    q.eval_read = "hard"
    assert q.discrete
    with pytest.raises(ValueError, match="reads soft, hard, not 'nearest'"):
        q.eval_read = "nearest"
    vq = quantiser("vq", K, D)
    with pytest.raises(ValueError, match="reads nearest"):
        vq.eval_read = "soft"


# ---------------------------------------------------------------- straight-through reads
# Every quantiser whose decoder input is z + sg(read − z), built to read that way.
STRAIGHT_THROUGH = {
    "vq": lambda: quantiser("vq", K, D),
    "vq_ema": lambda: quantiser("vq_ema", K, D, init="random"),
    "simvq": lambda: quantiser("simvq", K, D),
    "residual_vq": lambda: quantiser("residual_vq", K, D, init="random"),
    "memory_straight_through": lambda: memory_read(K, D, write="hard_ema", encoder_gradient="straight_through",
                                                   init="random"),
    "mixture_pursuit_gradient": lambda: quantiser("mixture", K, D, way="pursuit", write="gradient", reseed_fraction=0.0),
    "mixture_pursuit_ema": lambda: quantiser("mixture", K, D, way="pursuit", write="ema", init="random"),
}


def _hand_read(name: str, q, codes: torch.Tensor) -> torch.Tensor:
    """The decoder input of N codes, written out here from the learned tensors (with their
    graph): VQ's slot, SimVQ's projected basis row, the mixture's Σ_j (n_j/L) M_{s_j}."""
    if name == "vq":
        return q.memory[codes]
    if name == "simvq":
        return (q.basis @ q.project.weight.t() + q.project.bias)[codes]
    weights = q.grid[codes[:, q.k]].float() / q.levels
    return sum(weights[:, j:j + 1] * q.memory[codes[:, j]] for j in range(q.k))


@pytest.mark.parametrize("name", sorted(STRAIGHT_THROUGH))
def test_a_straight_through_read_gives_z_the_upstream_gradient_exactly_and_the_codebook_none_of_it(name):
    torch.manual_seed(1)
    q = STRAIGHT_THROUGH[name]().train()
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    for key, param in q.named_parameters():
        assert param.grad is None or not param.grad.any(), f"{key} got the decoder's gradient through the read"


@pytest.mark.parametrize("name", ["vq", "simvq", "mixture_pursuit_gradient"])
def test_the_codebook_gradient_is_that_of_its_codebook_loss_alone(name):
    """Decoder gradient and loss together: the codebook's gradient is ∇ mse(read(codes), sg(z))
    (its codebook term, weight 1) and z's is the upstream gradient plus the commitment term
    2β(z − read)/(N·D), both computed here from the codes."""
    torch.manual_seed(2)
    q = STRAIGHT_THROUGH[name]().train()
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(z)
    ((out.quantized * upstream).sum() + out.loss).backward()
    params = [p for p in q.parameters() if p.requires_grad]
    x = z.detach().permute(0, 2, 3, 1).reshape(-1, D)
    codes = out.codes.reshape(x.shape[0], -1).squeeze(1)
    read = _hand_read(name, q, codes)
    by_hand = torch.autograd.grad(((read - x) ** 2).mean(), params)
    for param, want in zip(params, by_hand):
        assert torch.allclose(param.grad, want, rtol=1e-5, atol=1e-7), name
    commitment = 2 * q.commitment * (x - read.detach()) / x.numel()
    got = z.grad.permute(0, 2, 3, 1).reshape(-1, D)
    assert torch.allclose(got, upstream.permute(0, 2, 3, 1).reshape(-1, D) + commitment, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["fsq", "lfq", "bsq"])
def test_rounding_inside_a_projection_passes_the_gradient_of_the_unrounded_path(name):
    """FSQ rounds and LFQ/BSQ take signs between two linear maps, straight through: z's
    gradient is that of the same maps with the rounding left out."""
    torch.manual_seed(3)
    q = (quantiser("lfq", K, D, spherical=name == "bsq") if name != "fsq" else quantiser("fsq", K, D)).eval()
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    upstream = torch.randn_like(z)
    (q(z).quantized * upstream).sum().backward()
    x = z.permute(0, 2, 3, 1).reshape(-1, D)
    if name == "fsq":
        unrounded = q.project_out(q.bound(q.project_in(x)) / q.half_width)
    else:
        v = q.project_in(x)
        unrounded = q.project_out(torch.nn.functional.normalize(v, dim=1) if name == "bsq" else v)
    want = torch.autograd.grad((unrounded * upstream.permute(0, 2, 3, 1).reshape(-1, D)).sum(), z)[0]
    assert torch.allclose(z.grad, want, rtol=1e-5, atol=1e-7)
