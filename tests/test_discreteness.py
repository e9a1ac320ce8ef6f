"""The memory read's discreteness controls: straight-through hard read and the τ schedule
in real training runs (memvae.quantizers.memory.MemoryRead)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from memvae import MemoryRead
from memvae.config.schema import load_config
from memvae.training.metrics import read_metrics
from memvae.training.runs import load_run
from memvae.training.train import train
from tests.conftest import memory_read

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
    st = memory_read(16, 8, beta_init=2.0, train_read="straight_through").train()
    soft = memory_read(16, 8, beta_init=2.0, train_read="soft").train()
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
    read = memory_read(16, 8, train_read="straight_through", eval_read="hard").eval()
    z = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        out = read(z)
    assert torch.equal(out.quantized, read.memory[brute_force_nearest(z, read.memory)].permute(0, 3, 1, 2))


# ---------------------------------------------------------------- the τ schedule in real runs
@pytest.fixture(scope="module")
def annealed_run(tmp_path_factory, cifar) -> Path:
    """A smoke discrete-memory model trained 20 updates with τ annealed 1 → 0.01."""
    path = tmp_path_factory.mktemp("annealed") / "run"
    cfg = load_config(ROOT / "src" / "memvae" / "config" / "packaged" / "memory_discrete.toml", [
        "train.steps=20", "train.threads=1", "train.log_every=20", "train.eval_every=20", "data.eval_images=50",
        "model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16", "bottleneck.slots=64",
        "bottleneck.tau_start=1.0", "bottleneck.tau_end=0.01", "bottleneck.tau_anneal_updates=20",
    ])
    train(cfg, path, data=cifar, show_progress=False)
    return path


def test_training_loop_drives_the_tau_schedule(annealed_run):
    """The last update ran at progress 19/20: its logged β is 1/(τ(19/20)·q̄), with q̄ as
    it was after that update's own batch (one more moving-average step than the saved one
    is impossible: the update is the last)."""
    record = read_metrics(annealed_run)[-1]
    model, _, _ = load_run(annealed_run)
    tau = 0.01 ** (19 / 20)
    assert record["beta"] == pytest.approx(1.0 / (tau * float(model.bottleneck.distortion)), rel=1e-5)


def test_loaded_model_reads_with_the_scheduled_tau(annealed_run):
    model, _, _ = load_run(annealed_run)
    assert float(model.bottleneck.tau()) == pytest.approx(0.01)


def test_a_stopped_and_resumed_run_continues_the_tau_schedule_exactly(annealed_run, tmp_path, cifar):
    """Stopped at update 10 of the 20 over which τ anneals, then resumed: the same β in every
    record and the same update count (τ's clock) as the unbroken run."""
    cfg = load_config(annealed_run / "config.toml")
    train(cfg, tmp_path / "run", data=cifar, show_progress=False, stop_after=10)
    train(cfg, tmp_path / "run", resume=True, data=cifar, show_progress=False)
    unbroken = [r.get("beta") for r in read_metrics(annealed_run)]
    resumed = [r.get("beta") for r in read_metrics(tmp_path / "run")]
    assert resumed == unbroken
    assert int(load_run(tmp_path / "run")[0].bottleneck.updates) == 20
