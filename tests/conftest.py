"""Shared fixtures: the real CIFAR-10 copy (../shared/data or $MEMVAE_DATA_DIR)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "memvae" / "config" / "packaged"


def quantiser(kind: str, codebook_size: int, dim: int, **kw):
    """A registered quantiser of ``kind`` with K = ``codebook_size`` codes (FSQ: levels whose
    product is K; the continuous control: no codes) and D = ``dim``, its other options ``kw``."""
    from memvae.quantizers import bottleneck_class

    if kind == "fsq":
        kw.setdefault("levels", {16: (4, 4), 32: (4, 4, 2), 64: (4, 4, 4), 512: (8, 8, 8)}[codebook_size])
        return bottleneck_class(kind)(dim=dim, **kw)
    if kind == "none":
        return bottleneck_class(kind)(dim=dim, **kw)
    if kind in ("vq", "memory", "mixture"):
        # Random slots, as these kinds started before "data" became every kind's default: with
        # data init a batch of N <= K positions reads itself, and the slots' first gradient is 0.
        kw.setdefault("init", "random")
    return bottleneck_class(kind)(codebook_size, dim, **kw)


def memory_read(codebook_size: int, dim: int, impl: str = "auto", init: str | None = None, fused_threshold: int = 1 << 22,
                chunk: int = 4096, **keys):
    """A MemoryRead from the memory kind's flat config keys (``similarity``, ``write``,
    ``tau_start``, ...: memvae's MemoryOptions) as a config builds it, plus the constructor's
    own speed settings; ValueError for what a config would refuse."""
    import dataclasses

    from memvae.quantizers.memory import MemoryRead
    from memvae.quantizers.memory_options import MemoryOptions, memory_parts

    b = dataclasses.replace(MemoryOptions(slots=codebook_size), **keys)
    b.check()
    addressing, write = memory_parts(b)
    # init None: random slots for the gradient write, data for the moving averages (as these tests were written).
    init = init or ("random" if b.write == "gradient" else "data")
    return MemoryRead(codebook_size, dim, addressing, write, train_read=b.train_read, eval_read=b.eval_read, impl=impl,
                      init=init, fused_threshold=fused_threshold, chunk=chunk)


def _data_dir() -> Path:
    env = os.environ.get("MEMVAE_DATA_DIR")
    return Path(env).resolve() if env else REPO.parent / "shared" / "data"


# Tests run commands in other folders (subprocesses, symlinked copies): a relative
# MEMVAE_DATA_DIR such as the README's ../shared/data must become absolute first.
if os.environ.get("MEMVAE_DATA_DIR"):
    os.environ["MEMVAE_DATA_DIR"] = str(_data_dir())


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (real trainings, torchrun, compare, prior fits; CI runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: a real training, torchrun, compare or prior fit (run with --run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.fail(f"the tests need CIFAR-10 in {path}/cifar-10-batches-py (set MEMVAE_DATA_DIR)")
    os.environ["MEMVAE_DATA_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def cifar(data_dir):
    """The real CIFAR-10, loaded once per session (about 2 s each time otherwise): pass it
    as ``train(..., data=cifar)`` instead of a data directory to load it again."""
    from memvae.data import load_cifar10

    return load_cifar10(data_dir, download=False)


@pytest.fixture(scope="session")
def small_cifar(cifar):
    """The first 2,000 training and 200 test images of the real CIFAR-10, in memory: runs
    that need no more skip measuring all 50,000."""
    from memvae.data import ImageData

    return ImageData(cifar.train[:2000], cifar.test[:200], cifar.train_labels[:2000], cifar.test_labels[:200])


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
