"""The training engine (memvae.training.train + memvae.training.engine): the split changed nothing, and an
update reads nothing back from the device.

1. Identity: the loop before the split (``train.py`` at commit BEFORE_SPLIT, read from git
   and run with today's other modules) and the engine train the same smoke runs, at one
   thread, to the same metrics.jsonl and the same final checkpoint. The old loop read the
   loss and the logging measures back after every update; the engine keeps them on the
   device; nothing else may differ. (Drop this test when the loop is meant to change what
   it computes.)
2. No host sync per update: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` and
   ``float()``/``int()``/``bool()``/``__index__`` on tensors, called from memvae's code,
   are counted while the updates between two log records run; there are none.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import memvae
from memvae.config import schema as C
from memvae.training import engine
from memvae.training.checkpoint import load_latest
from memvae.errors import MemvaeError
from memvae.training.metrics import MetricsLog
from memvae.training.train import train
from tests.cli_util import strip_times
from tests.conftest import CONFIGS, REPO

BEFORE_SPLIT = "8f222b2"  # train.py with the issue-12 repeatability fix, before the engine split
SMOKE_NETWORKS = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16",
                  "data.eval_images=200", "train.lr=1e-3", "train.threads=1"]
SCHEDULE = ["train.steps=40", "train.log_every=10", "train.eval_every=20", "train.checkpoint_every=20"]
VARIANTS = {
    "vq": [],
    "vq_ema": [],
    "memory_l2": [],
    "memory_l2_write": [],
    "memory_discrete": [],
    "fsq": [],
}


def variant(name: str, *overrides: str) -> C.Config:
    return C.load_config(CONFIGS / f"{name}.toml", [*SMOKE_NETWORKS, *SCHEDULE, *overrides])



@pytest.fixture(scope="module")
def loop_before_split():
    """``train`` of train.py at BEFORE_SPLIT, as a module beside today's memvae. That loop
    called ``bottleneck.set_progress`` before each update; today the memory read counts its
    own updates, so the call is given a no-op for the old loop's sake."""
    from memvae.quantizers.base import Bottleneck

    patch = pytest.MonkeyPatch()
    patch.setattr(Bottleneck, "set_progress", lambda self, fraction: None, raising=False)
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_SPLIT}:src/memvae/train.py"], cwd=REPO, capture_output=True,
                                text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"needs the git history of the checkout (commit {BEFORE_SPLIT})")
    # The old loop imports the modules by their names before the layer packages (issue 33).
    import memvae.config.schema, memvae.networks.autoencoder, memvae.training.checkpoint, memvae.training.evaluate
    import memvae.training.metrics, memvae.training.runs
    for old_name, module in {"config": memvae.config.schema, "checkpoint": memvae.training.checkpoint,
                             "evaluate": memvae.training.evaluate, "metrics": memvae.training.metrics,
                             "model": memvae.networks.autoencoder, "runs": memvae.training.runs}.items():
        patch.setitem(sys.modules, f"memvae.{old_name}", module)
        patch.setattr(memvae, old_name, module, raising=False)
    module = types.ModuleType("memvae_train_before_split")
    exec(compile(source, f"{BEFORE_SPLIT}:src/memvae/train.py", "exec"), module.__dict__)
    yield module.train
    patch.undo()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_engine_trains_exactly_as_the_loop_before_the_split(tmp_path, small_cifar, loop_before_split, name):
    cfg = variant(name, *VARIANTS[name])
    loop_before_split(cfg, tmp_path / "before", show_progress=False, data=small_cifar)
    train(cfg, tmp_path / "after", show_progress=False, data=small_cifar)
    before = strip_times(MetricsLog(tmp_path / "before" / "metrics.jsonl").read())
    after = strip_times(MetricsLog(tmp_path / "after" / "metrics.jsonl").read())
    assert [(r["kind"], r["step"]) for r in after] == [("train", 10), ("train", 20), ("eval", 20), ("train", 30),
                                                        ("train", 40), ("eval", 40)]
    assert after == before
    a, b = load_latest(tmp_path / "before" / "checkpoints"), load_latest(tmp_path / "after" / "checkpoints")
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "train_seconds":
            continue
        if key == "model":
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]) and a[key].keys() == b[key].keys()
        elif key == "optimizer":
            assert a[key]["param_groups"] == b[key]["param_groups"]
            for index, state in a[key]["state"].items():
                for field, value in state.items():
                    assert torch.equal(value, b[key]["state"][index][field]), (index, field)
        elif key == "rng_cpu":
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


