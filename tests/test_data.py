"""CIFAR-10 and image-folder loading, on the real shared copy."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memvae.data import (
    EpochBatcher,
    load_array_images,
    load_cifar10,
    load_image_folder,
    safe_unpickle,
    to_input,
    to_uint8,
)
from memvae.errors import MemvaeError


def test_shared_copy_loads_as_50000_plus_10000_balanced_images(cifar):
    assert cifar.train.shape == (50000, 3, 32, 32) and cifar.train.dtype == torch.uint8
    assert cifar.test.shape == (10000, 3, 32, 32) and cifar.test.dtype == torch.uint8
    assert torch.equal(torch.bincount(cifar.train_labels), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(cifar.test_labels), torch.full((10,), 1000))
    # The README of the shared copy gives the training-pixel variance.
    assert abs(cifar.train_variance() - 0.06271) < 5e-4


def test_layout_matches_the_lossless_originals(cifar, data_dir):
    """Channel-major rows must become 3×32×32 the right way round: compare with the
    lossless originals of the first test images, up to the JPEG error (~5.8/255)."""
    originals = load_array_images(data_dir / "cifar10-lossless-subset.npz", "x_test")
    assert originals.shape == (1000, 3, 32, 32)
    error = (cifar.test[:1000].float() - originals.float()).abs().mean()
    assert error < 10, f"mean abs error {error} is far above the JPEG error: layout wrong"
    transposed = (cifar.test[:1000].float() - originals.transpose(2, 3).float()).abs().mean()
    assert transposed > 2 * error


def _copy_cifar(src: Path, dst: Path) -> Path:
    folder = dst / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (src / "cifar-10-batches-py").iterdir():
        os.symlink(f, folder / f.name)
    return folder


def test_crafted_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(MemvaeError, match=r"refusing to load .*posix.system|refusing to load .*os.system"):
        safe_unpickle(path)
    assert not marker.exists()


def test_crafted_batch_inside_a_data_folder_is_refused(tmp_path, data_dir):
    folder = _copy_cifar(data_dir, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    (folder / "test_batch").unlink()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Exploit()}))
    with pytest.raises(MemvaeError, match="refusing to load"):
        load_cifar10(tmp_path, download=False)
    assert not marker.exists()


def test_truncated_batch_file_gives_a_clear_error(tmp_path, data_dir):
    folder = _copy_cifar(data_dir, tmp_path)
    original = (data_dir / "cifar-10-batches-py" / "data_batch_3").read_bytes()
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_3").write_bytes(original[: len(original) // 2])
    with pytest.raises(MemvaeError, match=r"data_batch_3 is truncated or corrupt"):
        load_cifar10(tmp_path, download=False)


def test_missing_batch_file_and_missing_folder(tmp_path, data_dir):
    folder = _copy_cifar(data_dir, tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(MemvaeError, match="data_batch_5 is missing"):
        load_cifar10(tmp_path, download=False)
    with pytest.raises(MemvaeError, match="not found"):
        load_cifar10(tmp_path / "nowhere", download=False)


def test_offline_download_fails_with_one_line_saying_where_to_put_the_data(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(MemvaeError) as info:
        load_cifar10(tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message and "cifar-10-batches-py" in message and str(tmp_path / "empty") in message
    assert not (tmp_path / "empty").exists()  # no .part file, and no empty folder from a mistyped path


def test_download_extracts_the_archive_and_loads_it(tmp_path, monkeypatch, cifar):
    """The whole download path, with the archive served from a local file:// URL."""
    import hashlib
    import tarfile

    from memvae import data as data_module

    source = Path(os.environ["MEMVAE_DATA_DIR"]) / "cifar-10-batches-py"
    served = tmp_path / "served.tar"  # uncompressed: tarfile opens either, and it is quick
    with tarfile.open(served, "w") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    monkeypatch.setattr(data_module, "CIFAR10_URL", served.as_uri())
    monkeypatch.setattr(data_module, "CIFAR10_MD5", hashlib.md5(served.read_bytes()).hexdigest())
    loaded = load_cifar10(tmp_path / "cache")
    assert torch.equal(loaded.test, cifar.test) and torch.equal(loaded.train_labels, cifar.train_labels)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_downloaded_archive_with_wrong_checksum_is_refused(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(MemvaeError, match="wrong MD5"):
        load_cifar10(tmp_path)


def test_image_folder_is_resized_cropped_and_split(tmp_path, cifar):
    rng = np.random.default_rng(0)
    for i in range(20):
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(tmp_path / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    data = load_image_folder(tmp_path, size=16)
    assert data.train.shape == (18, 3, 16, 16) and data.test.shape == (2, 3, 16, 16)
    # A 32×32 PNG at size 32 comes back unchanged.
    exact = tmp_path / "exact"
    (exact / "train").mkdir(parents=True)
    (exact / "test").mkdir()
    image = cifar.test[0].permute(1, 2, 0).numpy()
    Image.fromarray(image).save(exact / "train" / "a.png")
    Image.fromarray(image).save(exact / "test" / "b.png")
    same = load_image_folder(exact, size=32)
    assert torch.equal(same.train[0], cifar.test[0])


def test_image_folder_errors(tmp_path):
    with pytest.raises(MemvaeError, match="too few"):
        load_image_folder(tmp_path)
    (tmp_path / "a.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MemvaeError, match="cannot read image"):
        load_image_folder(tmp_path)


def test_scaling_round_trip():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x = to_input(images)
    assert x.min() >= -0.5 and x.max() <= 0.5
    assert torch.equal(to_uint8(x), images)


def test_batcher_visits_every_image_once_per_epoch_and_resumes_exactly():
    batcher = EpochBatcher(10, 4, seed=3)
    first_epoch = torch.cat([batcher.next() for _ in range(2)] + [batcher.next()[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))
    a = EpochBatcher(10, 4, seed=3)
    for _ in range(5):
        a.next()
    b = EpochBatcher(10, 4, seed=3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next(), b.next()) for _ in range(7))
    with pytest.raises(MemvaeError, match="larger than"):
        EpochBatcher(10, 11, seed=0)
