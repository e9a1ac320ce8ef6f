"""No training update waits for the host, seen at the level of aten ops, for every bottleneck.

tests/test_engine.py counts the Python ``Tensor`` methods that read a value back (``.item()``,
``float()``, ...); it cannot see what PyTorch does inside an op: ``torch.bincount`` reads
its largest code to size its output, ``nonzero``/``unique``/``masked_select`` read how many
results there are, and indexing a GPU tensor with a CPU index tensor copies the indices
over and waits. Here a ``TorchDispatchMode`` records every aten op of a few training
updates (through ``memvae.training.train``, as a run does them) of every packaged config, on the
smoke networks, and fails on

    bincount, nonzero, unique (all variants), masked_select, _local_scalar_dense (``.item()``
    and every other read of one value); an indexing op (index, index_select, gather,
    scatter, index_add, embedding_bag, ...) whose tensors are on different devices; indexing
    by a boolean mask (``x[mask]``: the dispatcher shows only ``index``, the ``nonzero``
    that sizes the result runs inside the kernel); a copy from the device to the host, and a
    blocking one from the host to the device.

On a CPU-only machine every tensor is on the CPU, so the device and copy rules can only
fail on a GPU (benchmarks/gpu_check.sh runs this file there); the op rules fail anywhere. The updates
recorded are those after the first log record: the first forward pass reads the slots'
initialisation flag once (base.Bottleneck._init_from_data), which is not per update.

One exception, CPU only: Adam's step count. Without ``capturable`` (the engine sets it on
CUDA, where the count lives on the GPU) Adam keeps the count in a CPU tensor and reads it
with ``.item()``; that reads host memory, not the device, and does not happen on CUDA.
"""
from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memvae.config import schema as C
from memvae.training import distributed, engine
from memvae.quantizers import REGISTRY
from memvae.data import EpochBatcher, ImageData
from memvae.training.train import train
from tests.conftest import CONFIGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORBIDDEN = {"bincount", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
             "unique_dim_consecutive", "masked_select", "_local_scalar_dense"}
INDEXING = ("index", "gather", "scatter", "take", "embedding", "put")
MASKABLE = {"index", "index_put", "index_put_", "_index_put_impl_"}  # take a list of index tensors, which may be masks
SMOKE = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16",
         "data.eval_images=32", "train.steps=12", "train.log_every=4", "train.eval_every=12",
         "train.checkpoint_every=12", "train.batch_size=8", f"train.device={DEVICE}", "train.threads=1"]
EXTRA = {"fsq": ["bottleneck.levels=4,4,4"]}
# Packaged configs, plus the top-k read of the memory in its two settings.
VARIANTS = {path.stem: [*SMOKE, *EXTRA.get(path.stem, [])] for path in sorted(CONFIGS.glob("*.toml"))}
VARIANTS["memory_discrete_top_k"] = [*SMOKE, "bottleneck.top_k=8"]
VARIANTS["memory_l2_top_k"] = [*SMOKE, "bottleneck.top_k=8"]


def config(name: str) -> C.Config:
    path = CONFIGS / f"{name.removesuffix('_top_k')}.toml"
    small = ["bottleneck.slots=64"] if "slots" in C.to_dict(C.load_config(path))["bottleneck"] else []  # none has no slots
    return C.load_config(path, [*small, *VARIANTS[name]])


def from_adam_step_count(stack: list[traceback.FrameSummary]) -> bool:
    return DEVICE == "cpu" and any(f.filename.replace("\\", "/").endswith("torch/optim/adam.py") for f in stack)


class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched while active: counts per op name, and the forbidden ones
    with the memvae line that called them."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.problems: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        problem = None
        if name in FORBIDDEN:
            problem = name
        elif any(word in name for word in INDEXING):
            devices = {str(t.device) for t in _tensors((args, kwargs))}
            if len(devices) > 1:
                problem = f"{name} across devices {sorted(devices)}"
            elif name in MASKABLE and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
                problem = f"{name} by a boolean mask"
        elif name in ("_to_copy", "copy_"):
            problem = _waiting_copy(name, args, kwargs)
        if problem:
            stack = traceback.extract_stack()[:-1]
            if not (name == "_local_scalar_dense" and from_adam_step_count(stack)):
                mine = [f for f in stack if "/memvae/" in f.filename.replace("\\", "/")]
                where = f"{mine[-1].filename.rsplit('/', 1)[-1]}:{mine[-1].lineno} {mine[-1].name}" if mine else "outside memvae"
                self.problems[f"{problem} from {where}"] += 1
        return func(*args, **kwargs)


def _waiting_copy(name: str, args: tuple, kwargs: dict) -> str | None:
    """What is wrong with a copy between devices that makes the host wait, or None."""
    if name == "_to_copy":
        source, target = args[0].device, torch.device(kwargs.get("device") or args[0].device)
        non_blocking = kwargs.get("non_blocking", False)
    else:
        target, source = args[0].device, args[1].device
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    if source == target:
        return None
    if target.type == "cpu":
        return f"{name} from {source} to the host"
    return None if non_blocking else f"blocking {name} from {source} to {target}"


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


