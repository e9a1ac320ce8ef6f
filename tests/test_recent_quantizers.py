"""SimVQ, IBQ and LFQ/BSQ (issue 34), each checked against a brute-force recomputation of
its paper's equations on small inputs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from memvae.config import schema as C
from memvae.quantizers import IBQ, LFQ, SimVQ, bottleneck_class
from memvae.quantizers import functional as Fn
from memvae.errors import MemvaeError
from tests.conftest import CONFIGS

D = 6
# name -> a small instance (K = 16 codes, so that the 2^L codes can be enumerated)
MAKERS = {
    "simvq": lambda: SimVQ(16, D),
    "ibq": lambda: IBQ(16, D),
    "lfq": lambda: LFQ(16, D),
    "bsq": lambda: LFQ(16, D, spherical=True, commitment=0.0, entropy_temperature=1.0),
}


def positions(z: torch.Tensor) -> torch.Tensor:
    """B×D×H×W -> (B·H·W)×D by loops, in the order B, H, W."""
    b, _, h, w = z.shape
    return torch.stack([z[i, :, y, x] for i in range(b) for y in range(h) for x in range(w)])


def direct_entropies(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_n H(p_n), H(mean_n p_n)) in nats, p_n = softmax(logits_n), term by term."""
    p = torch.softmax(logits, 1)
    per_sample = torch.stack([-sum(pk * torch.log(pk) for pk in row if pk > 0) for row in p]).mean()
    mean = p.mean(0)
    return per_sample, -sum(pk * torch.log(pk) for pk in mean if pk > 0)


# ---------------------------------------------------------------- SimVQ
def test_simvq_reads_the_nearest_code_of_the_projected_codebook():
    q = SimVQ(16, D, commitment=0.25)
    z = torch.randn(2, D, 3, 3)
    out = q(z)
    with torch.no_grad():
        codebook = q.basis @ q.project.weight.t() + q.project.bias  # C Wᵀ + b
    rows = positions(z)
    expected = torch.tensor([min(range(16), key=lambda k: float(((row - codebook[k]) ** 2).sum())) for row in rows])
    assert torch.equal(out.codes.reshape(-1), expected)
    assert torch.allclose(positions(out.quantized), codebook[expected], atol=1e-6)
    chosen = codebook[expected]
    assert torch.allclose(out.loss, 1.25 * ((rows - chosen) ** 2).mean(), atol=1e-6)  # ‖sg(z) − q‖² + β‖z − sg(q)‖²


def test_simvq_loss_gradients_follow_its_two_terms_by_hand():
    """The loss alone: W and b get ∇ of ‖Q_i − sg(z)‖² (weight 1), z gets 2β(z − Q_i)/(N·D)
    (β = 0.25); the two terms have equal values, so only the gradients show their weights."""
    torch.manual_seed(4)
    q = SimVQ(16, D)
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    x = positions(z.detach())
    codebook = q.basis @ q.project.weight.t() + q.project.bias
    read = codebook[out.codes.reshape(-1)]
    want_w, want_b = torch.autograd.grad(((read - x) ** 2).mean(), [q.project.weight, q.project.bias])
    assert torch.allclose(q.project.weight.grad, want_w, rtol=1e-5, atol=1e-8)
    assert torch.allclose(q.project.bias.grad, want_b, rtol=1e-5, atol=1e-8)
    assert torch.allclose(positions(z.grad), 2 * 0.25 * (x - read.detach()) / x.numel(), rtol=1e-5, atol=1e-8)


def test_simvq_basis_is_frozen_and_the_map_is_learned():
    q = SimVQ(16, D).train()
    assert "basis" in dict(q.named_buffers()) and all("basis" not in name for name, _ in q.named_parameters())
    basis, weight = q.basis.clone(), q.project.weight.detach().clone()
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(3):
        out = q(torch.randn(2, D, 3, 3))
        optimizer.zero_grad()
        (out.quantized.square().sum() + out.loss).backward()
        assert q.basis.grad is None and q.project.weight.grad.abs().sum() > 0 and q.project.bias.grad.abs().sum() > 0
        optimizer.step()
    assert torch.equal(q.basis, basis) and not torch.allclose(q.project.weight, weight)
    assert "basis" in q.state_dict()  # saved with the model: a resumed run keeps its basis


def test_simvq_moves_every_code_with_one_update():
    """A step on W moves codes no position chose, unlike VQ-VAE's codebook."""
    q = SimVQ(16, D).train()
    before = q.codebook.detach().clone()
    out = q(torch.randn(1, D, 1, 1))  # one position: one code chosen
    optimizer = torch.optim.SGD(q.parameters(), lr=0.1)
    out.loss.backward()
    optimizer.step()
    moved = (q.codebook.detach() - before).norm(dim=1) > 0
    assert int(moved.sum()) == 16


