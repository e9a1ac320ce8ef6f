"""Inputs every library user hits, for every registered bottleneck (asked of the registry)."""
from __future__ import annotations

import copy

import pytest
import torch

from memvae.quantizers import REGISTRY, bottleneck_class
from tests.conftest import memory_read, quantiser

K, D = 64, 8
# Variants whose buffers move in training mode, beside each kind's defaults.
EXTRA = {
    "memory_discrete": lambda: memory_read(K, D, temperature="relative", write="hard_ema",
                                                          encoder_gradient="straight_through", reseed_fraction=0.25),
    "vq_ema_reseed": lambda: bottleneck_class("vq_ema")(K, D, reseed_fraction=0.25),
    "memory_top_k": lambda: memory_read(K, D, top_k=8, write="soft_ema", encoder_gradient="straight_through"),
}
MAKERS = {**{kind: (lambda kind=kind: quantiser(kind, K, D)) for kind in REGISTRY}, **EXTRA}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("shape", [(2, D + 1, 4, 4), (2, 16, D - 1)])
def test_a_wrong_feature_width_fails_naming_both_widths(name, shape):
    with pytest.raises(ValueError, match=rf"width D = {D}; .* has D = {shape[1] if len(shape) == 4 else shape[2]}$"):
        MAKERS[name]()(torch.randn(*shape))


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("shape", [(0, D, 4, 4), (3, 0, D)])
def test_an_empty_batch_is_a_no_op_in_training_mode(name, shape):
    bottleneck = MAKERS[name]().train()
    bottleneck(torch.randn(4, D, 4, 4))  # past any data initialisation
    before = {k: v.clone() for k, v in bottleneck.state_dict().items()}
    z = torch.randn(*shape)
    out = bottleneck(z)
    assert out.quantized.shape == z.shape and float(out.loss) == 0.0
    for key, value in bottleneck.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("autocast", [False, True])
def test_the_output_has_the_inputs_dtype(name, autocast):
    bottleneck = MAKERS[name]().train()
    z = torch.randn(2, D, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = bottleneck(z)
    assert out.quantized.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_masked_batch_moves_everything_as_the_batch_without_its_padding(name):
    torch.manual_seed(0)
    masked, alone = MAKERS[name]().train(), None
    alone = copy.deepcopy(masked)
    for call in range(3):  # the first call initialises from data: from the real positions only
        z = torch.randn(3, 10, D, requires_grad=True)
        mask = torch.rand(3, 10) > 0.3
        torch.manual_seed(call)
        out = masked(z, mask)
        torch.manual_seed(call)
        ref = alone(z.detach()[mask].unsqueeze(0))
        assert torch.equal(out.quantized[mask], ref.quantized[0])
        assert torch.equal(out.quantized[~mask], z[~mask])  # padding comes back unchanged
        assert torch.equal(out.loss, ref.loss)
        assert out.metrics.keys() == ref.metrics.keys()
        for key in out.metrics:
            assert torch.equal(out.metrics[key], ref.metrics[key]), key
        if ref.codes is not None:
            assert torch.equal(out.codes[mask], ref.codes[0]) and bool((out.codes[~mask] == -1).all())
        if ref.weights is not None:
            assert torch.equal(out.weights[mask], ref.weights[0]) and not out.weights[~mask].any()
        out.quantized.sum().backward()
        assert torch.equal(z.grad[~mask], torch.ones_like(z.grad[~mask]))  # straight through the padding
        for (key, value), other in zip(masked.state_dict().items(), alone.state_dict().values()):
            assert torch.equal(value, other), key


@pytest.mark.parametrize("z, mask, said", [
    (torch.randn(2, D, 4, 4), torch.ones(2, 16, dtype=torch.bool), "a mask is for B×N×D sequences"),
    (torch.randn(2, 5, D), torch.ones(2, 4, dtype=torch.bool), r"mask must be B×N booleans of shape \(2, 5\)"),
    (torch.randn(2, 5, D), torch.ones(2, 5), "mask must be B×N booleans"),
])
def test_a_wrong_mask_fails_in_one_line(z, mask, said):
    with pytest.raises(ValueError, match=said):
        MAKERS["vq_ema"]()(z, mask)
