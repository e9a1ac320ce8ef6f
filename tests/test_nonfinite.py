"""Non-finite losses and gradients: a run stops at the first NaN keeping its last good checkpoint,
or skips the update and leaves no trace of it (train.nonfinite)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from memvae.config import schema as C
from memvae.training.checkpoint import load_latest
from memvae.data import to_input
from memvae.errors import MemvaeError
from memvae.training.metrics import read_metrics
from memvae.networks.autoencoder import Autoencoder
from memvae.networks.encoder_decoder import Encoder
from memvae.training.train import train
from tests.cli_util import SMOKE, assert_same_state, run_memvae, smoke_config as smoke


def test_absurd_learning_rate_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(tmp_path, cifar):
    run = tmp_path / "run"
    result = run_memvae("train", "--config", SMOKE, "--train.threads", "1", "--train.steps", "30",
                        "--train.lr", "1e30", "--train.checkpoint_every", "1", "--run-dir", run, "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    found = re.match(r"error: loss is (nan|inf|-inf) at update (\d+); stopped \(the last good checkpoint is kept", lines[0])
    assert found, lines[0]
    bad = int(found.group(2))
    assert "train.on_nonfinite=skip" in lines[0] and "lower train.lr" in lines[0]
    dump_path = run / f"nonfinite_step_{bad:08d}.pt"
    assert str(dump_path) in lines[0]
    # The last checkpoint is the update before, complete and finite.
    kept = load_latest(run / "checkpoints")
    assert kept["step"] == bad - 1 >= 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    # The dump is plain data, and really reproduces the non-finite loss.
    dump = torch.load(dump_path, weights_only=True)
    assert dump["step"] == bad and not math.isfinite(dump["loss"])
    cfg = C.load_config(run / "config.toml")
    model = Autoencoder.from_config(cfg)
    model.load_state_dict(dump["model"])
    model.train()
    with torch.no_grad():
        loss = model(to_input(cifar.train[dump["batch_indices"]])).loss
    assert not torch.isfinite(loss), float(loss)


def test_raising_the_learning_rate_on_resume_takes_effect_and_the_good_checkpoint_stays(tmp_path, small_cifar):
    """A sane run to update 10, resumed with lr = 1e30: the resumed run must use the new
    rate (as its config.toml says), stop at its first non-finite loss, and keep update 10."""
    run = tmp_path / "run"
    train(smoke("train.steps=10", "train.checkpoint_every=5"), run, show_progress=False, data=small_cifar)
    good = load_latest(run / "checkpoints")
    with pytest.raises(MemvaeError, match=r"loss is (nan|inf|-inf) at update (1[1-9]|2\d|30);") as info:
        train(smoke("train.steps=30", "train.checkpoint_every=5", "train.lr=1e30"), run, resume=True, show_progress=False, data=small_cifar)
    bad = int(re.search(r"at update (\d+)", str(info.value)).group(1))
    kept = load_latest(run / "checkpoints")
    assert kept["step"] == 5 * ((bad - 1) // 5)
    if kept["step"] == 10:
        assert_same_state(kept, good)
    assert C.load_config(run / "config.toml").train.lr == 1e30


def test_skip_mode_survives_an_absurd_learning_rate(tmp_path, small_cifar):
    """lr = 1e30 makes every update after the first non-finite; with skip the run still
    logs, evaluates and checkpoints at every due update, and its weights stay finite."""
    cfg = smoke("train.steps=12", "train.log_every=4", "train.eval_every=6", "train.checkpoint_every=4",
                "train.lr=1e30", "train.on_nonfinite=skip")
    last = train(cfg, tmp_path / "run", show_progress=False, data=small_cifar)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [4, 8, 12]
    assert [r["step"] for r in read_metrics(tmp_path / "run", "eval")] == [6, 12]
    skipped = sum(r["skipped"] for r in records)
    assert 1 <= skipped < 12 and last["step"] == 12
    for r in records:  # an interval with no update applied has no training error to report
        if r["skipped"] == 4:
            assert math.isnan(r["train_nmse"]), r
        else:
            assert math.isfinite(r["train_nmse"]), r
    state = load_latest(tmp_path / "run" / "checkpoints")
    assert state["step"] == 12
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _encoder_fault(monkeypatch, fault):
    """Apply ``fault`` to the encoder's output at training forward number ``n``: returns a
    setter of ``n`` (None: never)."""
    real = Encoder.forward
    target = {"n": None, "calls": 0}

    def forward(self, x):
        z = real(self, x)
        if self.training:
            target["calls"] += 1
            if target["calls"] == target["n"]:
                z = fault(z)
        return z

    monkeypatch.setattr(Encoder, "forward", forward)
    return lambda n: target.update(n=n, calls=0)


@pytest.fixture
def nan_at_update(monkeypatch):
    """Make the encoder's output NaN at training forward number ``n`` (a bad batch, a
    hardware glitch): returns a setter."""
    return _encoder_fault(monkeypatch, lambda z: z * float("nan"))


def _infinite_gradient(z):
    z.register_hook(lambda g: torch.full_like(g, float("inf")))
    return z


@pytest.fixture
def inf_gradient_at_update(monkeypatch):
    """Make the encoder output's gradient infinite at training forward number ``n``, its
    loss staying finite (an overflow in the backward pass): returns a setter."""
    return _encoder_fault(monkeypatch, _infinite_gradient)


@pytest.mark.parametrize("kind", ["vq", "vq_ema"])
def test_a_skipped_update_leaves_no_trace(tmp_path, small_cifar, nan_at_update, kind):
    """Skipping update 8 must leave model, moving averages and optimizer exactly as after
    update 7 (vq_ema writes its slots during the forward pass: that write must be undone),
    and training must go on, logging the skip in the record of update 8."""
    cfg = smoke("train.steps=16", "train.log_every=4", "train.eval_every=16", "train.checkpoint_every=100",
                f"bottleneck.kind={kind}", "train.on_nonfinite=skip")
    nan_at_update(None)
    train(cfg, tmp_path / "seven", show_progress=False, data=small_cifar, stop_after=7)
    nan_at_update(8)
    train(cfg, tmp_path / "skip8", show_progress=False, data=small_cifar, stop_after=8)
    before, after = load_latest(tmp_path / "seven" / "checkpoints"), load_latest(tmp_path / "skip8" / "checkpoints")
    assert after["step"] == 8
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key]), key
    for key in before["optimizer"]["state"]:
        for name, value in before["optimizer"]["state"][key].items():
            assert torch.equal(after["optimizer"]["state"][key][name], value), (key, name)

    nan_at_update(8)
    train(cfg, tmp_path / "full", show_progress=False, data=small_cifar)
    records = read_metrics(tmp_path / "full")
    assert [(r["step"], r["skipped"]) for r in records] == [(4, 0), (8, 1), (12, 0), (16, 0)]
    final = load_latest(tmp_path / "full" / "checkpoints")
    assert final["step"] == 16
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert all(math.isfinite(r["train_nmse"]) for r in records)
    # Updates 9..16 were applied: the weights moved on from where the skip left them.
    assert any(not torch.equal(final["model"][k], after["model"][k]) for k in after["model"])


def test_an_infinite_gradient_with_a_finite_loss_is_not_applied(tmp_path, small_cifar, inf_gradient_at_update):
    """The guard checks the gradients too: update 8's loss is finite, its gradient is not;
    skip mode leaves weights, Adam's state and moving averages as after update 7, and stop
    mode names the update and the gradient."""
    cfg = smoke("train.steps=8", "train.log_every=4", "train.eval_every=8", "train.checkpoint_every=100",
                "bottleneck.kind=vq_ema", "train.on_nonfinite=skip")
    inf_gradient_at_update(None)
    train(cfg, tmp_path / "seven", show_progress=False, data=small_cifar, stop_after=7)
    inf_gradient_at_update(8)
    train(cfg, tmp_path / "skip8", show_progress=False, data=small_cifar)
    before, after = load_latest(tmp_path / "seven" / "checkpoints"), load_latest(tmp_path / "skip8" / "checkpoints")
    assert after["step"] == 8
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key]), key
    assert [r["skipped"] for r in read_metrics(tmp_path / "skip8") if r["kind"] == "train"] == [0, 1]

    inf_gradient_at_update(5)
    stop = smoke("train.steps=8", "train.checkpoint_every=4", "bottleneck.kind=vq_ema")
    with pytest.raises(MemvaeError, match=r"a gradient is not finite \(loss [0-9.]+\) at update 5; stopped"):
        train(stop, tmp_path / "stop", show_progress=False, data=small_cifar)
    assert load_latest(tmp_path / "stop" / "checkpoints")["step"] == 4


def test_a_nan_in_stop_mode_names_the_update_and_keeps_the_checkpoint(tmp_path, small_cifar, nan_at_update):
    nan_at_update(7)
    cfg = smoke("train.steps=16", "train.checkpoint_every=5", "bottleneck.kind=vq_ema")
    with pytest.raises(MemvaeError, match=r"loss is nan at update 7; stopped"):
        train(cfg, tmp_path / "run", show_progress=False, data=small_cifar)
    assert load_latest(tmp_path / "run" / "checkpoints")["step"] == 5
    dump = torch.load(tmp_path / "run" / "nonfinite_step_00000007.pt", weights_only=True)
    assert dump["step"] == 7 and len(dump["batch_indices"]) == cfg.train.batch_size
    # "The model before this update": the moving averages are not yet polluted by the bad batch.
    assert all(torch.isfinite(v).all() for v in dump["model"].values() if v.is_floating_point())
