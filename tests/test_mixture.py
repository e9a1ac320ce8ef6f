"""The mixture read: k slots with weights on the simplex grid, checked by brute force."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from memvae.config import schema as C
from memvae.quantizers import bottleneck_class
from memvae.quantizers import functional as Fn
from memvae.quantizers.mixture import count_codes, grid_points, round_to_grid
from memvae.training.metrics import read_metrics
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.codes import codes_from_map, nll_bits, symbol_ranges
from memvae.prior.fit import PriorOptions, train_prior
from memvae.prior.sample import sample_images
from memvae.training.train import train
from tests.conftest import CONFIGS

D = 3
WAYS = ("topk", "pursuit")
PACKAGED = sorted(p.stem for p in CONFIGS.glob("mixture_*.toml"))


def mixture(codebook_size=8, k=2, levels=3, way="topk", **kw):
    kw.setdefault("init", "random")  # the class default before "data" became every kind's
    return bottleneck_class("mixture")(codebook_size, D, k=k, levels=levels, way=way, **kw)


def warmed(b, z):
    """``b`` in eval mode after one training batch (data initialisation, q̄ set), with no
    re-seeding to move the slots."""
    b.reseed_fraction = 0.0
    b.train()(z)
    return b.eval()


def simplex(levels: int, k: int) -> list[tuple[int, ...]]:
    """Every point n of the grid in k parts (any order, zeros anywhere)."""
    return [n for n in itertools.product(range(levels + 1), repeat=k) if sum(n) == levels]


# ---------------------------------------------------------------- the grid and its rounding
@pytest.mark.parametrize("k, levels", [(1, 4), (2, 1), (2, 6), (3, 2), (3, 5), (4, 3)])
def test_grid_points_are_the_sorted_points_of_the_simplex_grid(k, levels):
    points = grid_points(levels, k)
    assert points[0] == (levels,) + (0,) * (k - 1)
    assert sorted(points, reverse=True) == points
    assert set(points) == {n for n in simplex(levels, k) if list(n) == sorted(n, reverse=True)}


@pytest.mark.parametrize("k, levels", [(2, 1), (2, 3), (2, 8), (3, 2), (3, 4), (4, 3), (5, 2)])
def test_rounding_is_the_nearest_grid_point_by_brute_force(k, levels):
    gen = torch.Generator().manual_seed(k * 100 + levels)
    # Sharp and flat softmax weights, and exact ties between entries.
    w = torch.cat([(torch.randn(400, k, generator=gen) * s).softmax(1) for s in (0.3, 1.0, 4.0)])
    w = torch.cat([w, torch.full((1, k), 1.0 / k)])
    counts = round_to_grid(w, levels)
    assert counts.dtype == torch.int64 and bool((counts >= 0).all()) and bool((counts.sum(1) == levels).all())
    grid = torch.tensor(simplex(levels, k), dtype=torch.float64) / levels
    dist = (w.double()[:, None, :] - grid[None]).pow(2).sum(2)  # N×|grid|
    chosen = (w.double() - counts.double() / levels).pow(2).sum(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-12)


def test_rounding_keeps_sorted_weights_sorted():
    w = (torch.randn(2000, 3) * 2).softmax(1).sort(1, descending=True).values
    counts = round_to_grid(w, 7)
    assert torch.equal(counts, counts.sort(1, descending=True).values)


# ---------------------------------------------------------------- k = 1 is the hard read
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("training", [True, False])
def test_one_slot_is_the_hard_nearest_slot_read(way, training):
    b = mixture(16, k=1, levels=5, way=way, init="random", reseed_fraction=0.0).train(training)
    z = torch.randn(4, D, 5, 5)
    before = b.memory.detach().clone()  # the ema write moves the slots after the read
    out = b(z)
    flat = Fn.flatten_positions(z)
    nearest = Fn.nearest_slots(flat, before)
    assert out.codes.shape == (4, 5, 5, 2)
    assert torch.equal(out.codes[..., 0].reshape(-1), nearest) and bool((out.codes[..., 1] == 0).all())
    assert torch.equal(Fn.flatten_positions(out.quantized), before[nearest])
    assert b.bits_per_position == pytest.approx(4.0) and b.code_bits == pytest.approx(4.0)


# ---------------------------------------------------------------- the two ways, by brute force
def test_topk_reads_the_k_nearest_slots_with_the_rounded_softmax_weights():
    torch.manual_seed(1)
    b = mixture(12, k=3, levels=5, beta_init=3.0)
    z = torch.randn(3, D, 4, 4)
    b = warmed(b, z)
    out = b(z)
    flat = Fn.flatten_positions(z).double()
    memory = b.memory.detach().double()
    beta, qbar = float(b.beta().detach()), float(b.distortion)
    points = torch.tensor(simplex(5, 3), dtype=torch.float64)
    for x, code, read in zip(flat, out.codes.reshape(-1, 4), Fn.flatten_positions(out.quantized)):
        dist = (memory - x).pow(2).sum(1)
        top = dist.argsort()[:3]
        w = torch.softmax(-beta * dist[top] / qbar, 0)
        n = points[(points / 5 - w).pow(2).sum(1).argmin()]
        expected = (n[:, None] / 5 * memory[top]).sum(0)
        assert torch.allclose(read.double(), expected, atol=1e-5)
        # The canonical code: the slots of positive weight, largest weight first.
        counts = b.grid[code[3]]
        kept = {int(s): int(c) for s, c in zip(top, n) if c > 0}
        assert {int(s): int(c) for s, c in zip(code[:3], counts) if c > 0} == kept


@pytest.mark.parametrize("k, levels", [(2, 3), (3, 4), (4, 2)])
def test_each_pursuit_step_takes_the_best_slot_and_weight_given_the_earlier_ones(k, levels):
    torch.manual_seed(k)
    b = mixture(7, k=k, levels=levels, way="pursuit", init="random")
    x = torch.randn(300, D) * 1.5
    slots, counts, _ = b.pursuit(x, b.memory.detach())
    memory = b.memory.detach().double()
    for row, (s, c) in enumerate(zip(slots.tolist(), counts.tolist())):
        q = x[row].double()
        anchor = int((memory - q).pow(2).sum(1).argmin())
        assert s[0] == anchor
        read, left = memory[anchor].clone(), levels
        for t in range(1, k):
            here = float((q - read).pow(2).sum())
            # Every slot and every number of units the anchor can still give.
            best = min(float((q - read - a / levels * (memory[j] - memory[anchor])).pow(2).sum())
                       for j in range(7) for a in range(left + 1))
            got = read + c[t] / levels * (memory[s[t]] - memory[anchor])
            error = float((q - got).pow(2).sum())
            assert error <= best + 1e-5 * (1 + best), (row, t)
            if c[t] == 0:
                assert best >= here - 1e-5 * (1 + here), (row, t)  # no move lowers the error
            read, left = got, left - c[t]
        assert c[0] == left and sum(c) == levels


def test_pursuit_is_never_worse_than_the_hard_read():
    b = mixture(32, k=3, levels=6, way="pursuit", init="random").eval()
    z = torch.randn(4, D, 6, 6)
    flat = Fn.flatten_positions(z)
    read = Fn.flatten_positions(b(z).quantized)
    hard = b.memory.detach()[Fn.nearest_slots(flat, b.memory.detach())]
    assert torch.all((flat - read).pow(2).sum(1) <= (flat - hard).pow(2).sum(1) + 1e-5)


# ---------------------------------------------------------------- codes
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("shape", [(3, D, 4, 5), (3, 20, D)])
@pytest.mark.parametrize("training", [True, False])
def test_decoding_the_codes_gives_the_read_bit_for_bit(way, shape, training):
    b = mixture(10, k=3, levels=4, way=way, beta_init=2.0)
    z = torch.randn(*shape)
    b = warmed(b, z).train(training)
    before = copy.deepcopy(b)  # the slots as read (the ema write moves them after the read)
    out = b(z)
    assert out.codes.shape == Fn.position_shape(z) + (4,)
    assert torch.equal(before.decode_codes(out.codes), out.quantized)
    assert bool((out.codes[..., :3] < 10).all()) and bool((out.codes[..., 3] < b.grid_size).all())


@pytest.mark.parametrize("codebook_size, k, levels", [(5, 2, 3), (5, 3, 3), (4, 3, 2), (6, 2, 1), (4, 4, 5)])
def test_code_bits_count_the_distinct_reads_and_canonical_codes_are_one_per_read(codebook_size, k, levels):
    """Every raw code (k slots in any order, repeats allowed, any grid point) made canonical:
    as many codes as count_codes, each decoding to a read no other code gives."""
    b = mixture(codebook_size, k=k, levels=levels, init="random")
    b.memory.data = torch.randn(codebook_size, D) * 3  # slots in general position
    raw = [(s, n) for s in itertools.product(range(codebook_size), repeat=k) for n in simplex(levels, k)]
    slots = torch.tensor([s for s, _ in raw])
    counts = torch.tensor([n for _, n in raw])
    codes = b.canonical(slots, counts)
    distinct = {tuple(c) for c in codes.tolist()}
    assert len(distinct) == count_codes(codebook_size, k, levels)
    assert b.code_bits == pytest.approx(math.log2(len(distinct)))
    reads = b.decode_codes(codes[None]).reshape(-1, D)
    # The same read as the raw code it came from...
    raw_reads = sum(counts[:, j, None].float() / levels * b.memory.detach()[slots[:, j]] for j in range(k))
    assert torch.allclose(reads, raw_reads, atol=1e-5)
    # ...and distinct codes give distinct reads.
    assert torch.unique((reads * 1e4).round(), dim=0).shape[0] == len(distinct)
    # Canonical codes stay as they are.
    assert torch.equal(b.canonical(codes[:, :k], b.grid[codes[:, k]]), codes)


@pytest.mark.parametrize("way", WAYS)
def test_random_inputs_emit_every_canonical_code_and_no_other(way):
    """3 slots, 2 per position, halves: 3 single slots and 3 pairs, 2^(log2 6) codes."""
    torch.manual_seed(3)
    b = mixture(3, k=2, levels=2, way=way, init="random")
    b.memory.data = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    b.distortion.fill_(1.0) if way == "topk" else None
    b.eval()
    x = torch.randn(20000, D) * 1.5 + torch.tensor([0.7, 0.7, 0.0])
    emitted = {tuple(c) for c in b(x[None]).codes[0].tolist()}
    everything = {tuple(c) for c in b.canonical(torch.tensor(list(itertools.product(range(3), repeat=2))).repeat(3, 1),
                                                torch.tensor(simplex(2, 2)).repeat_interleave(9, 0)).tolist()}
    assert emitted == everything and len(everything) == count_codes(3, 2, 2) == 6


def test_slot_counts_count_only_slots_read_with_weight():
    b = mixture(6, k=2, levels=3)
    codes = torch.tensor([[[4, 0, 0], [2, 5, 1], [5, 2, 1]]])  # one slot (4); two pairs
    assert b.slot_counts(codes).tolist() == [0, 0, 2, 0, 1, 2]


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("write", ["ema", "gradient"])
def test_gradients_reach_z_beta_and_with_the_gradient_write_the_slots(way, write):
    b = mixture(16, k=2, levels=3, way=way, write=write).train()
    z = torch.randn(2, D, 4, 4, requires_grad=True)
    out = b(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0
    expected = ({"memory"} if write == "gradient" else set()) | ({"log_beta"} if way == "topk" else set())
    assert {name for name, _ in b.named_parameters()} == expected
    if write == "gradient":
        assert b.memory.grad.abs().sum() > 0
    if way == "topk":
        assert b.log_beta.grad is not None and float(b.log_beta.grad.abs()) > 0


@pytest.mark.parametrize("way", WAYS)
def test_the_ema_write_moves_each_slot_toward_its_least_squares_target(way):
    """One write, by brute force: slot s counts Σ w² and sums Σ w·(z − r + w M_s) over the
    entries that read it, and m_s = s_s / ñ_s (Laplace-smoothed counts)."""
    torch.manual_seed(3)
    b = mixture(6, k=2, levels=3, way=way, reseed_fraction=0.0, decay=0.9).train()
    z = torch.randn(2, D, 3, 3)
    memory = b.memory.clone()
    codes = b(z).codes.reshape(-1, 3)
    counts, sums = torch.zeros(6), torch.zeros(6, D)
    for x, code in zip(Fn.flatten_positions(z), codes):
        weights = [n / 3 for n in grid_points(3, 2)[int(code[2])]]
        read = sum(w * memory[int(s)] for s, w in zip(code[:2], weights))
        for s, w in zip(code[:2].tolist(), weights):
            if w > 0:
                counts[s] += w * w
                sums[s] += w * (x - read + w * memory[s])
    cluster_size = 0.9 * torch.ones(6) + 0.1 * counts
    embed_sum = 0.9 * memory + 0.1 * sums
    smoothed = (cluster_size + 1e-5) / (cluster_size.sum() + 6e-5) * cluster_size.sum()
    assert torch.allclose(b.cluster_size, cluster_size, atol=1e-6)
    assert torch.allclose(b.memory, embed_sum / smoothed[:, None], atol=1e-5)


@pytest.mark.parametrize("way", WAYS)
def test_one_slot_trains_as_vq_ema_with_reseeding(way):
    """At k = 1 the ema write is VQ-VAE's moving average and the re-seeding vq_ema's: the
    same slots, codes and re-seeds over training steps (to rounding: z − r + M_s is z)."""
    torch.manual_seed(0)
    mix = mixture(16, k=1, levels=1, way=way, init="data", reseed_fraction=0.25).train()
    vq = bottleneck_class("vq_ema")(16, D, init="data", reseed_fraction=0.25).train()
    batches = [torch.randn(2, D, 4, 4) + 3.0 * (i % 2) for i in range(30)]  # the shift kills slots: re-seeds
    for z in batches:
        torch.manual_seed(1)
        a = mix(z)
        torch.manual_seed(1)
        v = vq(z)
        assert torch.equal(a.codes[..., 0], v.codes)
        assert torch.allclose(mix.memory, vq.memory, atol=1e-5)
        if way == "pursuit":  # topk's loss adds β's term, ‖r − z‖² in value (β does nothing at k = 1)
            assert torch.allclose(a.loss, v.loss, atol=1e-6)
    assert torch.allclose(mix.cluster_size, vq.cluster_size, atol=1e-5)


@pytest.mark.parametrize("way", WAYS)
def test_sequences_and_maps_give_the_same_reads_losses_gradients_and_state(way):
    torch.manual_seed(5)
    first, second = mixture(16, way=way).train(), mixture(16, way=way).train()
    second.load_state_dict(first.state_dict())
    z_map = torch.randn(3, D, 4, 5, requires_grad=True)
    z_seq = z_map.detach().permute(0, 2, 3, 1).reshape(3, 20, D).requires_grad_(True)
    outs = []
    for module, z in ((first, z_map), (second, z_seq)):
        torch.manual_seed(6)
        out = module(z)
        ((out.quantized ** 2).sum() + out.loss).backward()
        outs.append(out)
    a, b = outs
    assert torch.equal(a.codes.reshape(3, 20, 3), b.codes)
    assert torch.allclose(a.quantized.permute(0, 2, 3, 1).reshape(3, 20, D), b.quantized, atol=1e-6)
    assert torch.allclose(a.loss, b.loss, atol=1e-7)
    assert torch.allclose(z_map.grad.permute(0, 2, 3, 1).reshape(3, 20, D), z_seq.grad, atol=1e-6)
    for (key, x), y in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), key


@pytest.mark.parametrize("write", ["ema", "gradient"])
def test_dead_slots_are_reseeded_from_the_batch(write):
    b = mixture(16, k=2, levels=3, init="random", reseed_fraction=0.25, write=write).train()
    b.memory.data[8:] += 100.0  # far from every query: never read
    if write == "ema":
        b.embed_sum[8:] += 100.0
    z = torch.randn(4, D, 4, 4)
    for _ in range(200):  # the usage of an unread slot falls from N/K below N/(4K) in ~138 updates
        b(z)
    flat = Fn.flatten_positions(z)
    moved = b.memory.detach()[8:]
    assert bool((moved.abs() < 50).all())
    if write == "gradient":  # the ema write then moves a re-seeded slot on toward its target
        assert all(bool((flat == row).all(1).any()) for row in moved)


@pytest.mark.parametrize("way", WAYS)
def test_a_short_real_training_lowers_the_loss(tmp_path, cifar, way):
    cfg = C.load_config(CONFIGS / "smoke.toml", [
        "train.threads=1", "train.steps=50", "train.log_every=10", "train.eval_every=50", "train.checkpoint_every=50",
        "data.eval_images=100", "bottleneck.kind=mixture", f"bottleneck.way={way}", "bottleneck.slots=64",
        "bottleneck.k=2", "bottleneck.levels=3", "bottleneck.init=data"])
    train(cfg, tmp_path / "run", show_progress=False, data=cifar)
    records = read_metrics(tmp_path / "run")
    assert records[-1]["train_nmse"] < 0.85 * records[0]["train_nmse"], records
    final = read_metrics(tmp_path / "run", "eval")[-1]
    assert final["eval_nmse"] < 1.0 and final["eval_code_bits"] == pytest.approx(math.log2(count_codes(64, 2, 3)))


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_build_at_about_18_bits(name):
    from memvae.networks.autoencoder import Autoencoder

    b = Autoencoder.from_config(C.load_config(CONFIGS / f"{name}.toml")).bottleneck
    assert b.bits_per_position == pytest.approx(18.0) and 16 <= b.code_bits < 18
    assert b.way in name and f"K{b.codebook_size}_L{b.levels}" in name


def test_bad_options_fail_in_one_line():
    with pytest.raises(C.MemvaeError, match="bottleneck.k' must be between 1 and the 8 slots"):
        C.load_config(CONFIGS / "smoke.toml", ["bottleneck.kind=mixture", "bottleneck.slots=8", "bottleneck.k=9"])
    with pytest.raises(C.MemvaeError, match="bottleneck.way' must be one of topk, pursuit"):
        C.load_config(CONFIGS / "smoke.toml", ["bottleneck.kind=mixture", "bottleneck.way=greedy"])
    with pytest.raises(C.MemvaeError, match="bottleneck.write' must be one of ema, gradient"):
        C.load_config(CONFIGS / "smoke.toml", ["bottleneck.kind=mixture", "bottleneck.write=soft"])
    with pytest.raises(ValueError, match="decodes codes B×H×W×3"):
        mixture(8).decode_codes(torch.zeros(2, 4, 4, 2, dtype=torch.int64))


# ---------------------------------------------------------------- the prior over its codes
def test_the_prior_models_each_symbol_over_its_own_values():
    """Slot indices in [0, K), the grid index in [0, C): each column's law covers its own
    range only, so a prior with flat logits costs the uniform bits of each symbol."""
    b = mixture(16, k=2, levels=5)  # C = 3 grid points
    ranges = symbol_ranges(b)
    assert ranges == [(0, 16), (16, 16), (32, 3)]
    prior = GatedPixelCNN(35, width=8, layers=2, symbol_ranges=ranges).eval()
    torch.nn.init.zeros_(prior.head[-1].weight)
    torch.nn.init.zeros_(prior.head[-1].bias)
    codes = torch.cat([torch.randint(16, (4, 8, 8, 2)), torch.randint(3, (4, 8, 8, 1))], 3)
    symbols = codes + torch.tensor([0, 16, 32])
    with torch.no_grad():
        logp = prior(symbols.flatten(2)).log_softmax(1).exp()
    assert torch.allclose(logp.sum(1), torch.ones(4, 8, 24))
    assert float(logp[:, 16:, :, 0::3].sum()) == 0.0 and float(logp[:, 32:, :, 1::3].sum()) == 0.0
    assert float(logp[:, :32, :, 2::3].sum()) == 0.0
    assert nll_bits(prior, symbols.flatten(2)) == pytest.approx((4 + 4 + math.log2(3)) / 3, rel=1e-5)
    assert torch.equal(codes_from_map(symbols.flatten(2), b), codes)


def test_other_codes_keep_one_shared_vocabulary():
    assert symbol_ranges(bottleneck_class("residual_vq")(16, D, stages=2)) is None
    assert symbol_ranges(bottleneck_class("vq_ema")(16, D)) is None


@pytest.mark.slow
def test_a_prior_fits_the_codes_of_a_short_run_and_samples_decode(tmp_path, cifar):
    cfg = C.load_config(CONFIGS / "mixture_pursuit_k2_K64_L63.toml", [
        "train.steps=30", "train.threads=1", "train.log_every=10", "train.eval_every=30", "train.checkpoint_every=30",
        "data.eval_images=100", "model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16"])
    run = tmp_path / "mix"
    train(cfg, run, data=cifar, show_progress=False)
    result = train_prior(run, PriorOptions(steps=30, width=8, layers=2, train_images=500, test_images=100, threads=1),
                         data=cifar)
    assert result["map_shape"] == [8, 24]  # each position's 2 slots and grid index side by side
    assert result["symbol_ranges"] == [[0, 64], [64, 64], [128, 32]] and result["num_slots"] == 160
    assert result["uniform_bits_per_index"] == pytest.approx((6 + 6 + 5) / 3)
    assert math.isfinite(result["bits_per_index"]) and result["bits_per_index"] < result["uniform_bits_per_index"] + 0.5
    images, codes = sample_images(run, 3, seed=0)
    assert images.shape == (3, 3, 32, 32) and codes.shape == (3, 8, 24)
    assert bool((codes[..., 0::3] < 64).all()) and bool((codes[..., 1::3] >= 64).all() and (codes[..., 1::3] < 128).all())
    assert bool((codes[..., 2::3] >= 128).all() and (codes[..., 2::3] < 160).all())


def test_the_grid_functions_stay_importable_from_the_mixture_module():
    """The simplex grid's arithmetic moved to mixture_grid (issue 44: mixture.py under 450
    lines); code that imports it from memvae.quantizers.mixture gets the same functions."""
    from memvae.quantizers import mixture, mixture_grid

    for name in ("check_shape", "count_codes", "grid_points", "round_to_grid"):
        assert getattr(mixture, name) is getattr(mixture_grid, name), name
    assert grid_points(3, 2) == [(3, 0), (2, 1)] and count_codes(8, 2, 3) == 8 + 28 * 2
