"""The memory read's discreteness controls: straight-through hard read, entropy penalty,
β schedule, Gumbel read (memvae.bottlenecks.memory.MemoryRead)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from memvae import MemoryRead
from memvae.config import load_config
from memvae.metrics import read_metrics
from memvae.runs import load_run
from memvae.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def brute_force_nearest(z: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """B×D×H×W queries, K×D slots -> B×H×W index of the nearest slot (explicit distances)."""
    x = z.detach().permute(0, 2, 3, 1)  # B×H×W×D
    return ((x[..., None, :] - memory.detach()) ** 2).sum(-1).argmin(-1)


# ---------------------------------------------------------------- straight-through
def test_straight_through_reads_the_argmax_slot_and_passes_the_soft_gradient():
    torch.manual_seed(0)
    st = MemoryRead(16, 8, beta_init=2.0, train_read="straight_through").train()
    soft = MemoryRead(16, 8, beta_init=2.0, train_read="soft").train()
    soft.load_state_dict(st.state_dict())
    z = torch.randn(3, 8, 4, 5)
    upstream = torch.randn(3, 8, 4, 5)

    grads = {}
    for name, read in (("st", st), ("soft", soft)):
        zz = z.clone().requires_grad_()
        out = read(zz)
        (out.quantized * upstream).sum().backward()
        grads[name] = (zz.grad, read.memory.grad.clone(), read.log_beta.grad.clone(), out)

    # Forward: the rows of the slots with the largest weight, i.e. the nearest slots.
    out = grads["st"][3]
    nearest = brute_force_nearest(z, st.memory)
    assert torch.equal(out.codes, nearest)
    hard = st.memory.detach()[nearest].permute(0, 3, 1, 2)
    assert torch.equal(out.quantized, hard)
    assert not torch.allclose(grads["soft"][3].quantized, hard, atol=1e-3)  # the soft read differs

    # Backward: exactly the soft read's gradient, non-zero for z (the logits), M and β.
    for got, want, name in zip(grads["st"][:3], grads["soft"][:3], ("z", "memory", "log_beta")):
        assert got.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(got, want, msg=f"gradient to {name} is not the soft read's")


def test_straight_through_is_the_hard_read_in_eval_mode_when_asked():
    torch.manual_seed(1)
    read = MemoryRead(16, 8, train_read="straight_through", read_mode="hard").eval()
    z = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        out = read(z)
    assert torch.equal(out.quantized, read.memory[brute_force_nearest(z, read.memory)].permute(0, 3, 1, 2))


# ---------------------------------------------------------------- β schedule
def test_beta_schedule_multiplies_beta_by_its_growth():
    read = MemoryRead(16, 8, beta_init=3.0, beta_growth=50.0)
    z = torch.randn(2, 8, 4, 4)
    betas, entropies = {}, {}
    for progress in (0.0, 0.5, 1.0, 2.0, -1.0):
        read.set_progress(progress)
        with torch.no_grad():
            out = read(z)
        betas[progress] = float(out.metrics["beta"])
        entropies[progress] = float(out.metrics["entropy_bits"])
        assert betas[progress] == pytest.approx(float(read.beta().detach()), rel=1e-6)
    assert betas[0.0] == pytest.approx(3.0, rel=1e-6)
    assert betas[1.0] == pytest.approx(3.0 * 50.0, rel=1e-6)
    assert betas[0.5] == pytest.approx(3.0 * math.sqrt(50.0), rel=1e-6)  # geometric in between
    assert betas[2.0] == betas[1.0] and betas[-1.0] == betas[0.0]  # progress is clamped to [0, 1]
    assert entropies[1.0] < entropies[0.5] < entropies[0.0]  # a larger β sharpens the read
    assert float(read.log_beta.detach().exp()) == pytest.approx(3.0)  # the schedule is not learned


def test_beta_schedule_is_off_by_default():
    read = MemoryRead(16, 8, beta_init=2.0)
    read.set_progress(1.0)
    assert float(read.beta().detach()) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def growth_run(tmp_path_factory, data_dir) -> Path:
    """A smoke memory model trained 20 updates with β growing 100×."""
    path = tmp_path_factory.mktemp("growth") / "run"
    cfg = load_config(ROOT / "src" / "memvae" / "configs" / "smoke.toml", [
        "train.steps=20", "train.threads=1", "train.log_every=20", "train.eval_every=20",
        "bottleneck.kind=memory", "bottleneck.beta_growth=100", "data.eval_images=50",
    ])
    train(cfg, path, data_dir=data_dir, show_progress=False)
    return path


def test_training_loop_drives_the_beta_schedule(growth_run):
    """The last update ran at progress 19/20: its logged β is exp(log β)·100^(19/20)."""
    record = read_metrics(growth_run)[-1]
    model, _, _ = load_run(growth_run)
    learned = float(model.bottleneck.log_beta.detach().exp())
    # log β moved by at most one Adam step (lr 1e-3) after the logged forward pass.
    assert record["beta"] == pytest.approx(learned * 100 ** (19 / 20), rel=3e-3)


def test_loaded_model_reads_with_the_scheduled_beta(growth_run):
    model, _, _ = load_run(growth_run)
    learned = float(model.bottleneck.log_beta.detach().exp())
    assert float(model.bottleneck.beta().detach()) == pytest.approx(learned * 100, rel=1e-6)


# ---------------------------------------------------------------- Gumbel read
def gumbel_weights(read: MemoryRead, z: torch.Tensor) -> torch.Tensor:
    """The Gumbel read's weights: with memory = I (K = D) the read of each position is
    its weight vector itself. z: B×K×H×W -> (B·H·W)×K."""
    with torch.no_grad():
        out = read(z)
    return out.quantized.permute(0, 2, 3, 1).reshape(-1, read.num_slots)


def identity_read(k: int, **options) -> MemoryRead:
    read = MemoryRead(k, k, beta_init=1.5, train_read="gumbel", tau=(1.0, 0.1), **options).train()
    read.memory.data.copy_(torch.eye(k))
    return read


def test_gumbel_weights_sum_to_one_and_are_random():
    torch.manual_seed(2)
    read = identity_read(8)
    z = torch.randn(4, 8, 5, 5)
    w1, w2 = gumbel_weights(read, z), gumbel_weights(read, z)
    assert (w1 >= 0).all()
    torch.testing.assert_close(w1.sum(1), torch.ones(len(w1)), rtol=0, atol=1e-5)
    assert not torch.allclose(w1, w2)  # fresh noise at each call
    with torch.no_grad():
        soft = read(z).weights.reshape(-1, 8)  # the noiseless softmax
    assert not torch.allclose(w1, soft, atol=1e-3)
    read.eval()  # evaluation uses read_mode ("soft"): deterministic, no noise
    torch.testing.assert_close(gumbel_weights(read, z), soft)


def test_gumbel_temperature_anneals():
    torch.manual_seed(3)
    read = identity_read(8)
    z = torch.randn(8, 8, 8, 8)
    taus, sharpness = [], []
    for progress in (0.0, 0.5, 1.0):
        read.set_progress(progress)
        taus.append(read.tau())
        sharpness.append(float(gumbel_weights(read, z).max(1).values.mean()))
    assert taus == pytest.approx([1.0, math.sqrt(0.1), 0.1])
    assert sharpness[0] < sharpness[1] < sharpness[2]
    assert sharpness[2] > 0.9  # at τ = 0.1 the read is nearly one-hot


def test_gumbel_argmax_follows_the_softmax():
    """Gumbel-max: argmax_k (logit_k + g_k) is distributed as softmax(logits)."""
    torch.manual_seed(4)
    read = identity_read(6)
    query = torch.randn(6) * 0.5
    n = 20000
    z = query.view(1, 6, 1, 1).expand(n, 6, 1, 1).contiguous()
    drawn = gumbel_weights(read, z).argmax(1)
    with torch.no_grad():
        p = read.logits(query[None], read.memory, read.beta())[0].double().softmax(0)
    freq = torch.bincount(drawn, minlength=6).double() / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)


# ---------------------------------------------------------------- entropy penalty, real runs
def final_eval(tmp_path: Path, data_dir: Path, name: str, entropy_weight: float) -> dict:
    cfg = load_config(ROOT / "src" / "memvae" / "configs" / "smoke.toml", [
        "train.steps=150", "train.threads=1", "train.log_every=50", "train.eval_every=150",
        "bottleneck.kind=memory", f"bottleneck.entropy_weight={entropy_weight}",
    ])
    train(cfg, tmp_path / name, data_dir=data_dir, show_progress=False)
    return read_metrics(tmp_path / name, "eval")[-1]


def test_entropy_penalty_lowers_read_entropy_on_cifar10(tmp_path, data_dir):
    """150 updates of the smoke memory model on CIFAR-10, with and without the penalty:
    the penalised read is much less spread over slots on held-out images, and the model
    still reconstructs (a weight of 0.01 already collapses it to a single slot, NMSE ≈ 1)."""
    plain = final_eval(tmp_path, data_dir, "plain", 0.0)
    penalised = final_eval(tmp_path, data_dir, "penalised", 0.001)
    assert plain["eval_entropy_bits"] > 2.0  # the unpenalised read really is soft
    assert penalised["eval_entropy_bits"] < 0.5 * plain["eval_entropy_bits"]
    assert penalised["eval_max_weight"] > plain["eval_max_weight"]
    assert penalised["eval_nmse"] < 0.5