@pytest.fixture(scope="module")
def images() -> ImageData:
    """Random images: the ops do not depend on what the pixels are. 40 training images make
    an epoch of 5 batches, so the recorded updates cross an epoch boundary (a new
    permutation moved to the device)."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (72, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.zeros(72, dtype=torch.int64)
    return ImageData(pixels[:40], pixels[40:], labels[:40], labels[40:])


def test_the_recorder_sees_what_it_looks_for():
    """Each rule fires on the CPU ("meta" stands in for a GPU); a plain index does not."""
    x = torch.arange(6.0)
    with OpRecorder() as recorder:
        torch.bincount(torch.tensor([1, 2]))
        x[x > 2]
        x.sum().item()
        torch.empty(10, device="meta")[torch.tensor([1, 2])]
        x.to("meta")
        x.to("meta", non_blocking=True)
        x[torch.tensor([1, 2])]
    assert sorted(p.rsplit(" from ", 1)[0] for p in recorder.problems) == [
        "_local_scalar_dense", "bincount", "blocking _to_copy from cpu to meta", "index across devices ['cpu', 'meta']",
        "index by a boolean mask"]


def test_every_registered_bottleneck_is_covered():
    kinds = {config(name).bottleneck.kind for name in VARIANTS}
    assert kinds == set(REGISTRY), f"no packaged config for {set(REGISTRY) - kinds}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_updates_run_no_host_read_and_no_data_dependent_shape(tmp_path, images, monkeypatch, name):
    cfg = config(name)
    recorder = OpRecorder()
    recorded = []
    real_update = engine.Trainer.update

    def update(self):
        # After the first log record and before the last update: the per-update hot path.
        if not cfg.train.log_every <= self.step < cfg.train.steps - 1:
            return real_update(self)
        recorded.append(self.step + 1)
        with recorder:
            return real_update(self)

    monkeypatch.setattr(engine.Trainer, "update", update)
    train(cfg, tmp_path / "run", show_progress=False, data=images)
    assert recorded == list(range(cfg.train.log_every + 1, cfg.train.steps))
    assert recorder.ops["convolution"] or recorder.ops["mkldnn_convolution"] or recorder.ops["cudnn_convolution"], \
        "the recorder saw no forward pass"
    assert not recorder.problems, f"{name}: {dict(recorder.problems)}"


def test_batch_indices_live_on_the_data_device_in_todays_order():
    """The permutation is drawn on the CPU as before and only then moved: the same batches,
    epoch after epoch, and after a resume. ("meta" stands in for a GPU on a CPU machine.)"""
    cpu, meta = EpochBatcher(10, 4, seed=3), EpochBatcher(10, 4, seed=3, device="meta")
    for _ in range(7):
        a, b = cpu.next(), meta.next()
        assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype
    assert cpu.state_dict() == meta.state_dict()
    # Values: a CPU batcher built the way the engine builds it gives the same order as the default.
    default, explicit = EpochBatcher(10, 4, seed=3), EpochBatcher(10, 4, seed=3, device=torch.device("cpu"))
    assert all(torch.equal(default.next(), explicit.next()) for _ in range(7))
    resumed = EpochBatcher(10, 4, seed=3, device="cpu")
    resumed.load_state_dict(default.state_dict())
    assert all(torch.equal(default.next(), resumed.next()) for _ in range(7))


def test_prior_updates_run_no_host_read(tmp_path):
    """The prior's updates (memvae.prior.fit.PriorTrainer, on the engine's loop) on random maps."""
    from memvae.networks.pixelcnn import GatedPixelCNN
    from memvae.prior.fit import PriorOptions, PriorTrainer

    options = PriorOptions(steps=8, batch_size=4, width=8, layers=2, device=DEVICE)
    codes = torch.randint(16, (20, 8, 8), generator=torch.Generator().manual_seed(0))
    ranks = distributed.Distributed.single(torch.device(DEVICE))
    trainer = PriorTrainer(GatedPixelCNN(16, 8, 2).to(DEVICE), options, codes, codes[:4], tmp_path, ranks,
                           {"num_slots": 16, "map_shape": [8, 8], "model_step": 0})
    trainer.update()  # the first: Adam creates its state
    recorder = OpRecorder()
    with recorder:
        for _ in range(5):
            trainer.update()
    assert recorder.ops["convolution"] or recorder.ops["mkldnn_convolution"] or recorder.ops["cudnn_convolution"]
    assert not recorder.problems, dict(recorder.problems)
    trainer.settle()
    assert trainer.record()["step"] == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "the device and copy rules of these tests can only fire on a GPU: on this CPU-only machine every "
    "tensor is on the host, so they were not checked (benchmarks/gpu_check.sh runs this file on a GPU)"))
def test_the_device_and_copy_rules_are_live_on_this_gpu():
    """Says in the run whether the training tests above checked the device rules: here, on a
    GPU, a copy of a device tensor to the host and a blocking copy to the device are seen."""
    x = torch.arange(4.0, device="cuda")
    with OpRecorder() as recorder:
        x.cpu()
        torch.arange(4.0).to("cuda")
    assert sorted(p.rsplit(" from ", 1)[0] for p in recorder.problems) == ["_to_copy", "blocking _to_copy"], recorder.problems