# ---------------------------------------------------------------- IBQ
def ibq_direct_loss(q: IBQ, z: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """The IBQ update's loss by the paper's formula, one-hot straight-through written out:
    ind = h − sg(s) + s, z_q = ind C, plus the double quantisation and entropy terms."""
    rows = positions(z)
    codebook = q.memory
    logits = rows @ codebook.t()
    soft = torch.softmax(logits, 1)
    hard = F.one_hot(logits.argmax(1), q.codebook_size).float()
    z_q = (hard - soft.detach() + soft) @ codebook
    z_hat = hard @ codebook
    loss = ((z_q - rows) ** 2).mean() + ((z_hat.detach() - rows) ** 2).mean() + 0.25 * ((z_hat - rows.detach()) ** 2).mean()
    per_sample, spread = direct_entropies(logits / q.entropy_temperature)
    loss = loss + q.entropy_penalty * (per_sample - spread)
    return (z_q * upstream).sum() + loss


def test_ibq_forward_is_the_argmax_code_of_the_dot_products():
    q = IBQ(16, D)
    z = torch.randn(2, D, 3, 3)
    out = q(z)
    rows, codebook = positions(z), q.memory.detach()
    expected = torch.tensor([max(range(16), key=lambda k: float(row @ codebook[k])) for row in rows])
    assert torch.equal(out.codes.reshape(-1), expected)
    assert torch.equal(positions(out.quantized), codebook[expected])  # exactly the code's vector


def test_ibq_gradients_are_those_of_the_softmax_read_through_the_one_hot():
    torch.manual_seed(3)
    q = IBQ(16, D).train()
    q.memory.data.mul_(0.3)  # softmax weights spread over several codes: every code's gradient matters
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    upstream = torch.randn(18, D)
    out = q(z)
    (((positions(out.quantized) * upstream).sum()) + out.loss).backward()
    ours = z.grad.clone(), q.memory.grad.clone()
    z.grad, q.memory.grad = None, None
    ibq_direct_loss(q, z, upstream).backward()
    assert torch.allclose(ours[0], z.grad, atol=1e-5)
    assert torch.allclose(ours[1], q.memory.grad, atol=1e-5)
    assert bool((q.memory.grad.norm(dim=1) > 0).all())  # every code trained, chosen or not


# ---------------------------------------------------------------- LFQ and BSQ
@pytest.mark.parametrize("spherical", [False, True])
def test_lfq_code_is_the_sign_pattern_of_the_projection(spherical):
    q = LFQ(16, D, spherical=spherical).eval()
    z = torch.randn(2, D, 3, 3)
    out = q(z)
    with torch.no_grad():
        v = positions(z) @ q.project_in.weight.t() + q.project_in.bias
        if spherical:
            v = v / v.norm(dim=1, keepdim=True)
    expected = torch.tensor([sum(2 ** j for j in range(4) if row[j] > 0) for row in v])
    assert torch.equal(out.codes.reshape(-1), expected)
    scale = 0.5 if spherical else 1.0  # 1/√L, L = 4
    signs = torch.where(v > 0, scale, -scale)
    with torch.no_grad():
        assert torch.allclose(positions(out.quantized), q.project_out(signs), atol=1e-6)
    if spherical:
        assert torch.allclose(signs.norm(dim=1), torch.ones(18))  # every BSQ code on the unit sphere


@pytest.mark.parametrize("spherical, tau", [(False, 0.01), (False, 0.5), (True, 1.0)])
def test_lfq_entropy_penalty_matches_the_sum_over_all_codes(spherical, tau):
    """p_n(c) = softmax over all 2^L codes of −‖v_n − c‖²/τ, built code by code from its bits."""
    torch.manual_seed(4)
    q = LFQ(16, D, spherical=spherical, commitment=0.0, entropy_penalty=0.3, entropy_temperature=tau).train()
    z = torch.randn(3, D, 2, 2, requires_grad=True)
    out = q(z)
    out.loss.backward()
    ours = z.grad.clone(), q.project_in.weight.grad.clone()
    z.grad = None
    q.zero_grad()
    # In float64: at τ = 0.01 the logits are 200·v·c, and float32 rounding alone moves the
    # gradients by ~1e-5 relative to their largest.
    v = positions(z).double() @ q.project_in.weight.double().t() + q.project_in.bias.double()
    if spherical:
        v = v / v.norm(dim=1, keepdim=True)
    scale = 0.5 if spherical else 1.0
    codes = torch.tensor(list(itertools.product([-scale, scale], repeat=4)), dtype=torch.float64)  # every sign pattern
    logits = -torch.cdist(v, codes) ** 2 / tau
    per_sample, spread = direct_entropies(logits)
    expected = 0.3 * (per_sample - spread)
    assert torch.allclose(out.loss.double(), expected, atol=1e-5)
    expected.backward()
    for mine, direct in zip(ours, (z.grad, q.project_in.weight.grad)):
        assert torch.allclose(mine, direct, atol=1e-5 * float(direct.abs().max()), rtol=1e-4)


def test_code_entropies_of_one_code_and_of_all_codes():
    sure = torch.full((4, 8), -1e4)
    sure[:, 2] = 0.0
    per_sample, spread = Fn.code_entropies(sure)
    assert float(per_sample) == pytest.approx(0.0, abs=1e-6) and float(spread) == pytest.approx(0.0, abs=1e-6)
    per_sample, spread = Fn.code_entropies(torch.zeros(4, 8))
    assert float(per_sample) == pytest.approx(math.log(8)) and float(spread) == pytest.approx(math.log(8))


def test_lfq_takes_only_a_power_of_two_codes():
    with pytest.raises(ValueError, match="power of two"):
        LFQ(500, D)
    b = C.load_config(CONFIGS / "lfq.toml").bottleneck
    with pytest.raises(ValueError, match="K = 500 is no power of two"):
        LFQ.at_slots(b, 500)
    assert LFQ.at_slots(b, 4096).slots == 4096
    with pytest.raises(MemvaeError, match="bottleneck.slots' must be a power of two"):
        C.load_config(CONFIGS / "lfq.toml", ["bottleneck.slots=500"])


# ---------------------------------------------------------------- all three
@pytest.mark.parametrize("name", list(MAKERS))
def test_decode_codes_gives_what_the_decoder_received(name):
    q = MAKERS[name]()
    q.train()(torch.randn(2, D, 3, 3))  # one training update's forward first
    q.eval()
    for z in (torch.randn(2, D, 3, 3), torch.randn(2, 7, D)):
        out = q(z)
        assert torch.allclose(q.decode_codes(out.codes), out.quantized, atol=1e-6)
    assert q.codebook.shape == (16, D) and q.bits_per_position == 4.0
    assert torch.allclose(q.decode_codes(torch.arange(16).view(1, 16)), q.codebook.unsqueeze(0), atol=1e-6)


@pytest.mark.parametrize("name", list(MAKERS))
def test_sequences_read_as_the_same_maps(name):
    first = MAKERS[name]().train()
    second = MAKERS[name]().train()
    second.load_state_dict(first.state_dict())
    z_map = torch.randn(3, D, 4, 5, requires_grad=True)
    z_seq = z_map.detach().permute(0, 2, 3, 1).reshape(3, 20, D).requires_grad_(True)
    a, b = first(z_map), second(z_seq)
    for out in (a, b):
        ((out.quantized ** 2).sum() + out.loss).backward()
    assert torch.allclose(a.quantized.permute(0, 2, 3, 1).reshape(3, 20, D), b.quantized, atol=1e-6)
    assert torch.equal(a.codes.reshape(3, 20), b.codes) and torch.allclose(a.loss, b.loss, atol=1e-6)
    assert torch.allclose(z_map.grad.permute(0, 2, 3, 1).reshape(3, 20, D), z_seq.grad, atol=1e-6)


@pytest.mark.parametrize("name", ["simvq", "ibq", "lfq", "bsq"])
def test_packaged_configs_build_at_512_codes_and_take_the_sweeps_codebook_sizes(name):
    from memvae.networks.autoencoder import Autoencoder

    cfg = C.load_config(CONFIGS / f"{name}.toml")
    model = Autoencoder.from_config(cfg)
    assert model.bottleneck.codebook_size == 512 and model.bottleneck.bits_per_position == 9.0
    cls = bottleneck_class(cfg.bottleneck.kind)
    for k in (64, 512, 4096):
        b = cls.at_slots(cfg.bottleneck, k)
        b.check()
        assert cls.from_config(b, 8).codebook_size == k


# ---------------------------------------------------------------- two processes
def _ddp_gradients(rank: int, world: int, init: str, path: str) -> None:
    """One update's gradients of each entropy-penalised quantiser under DDP on rank ``rank``'s
    share (images rank, rank + world, ...) of one batch, saved by rank 0."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    grads = {}
    for name in ("ibq", "lfq", "bsq"):
        torch.manual_seed(0)
        module = torch.nn.parallel.DistributedDataParallel(MAKERS[name]().train())
        z = torch.randn(4, D, 3, 3, generator=torch.Generator().manual_seed(1))[rank::world]
        upstream = torch.randn(4, D, 3, 3, generator=torch.Generator().manual_seed(2))[rank::world]
        out = module(z)
        ((out.quantized * upstream).mean() + out.loss).backward()
        grads[name] = {k: p.grad.clone() for k, p in module.module.named_parameters()}
    if rank == 0:
        torch.save(grads, path)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_compute_one_processs_entropy_penalty_gradients(tmp_path):
    """The codebook entropy averages the code distribution over the global batch: DDP on two
    halves gives the gradients of one process on the whole batch."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_ddp_gradients, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2)
    ddp = torch.load(out)
    for name in ("ibq", "lfq", "bsq"):
        torch.manual_seed(0)
        module = MAKERS[name]().train()
        z = torch.randn(4, D, 3, 3, generator=torch.Generator().manual_seed(1))
        upstream = torch.randn(4, D, 3, 3, generator=torch.Generator().manual_seed(2))
        read = module(z)
        ((read.quantized * upstream).mean() + read.loss).backward()
        for key, param in module.named_parameters():
            assert torch.allclose(ddp[name][key], param.grad, atol=1e-6, rtol=1e-5), (name, key)