# ------------------------------------------------------------------ host syncs
SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
PACKAGE = str(Path(memvae.__file__).parent)
# Sites allowed to read back during updates: none (the data initialisation reads its flag
# only until it has seen it set). Any site fails.
KNOWN: set = set()


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts, per (file, function, method), tensor reads called from memvae's own files
    while ``counting["on"]``; between two log records the engine turns it on (after one
    read point) and off (at the next), see the patches below."""
    found: collections.Counter = collections.Counter()
    counting = {"on": False, "reads": 0}

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                site = (caller.co_filename[len(PACKAGE) + 1:].replace("\\", "/"), caller.co_name, name)
                if counting["on"]:
                    found[site] += 1
                elif caller.co_name == "first_bad":
                    counting["reads"] += 1  # the read points do read: the counter sees them
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in SYNCS:
        wrap(name)
    real_settle, real_resume = engine.Trainer.settle, engine.Trainer.resume_clock

    def settle(self):
        counting["on"] = False
        return real_settle(self)

    def resume_clock(self):
        # From the first log record on: the first interval also holds the one-off reads of
        # the first forward pass (data initialisation), which are not per update.
        counting["on"] = self.step >= self.cfg.train.log_every and self.step < self.cfg.train.steps
        return real_resume(self)

    monkeypatch.setattr(engine.Trainer, "settle", settle)
    monkeypatch.setattr(engine.Trainer, "resume_clock", resume_clock)
    return found, counting


@pytest.mark.parametrize("name", list(VARIANTS))
def test_updates_between_log_records_read_nothing_from_the_device(tmp_path, small_cifar, sync_counter, name):
    found, counting = sync_counter
    train(variant(name, *VARIANTS[name]), tmp_path / "run", show_progress=False, data=small_cifar)
    assert counting["reads"] >= 4, "the counter missed the reads at the log records"
    unexpected = {site: n for site, n in found.items() if site not in KNOWN}
    assert not unexpected, f"host syncs per update: {unexpected}"


def test_a_nan_update_is_undone_on_the_device_and_reported_at_the_next_log(tmp_path, small_cifar, monkeypatch):
    """The guard without a per-update read: a NaN at update 13 (log every 10) in skip mode
    leaves weights, buffers and Adam's state as after update 12; the record of update 20
    counts it; in stop mode the run stops at update 20's read naming update 13, with no
    checkpoint or record written after update 12's."""
    from memvae.networks.encoder_decoder import Encoder

    real = Encoder.forward
    calls = {"n": 0}

    def forward(self, x):
        z = real(self, x)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 13:
                z = z * float("nan")
        return z

    monkeypatch.setattr(Encoder, "forward", forward)
    cfg = variant("vq_ema", "train.on_nonfinite=skip", "train.checkpoint_every=100")
    train(cfg, tmp_path / "twelve", show_progress=False, data=small_cifar, stop_after=12)
    calls["n"] = 0
    train(cfg, tmp_path / "thirteen", show_progress=False, data=small_cifar, stop_after=13)
    twelve, thirteen = load_latest(tmp_path / "twelve" / "checkpoints"), load_latest(tmp_path / "thirteen" / "checkpoints")
    for key in twelve["model"]:
        assert torch.equal(twelve["model"][key], thirteen["model"][key]), key
    for index, state in twelve["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, thirteen["optimizer"]["state"][index][field]), (index, field)

    calls["n"] = 0
    train(cfg, tmp_path / "skip", show_progress=False, data=small_cifar)
    assert [(r["step"], r["skipped"]) for r in MetricsLog(tmp_path / "skip" / "metrics.jsonl").read()
            if r["kind"] == "train"] == [(10, 0), (20, 1), (30, 0), (40, 0)]

    calls["n"] = 0
    stop = variant("vq_ema", "train.checkpoint_every=10")
    with pytest.raises(MemvaeError, match=r"^loss is nan at update 13; stopped"):
        train(stop, tmp_path / "stop", show_progress=False, data=small_cifar)
    assert load_latest(tmp_path / "stop" / "checkpoints")["step"] == 10
    assert [r["step"] for r in MetricsLog(tmp_path / "stop" / "metrics.jsonl").read()] == [10]
    dump = torch.load(tmp_path / "stop" / "nonfinite_step_00000013.pt", weights_only=True)
    # "The model before this update": the updates after the bad one were held back too.
    for key, value in dump["model"].items():
        assert torch.equal(value, twelve["model"][key]), key


def _trainer(tmp_path, data, *overrides):
    from memvae.training.distributed import Distributed

    cfg = C.load_config(CONFIGS / "smoke.toml", list(overrides))
    return engine.Trainer(cfg, data, Distributed.single(torch.device("cpu")), tmp_path)


@pytest.mark.parametrize("reconstruction", ["mse", "nmse"])
def test_the_reconstruction_term_is_the_mse_or_the_mse_over_the_training_pixels_variance(tmp_path, small_cifar,
                                                                                      reconstruction):
    from memvae.data import to_input

    trainer = _trainer(tmp_path, small_cifar, f"train.reconstruction={reconstruction}")
    x = to_input(small_cifar.train[:8])
    out = trainer.model(x)
    by_hand = ((out.reconstruction - x) ** 2).mean()
    weight = 1 / small_cifar.train_variance() if reconstruction == "nmse" else 1.0
    assert out.recon_mse.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(weight * by_hand.item() + out.bottleneck.loss.item(), rel=1e-6)
    if reconstruction == "nmse":  # about 16 on CIFAR-10: the reason IBQ and LFQ train under it
        assert 14 < weight < 18


def test_train_images_trains_on_the_first_n_and_draws_no_other(tmp_path, small_cifar):
    trainer = _trainer(tmp_path, small_cifar, "data.train_images=100", "train.batch_size=32")
    assert torch.equal(trainer.train_images, small_cifar.train[:100])
    drawn = torch.cat([trainer.batcher.next() for _ in range(10)])  # three epochs and more
    assert drawn.max() < 100 and len(set(drawn.tolist())) == 100
    with pytest.raises(MemvaeError, match="'data.train_images' is 2001, but the data has only 2000 training images"):
        _trainer(tmp_path, small_cifar, "data.train_images=2001")


@pytest.mark.parametrize(
    "bottleneck",
    [["bottleneck.kind=vq_ema"], ["bottleneck.kind=memory", "bottleneck.temperature=relative", "bottleneck.write=hard_ema",
                                  "bottleneck.encoder_gradient=straight_through", "bottleneck.reseed_fraction=0.25"]],
    ids=["vq_ema", "memory_discrete"],
)
def test_resume_at_update_k_ends_with_the_same_numbers(tmp_path, cifar, bottleneck):
    """Re-seeding draws random numbers every update: RNG state must be restored too."""
    cfg = C.load_config(CONFIGS / "smoke.toml", ["train.steps=60", "train.log_every=10", "train.eval_every=30",
                                                 "train.checkpoint_every=1000", *bottleneck])
    train(cfg, tmp_path / "straight", show_progress=False, data=cifar)
    train(cfg, tmp_path / "split", show_progress=False, stop_after=27, data=cifar)  # mid-interval
    assert load_latest(tmp_path / "split" / "checkpoints")["step"] == 27
    train(cfg, tmp_path / "split", resume=True, show_progress=False, data=cifar)
    a = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert strip_times(a) == strip_times(b)
    ma, mb = load_latest(tmp_path / "straight" / "checkpoints"), load_latest(tmp_path / "split" / "checkpoints")
    for key in ma["model"]:
        assert torch.equal(ma["model"][key], mb["model"][key]), key
