"""One face for every quantiser: the same argument names, a ``codebook``, ``bits_per_position``
and ``eval_read`` on each, checked over the registry (a new quantiser joins by registering)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from memvae.quantizers import REGISTRY, bottleneck_class
from tests.conftest import quantiser

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
