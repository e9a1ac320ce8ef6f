"""The discrete memory (relative temperature, τ schedule, moving-average writes, re-seeding),
FSQ, and the shared statistics they rest on, each checked against a direct recomputation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memvae.quantizers import FSQ, REGISTRY, MemoryRead, VectorQuantizerEMA
from memvae.quantizers import functional as Fn
from memvae.config.schema import load_config
from memvae.training.metrics import read_metrics
from memvae.training.runs import load_run
from memvae.training.train import train

from tests.cli_util import strip_times
from tests.conftest import CONFIGS, memory_read, quantiser

K, D = 32, 8


def discrete(**kw) -> MemoryRead:
    options = dict(temperature="relative", write="hard_ema", encoder_gradient="straight_through", eval_read="hard",
                   tau_start=1.0, tau_end=0.02)
    return memory_read(K, D, **{**options, **kw})


# ---------------------------------------------------------------- statistics without one-hot
def test_assignment_sums_equal_the_one_hot_ones():
    x = torch.randn(500, D, dtype=torch.float64)
    codes = torch.randint(K, (500,))
    counts, sums = Fn.assignment_sums(codes, x, K)
    one_hot = F.one_hot(codes, K).double()
    assert torch.allclose(counts.double(), one_hot.sum(0))
    assert torch.allclose(sums.double(), one_hot.t() @ x, atol=1e-5)


def test_nearest_distances_match_brute_force_in_any_chunking():
    x, memory = torch.randn(300, D), torch.randn(K, D)
    brute = torch.cdist(x.double(), memory.double()).pow(2)
    for max_elements in (K, 7 * K, 1 << 22):
        idx, dist = Fn.nearest_distances(x, memory, max_elements)
        assert torch.equal(idx, brute.argmin(1))
        assert torch.allclose(dist.double(), brute.min(1).values, atol=1e-4)


def test_vq_ema_write_equals_the_one_hot_write():
    """The EMA update of vq_ema (bincount/index_add_) equals the dense one-hot version in float64."""
    torch.manual_seed(1)
    vq = VectorQuantizerEMA(K, D, init="random").double().train()
    memory, size, total = vq.memory.clone(), vq.cluster_size.clone(), vq.embed_sum.clone()
    z = torch.randn(4, D, 6, 6, dtype=torch.float64)
    x = Fn.flatten_positions(z)
    one_hot = F.one_hot(torch.cdist(x, memory).argmin(1), K).double()
    vq(z)
    size = 0.99 * size + 0.01 * one_hot.sum(0)
    total = 0.99 * total + 0.01 * one_hot.t() @ x
    smoothed = (size + 1e-5) / (size.sum() + K * 1e-5) * size.sum()
    assert torch.allclose(vq.memory.double(), total / smoothed[:, None], atol=1e-5)


# ---------------------------------------------------------------- relative temperature
def test_relative_temperature_weights_do_not_change_when_z_and_memory_scale_alike():
    z = torch.randn(2, D, 4, 4)
    weights = []
    for scale in (1.0, 37.0):
        read = discrete(eval_read="soft", train_read="soft").train()
        with torch.no_grad():
            read.memory.copy_(torch.randn(K, D, generator=torch.Generator().manual_seed(3)) * scale)
        read.initialized.fill_(True)
        out = read(z * scale)
        weights.append(out.weights)
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_q_bar_is_the_moving_average_of_the_nearest_distance():
    read = discrete().train()
    read.initialized.fill_(True)
    z1, z2 = torch.randn(2, D, 4, 4), torch.randn(2, D, 4, 4)
    first = torch.cdist(Fn.flatten_positions(z1), read.memory).pow(2).min(1).values.mean()
    read(z1)
    assert float(read.distortion) == pytest.approx(float(first), rel=1e-5)  # the first batch sets q̄
    memory = read.memory.clone()
    read(z2)
    second = torch.cdist(Fn.flatten_positions(z2), memory).pow(2).min(1).values.mean()
    assert float(read.distortion) == pytest.approx(0.99 * float(first) + 0.01 * float(second), rel=1e-5)
    assert float(read.beta()) == pytest.approx(1.0 / (float(read.tau()) * float(read.distortion)), rel=1e-6)


def test_tau_schedule_is_geometric_over_its_updates_then_held():
    read = discrete(tau_start=1.0, tau_end=0.01, tau_anneal_updates=100)
    for updates, expected in ((0, 1.0), (50, 0.1), (100, 0.01), (700, 0.01)):
        read.updates.fill_(updates)
        assert float(read.tau()) == pytest.approx(expected)


def test_tau_advances_in_a_plain_training_loop_with_nothing_to_call():
    """A library user's own loop: τ reaches its end after tau_anneal training forwards;
    evaluation forwards do not move it."""
    read = discrete(tau_start=1.0, tau_end=0.01, tau_anneal_updates=20).train()
    for _ in range(10):
        read(torch.randn(2, D, 4, 4))
    assert float(read.tau()) == pytest.approx(0.1)
    read.eval()
    read(torch.randn(2, D, 4, 4))
    assert int(read.updates) == 10
    read.train()
    for _ in range(15):
        read(torch.randn(2, D, 4, 4))
    assert float(read.tau()) == pytest.approx(0.01)


def test_as_tau_goes_to_zero_the_soft_read_is_the_hard_read():
    torch.manual_seed(2)
    z = torch.randn(3, D, 4, 4)
    read = discrete(tau_start=1.0, tau_end=1e-6, train_read="soft", write="hard_ema").train()
    read.initialized.fill_(True)
    read.updates.fill_(read.addressing.temperature.anneal)
    memory = read.memory.clone()
    trained = read(z).quantized
    hard = memory[torch.cdist(Fn.flatten_positions(z), memory).argmin(1)]
    assert torch.allclose(Fn.flatten_positions(trained), hard, atol=1e-5)


def test_hard_read_at_test_equals_the_last_training_reads():
    """Trained with τ ending near 0, the training read of a batch and the evaluation read of
    the same batch (with the slots as they were) give the decoder the same vectors."""
    torch.manual_seed(4)
    read = discrete(tau_start=1.0, tau_end=1e-6).train()
    z = torch.randn(4, D, 4, 4)
    for step in range(10):
        read(torch.randn(4, D, 4, 4))
    read.updates.fill_(read.addressing.temperature.anneal)
    before = read.memory.clone()
    trained = read(z).quantized
    after = read.memory.clone()
    read.memory.copy_(before)
    evaluated = read.eval()(z).quantized
    read.memory.copy_(after)
    assert torch.allclose(trained, evaluated, atol=1e-5)


def test_straight_through_gives_z_the_decoder_gradient_unchanged():
    read = discrete(train_read="soft").train()
    z = torch.randn(2, D, 4, 4, requires_grad=True)
    out = read(z)
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_rotation_trick_forwards_the_target_and_rotates_the_gradient():
    torch.manual_seed(8)
    z = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, D, dtype=torch.float64)
    out = Fn.rotation_trick(z, target)
    assert torch.equal(out, target)
    upstream = torch.randn(5, D, dtype=torch.float64)
    (out * upstream).sum().backward()
    for i in range(5):  # λ Rᵀ g with R built as a matrix, row by row
        zi, ti = z[i].detach(), target[i]
        e, q = zi / zi.norm(), ti / ti.norm()
        r = (e + q) / (e + q).norm()
        rotation = torch.eye(D, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(q, e)
        assert torch.allclose(rotation @ e, q)
        assert torch.allclose(z.grad[i], ti.norm() / zi.norm() * rotation.t() @ upstream[i])


def test_straight_through_without_a_moving_average_write_is_refused():
    with pytest.raises(ValueError, match="moving-average write"):
        memory_read(K, D, encoder_gradient="straight_through")


# ---------------------------------------------------------------- re-seeding
def test_reseeding_replaces_exactly_the_dead_slots_with_batch_vectors():
    memory, size, total = torch.randn(K, D), torch.full((K,), 5.0), torch.randn(K, D)
    size[[3, 7]] = 0.1
    x = torch.randn(100, D)
    distances = torch.cdist(x, memory).pow(2).min(1).values
    old = memory.clone()
    Fn.reseed_dead_slots(memory, size, total, x, distances, threshold=1.0)
    alive = torch.ones(K, dtype=torch.bool)
    alive[[3, 7]] = False
    assert torch.equal(memory[alive], old[alive])
    for k in (3, 7):
        assert (x == memory[k]).all(1).any()  # a vector of the batch
        assert size[k] == 1.0 and torch.allclose(total[k], memory[k])


@pytest.mark.parametrize("config", ["vq_ema_reseed", "memory_discrete"])
def test_reseeding_revives_unused_slots_in_a_real_run(config, tmp_path, cifar):
    """Slots start at N(0, 1), far from the encoder's outputs: without re-seeding few are
    ever read; with it, the slots in use rise."""
    used = {}
    for threshold in (0.0, 0.03125):  # 0.03125 of N/K = 2,048/64: a count of 1
        cfg = load_config(CONFIGS / f"{config}.toml", [
            "train.steps=60", "train.threads=1", "train.log_every=60", "train.eval_every=60", "train.checkpoint_every=60",
            "data.eval_images=300", "model.hidden=32", "model.res_hidden=8", "model.res_blocks=1",
            "bottleneck.slots=64", "bottleneck.init=random", f"bottleneck.reseed_fraction={threshold}",
        ])
        train(cfg, tmp_path / f"t{threshold}", data=cifar, show_progress=False)
        used[threshold] = [r for r in read_metrics(tmp_path / f"t{threshold}", "eval")][-1]["eval_slots_used"]
    assert used[0.03125] > 2 * used[0.0], used


# ---------------------------------------------------------------- FSQ
def test_fsq_codes_are_the_rounded_bounded_values():
    fsq = FSQ(levels=(8, 8, 8), dim=D)
    z = torch.randn(5, D, 4, 4) * 3
    out = fsq(z)
    bounded = fsq.bound(fsq.project_in(Fn.flatten_positions(z)))
    digits = torch.round(bounded) + 4  # levels −4..3 -> digits 0..7
    assert digits.min() >= 0 and digits.max() <= 7
    expected = (digits[:, 0] + 8 * digits[:, 1] + 64 * digits[:, 2]).long()
    assert torch.equal(out.codes.reshape(-1), expected)
    # The decoder receives the decoded codes exactly.
    assert torch.allclose(out.quantized, fsq.decode_codes(out.codes), atol=1e-6)


def test_fsq_reaches_all_512_codes_and_odd_levels_work():
    fsq = FSQ(levels=(8, 8, 8), dim=3)
    with torch.no_grad():
        fsq.project_in.weight.copy_(torch.eye(3))
        fsq.project_in.bias.zero_()
    grid = torch.linspace(-3, 3, 40)
    z = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij")).reshape(1, 3, 400, 160)  # a 3-channel map
    codes = fsq(z).codes
    assert codes.unique().numel() == 512
    odd = FSQ(levels=(5, 5, 3), dim=3)
    assert odd.grid(torch.arange(75)).unique(dim=0).shape[0] == 75


def test_fsq_gradient_reaches_z():
    fsq = FSQ(levels=(8, 8, 8), dim=D)
    z = torch.randn(2, D, 4, 4, requires_grad=True)
    fsq(z).quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# ---------------------------------------------------------------- sequences (B×N×D)
VARIANTS = {  # every registered bottleneck at its defaults, and the variants that read or write differently
    **{kind: (lambda kind=kind: quantiser(kind, K, D)) for kind in REGISTRY if kind != "fsq"},
    "vq_ema_reseed": lambda: VectorQuantizerEMA(K, D, reseed_fraction=0.25),
    "memory": lambda: memory_read(K, D),
    "memory_fused": lambda: memory_read(K, D, impl="fused"),
    "memory_cosine": lambda: memory_read(K, D, similarity="cosine"),
    "memory_discrete": lambda: discrete(train_read="soft", reseed_fraction=0.25),
    "fsq": lambda: FSQ(levels=(4, 4, 4), dim=D),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sequences_and_maps_give_the_same_reads_losses_and_gradients(name):
    """B×N×D and the same data as B×D×H×W: same quantized, codes, loss, gradients, state."""
    torch.manual_seed(5)
    first = VARIANTS[name]().train()
    second = VARIANTS[name]().train()
    second.load_state_dict(first.state_dict())
    z_map = torch.randn(3, D, 4, 5, requires_grad=True)
    z_seq = z_map.detach().permute(0, 2, 3, 1).reshape(3, 20, D).requires_grad_(True)
    outs = []
    for module, z in ((first, z_map), (second, z_seq)):
        torch.manual_seed(6)  # the same random draws (re-seeding) on both sides
        out = module(z)
        ((out.quantized ** 2).sum() + out.loss).backward()
        outs.append(out)
    a, b = outs
    assert b.quantized.shape == (3, 20, D)
    assert torch.allclose(a.quantized.permute(0, 2, 3, 1).reshape(3, 20, D), b.quantized, atol=1e-6)
    stages = (first.stages,) if first.stages > 1 else ()
    if a.codes is not None or b.codes is not None:
        assert b.codes.shape == (3, 20, *stages) and torch.equal(a.codes.reshape(3, 20, *stages), b.codes)
    assert torch.allclose(a.loss, b.loss, atol=1e-7)
    assert torch.allclose(z_map.grad.permute(0, 2, 3, 1).reshape(3, 20, D), z_seq.grad, atol=1e-6)
    for (key, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), key
    if a.codes is not None:
        assert torch.equal(first.decode_codes(a.codes).permute(0, 2, 3, 1).reshape(3, 20, D), second.decode_codes(b.codes))


def test_memory_read_as_a_layer_in_a_sequence_model_learns():
    """A tiny sequence model with MemoryRead between two linear layers fits random data."""
    torch.manual_seed(7)
    x = torch.randn(16, 10, 12)
    target = torch.randn(16, 10, 12)
    model = torch.nn.ModuleDict({"inp": torch.nn.Linear(12, D), "read": memory_read(K, D), "out": torch.nn.Linear(D, 12)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = model["read"](model["inp"](x))
        loss = F.mse_loss(model["out"](out.quantized), target) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------- kill and resume
def test_q_bar_and_schedule_survive_resume(tmp_path, cifar):
    """A discrete-memory run stopped after its first checkpoint and resumed ends with the same
    numbers (q̄, τ schedule, slots, re-seeding draws) as the unbroken run."""
    overrides = [
        "train.steps=40", "train.threads=1", "train.log_every=10", "train.eval_every=20", "train.checkpoint_every=20",
        "data.eval_images=100", "model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16",
        "bottleneck.slots=64",
    ]
    cfg = load_config(CONFIGS / "memory_discrete.toml", overrides)
    train(cfg, tmp_path / "whole", data=cifar, show_progress=False)
    train(cfg, tmp_path / "split", data=cifar, show_progress=False, stop_after=20)
    train(cfg, tmp_path / "split", data=cifar, show_progress=False, resume=True)
    for kind in ("train", "eval"):
        assert strip_times(read_metrics(tmp_path / "whole", kind)) == strip_times(read_metrics(tmp_path / "split", kind))
    whole, _, _ = load_run(tmp_path / "whole")
    split, _, _ = load_run(tmp_path / "split")
    assert float(whole.bottleneck.distortion) > 0
    for (key, x), (_, y) in zip(whole.state_dict().items(), split.state_dict().items()):
        assert torch.equal(x, y), key


def test_packaged_discrete_configs_build(tmp_path):
    from memvae.networks.autoencoder import Autoencoder

    for name in ("memory_discrete", "vq_ema_reseed", "fsq"):
        model = Autoencoder.from_config(load_config(CONFIGS / f"{name}.toml"))
        assert model.bottleneck.codebook_size == 512


def test_fsq_config_rejects_levels_that_do_not_make_the_slots():
    from memvae.errors import MemvaeError

    with pytest.raises(MemvaeError, match="product"):
        load_config(CONFIGS / "fsq.toml", ["bottleneck.levels=8,8,4"])




# ---------------------------------------------------------------- the options in parts
def test_the_parts_build_the_read_the_config_builds():
    """memory_discrete from its packaged config and from the parts a user writes: one read."""
    from memvae.quantizers.memory_options import Addressing, MovingAverageWrite, RelativeTemperature

    cfg = load_config(CONFIGS / "memory_discrete.toml", ["bottleneck.slots=32"])
    torch.manual_seed(0)
    from_config = MemoryRead.from_config(cfg.bottleneck, D)
    torch.manual_seed(0)
    by_hand = MemoryRead(K, D, Addressing("l2", RelativeTemperature(1.0, 0.02, anneal=2000)),
                         MovingAverageWrite("hard", reseed_fraction=0.25, encoder_gradient="straight_through"),
                         eval_read="hard")
    z = torch.randn(4, D, 4, 4)
    for module in (from_config, by_hand):
        module.train()
        torch.manual_seed(1)
        module(z)
    for (key, a), b in zip(from_config.state_dict().items(), by_hand.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(from_config.eval()(z).quantized, by_hand.eval()(z).quantized)


@pytest.mark.parametrize("build, said", [
    (lambda p: p.Addressing("dot"), "similarity must be one of"),
    (lambda p: p.Addressing(temperature=0.5), "temperature must be a LearnedTemperature or a RelativeTemperature"),
    (lambda p: p.LearnedTemperature(0.0), "beta_init must be > 0"),
    (lambda p: p.RelativeTemperature(anneal=0), "tau_anneal must be a number of updates >= 1"),
    (lambda p: p.MovingAverageWrite("medium"), "weights must be 'soft' or 'hard'"),
    (lambda p: p.MovingAverageWrite(decay=1.0), r"decay must be in \(0, 1\)"),
    (lambda p: p.MovingAverageWrite(encoder_gradient="detach"), "encoder_gradient must be one of"),
    (lambda p: p.MemoryRead(K, D, write="hard_ema"), "write must be a GradientWrite or a MovingAverageWrite"),
    (lambda p: p.MemoryRead(K, D, p.Addressing(top_k=K + 1)), "top_k must be between 0"),
])
def test_a_part_that_cannot_work_cannot_be_built(build, said):
    """Each part checks its values when built; the encoder's gradient is an option of the
    moving-average write only, so the gradient write cannot be given one."""
    from memvae.quantizers import memory, memory_options

    parts = SimpleNamespace(**vars(memory_options), MemoryRead=memory.MemoryRead)
    with pytest.raises(ValueError, match=said):
        build(parts)
    assert not hasattr(parts.GradientWrite(), "encoder_gradient")
