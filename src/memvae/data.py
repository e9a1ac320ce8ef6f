"""Image data: CIFAR-10 (official layout, downloaded when missing), image folders, and
the lossless-subset arrays; all held in memory as uint8 tensors N×3×H×W."""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memvae.errors import MemvaeError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILE = "test_batch"
DATA_DIR_ENV = "MEMVAE_DATA_DIR"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class ImageData:
    """Train and test images as uint8 tensors N×3×H×W, labels as int64 (-1 when none)."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor

    def train_variance(self) -> float:
        """Var of the training pixels on the [0, 1] scale: the denominator of NMSE."""
        return pixel_variance(self.train)


def pixel_variance(images: torch.Tensor) -> float:
    """Variance of all pixels of uint8 images, on the [0, 1] scale (float64 sums).

    Computed from the 256-bin histogram: exact, and without a float64 copy of the images
    (1.2 GB and 1.4 s for CIFAR-10's training set).
    """
    counts = torch.bincount(images.reshape(-1).cpu(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = (counts * values).sum() / counts.sum()
    return float((counts * (values - mean).pow(2)).sum() / counts.sum())


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W -> float32 in [-0.5, 0.5], the scale the networks see."""
    return images.float().div_(255.0).sub_(0.5)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Network output on the [-0.5, 0.5] scale -> uint8 images."""
    return ((x.detach().float() + 0.5).clamp(0, 1) * 255.0).round().to(torch.uint8)


def default_data_dir() -> Path:
    """$MEMVAE_DATA_DIR if set, else ~/.cache/memvae."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "memvae"


# ---------------------------------------------------------------- safe unpickling
def _numpy_reconstruct():
    core = getattr(np, "_core", None)
    multiarray = core.multiarray if core is not None else np.core.multiarray
    return multiarray._reconstruct


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a class or function outside the allowed list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only what CIFAR-10's batch files need: numpy's array
    reconstruction, ``numpy.ndarray`` and ``numpy.dtype``. Anything else (``os.system``,
    ``builtins.eval``, ...) is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ForbiddenGlobal(f"it asks for {module}.{name}, which a CIFAR-10 file never contains")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def safe_unpickle(path: Path) -> object:
    """Load a pickle through :class:`RestrictedUnpickler`; bad files raise MemvaeError."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as exc:
        raise MemvaeError(f"refusing to load {path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError,
            OverflowError) as exc:  # OverflowError: a damaged frame length beyond any size
        # Only a missing folder triggers a download (a missing file is an error): say so.
        detail = " ".join(str(exc).split())  # some pickle messages span two lines
        raise MemvaeError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {detail}); delete the folder {path.parent} to download a fresh copy"
        ) from None


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 batch file -> (uint8 N×3×32×32, int64 N)."""
    if not path.is_file():
        raise MemvaeError(f"CIFAR-10 file {path} is missing; the folder must hold data_batch_1..5 and test_batch")
    batch = safe_unpickle(path)
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise MemvaeError(f"{path} is not a CIFAR-10 batch: expected 'data' as uint8 N×3072")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        raise MemvaeError(f"{path} is not a CIFAR-10 batch: expected one label per image")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(labels, dtype=torch.int64)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar10(root: Path) -> Path:
    """Fetch the official archive into ``root``, check its MD5 and extract it.

    Nothing half-done is left behind: the download goes to a ``.part`` file and the
    extraction to a temporary folder that is renamed when complete, so an interrupted
    run is retried from scratch, and a failed download removes a ``root`` it created."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    if not archive.exists():
        partial = archive.with_suffix(".part")
        try:
            print(f"downloading CIFAR-10 from {CIFAR10_URL} to {root} ...", flush=True)
            urllib.request.urlretrieve(CIFAR10_URL, partial)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            if created:
                root.rmdir()  # a mistyped --data-dir should not leave an empty folder behind
            raise MemvaeError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({exc}); put the folder "
                f"{CIFAR10_FOLDER} (or cifar-10-python.tar.gz) there, or pass --data-dir / set {DATA_DIR_ENV}"
            ) from None
        partial.rename(archive)
    if _md5(archive) != CIFAR10_MD5:
        raise MemvaeError(f"{archive} has the wrong MD5 checksum (corrupt or incomplete download); delete it and retry")
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=root, prefix=".extracting-") as scratch:
        members = [m for m in tar.getmembers() if m.name.startswith(CIFAR10_FOLDER + "/") and m.isfile()]
        options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(scratch, members=members, **options)
        Path(scratch, CIFAR10_FOLDER).rename(root / CIFAR10_FOLDER)
    return root / CIFAR10_FOLDER


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> ImageData:
    """CIFAR-10 from ``data_dir`` (default :func:`default_data_dir`), which holds the
    folder ``cifar-10-batches-py`` (or is that folder). Downloads it when missing."""
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root if root.name == CIFAR10_FOLDER else root / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise MemvaeError(f"CIFAR-10 not found: {folder} does not exist")
        folder = download_cifar10(root)
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    return ImageData(
        train=torch.cat([images for images, _ in train]),
        test=test_images,
        train_labels=torch.cat([labels for _, labels in train]),
        test_labels=test_labels,
    )


# ---------------------------------------------------------------- image folders
def _load_image(path: Path, size: int) -> torch.Tensor:
    """One image file -> uint8 3×size×size (shorter side resized to ``size``, centre crop)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MemvaeError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_folder(folder: str | os.PathLike, size: int = 32) -> ImageData:
    """A folder of PNG/JPEG images as an ImageData of ``size``×``size`` images.

    If the folder has ``train/`` and ``test/`` subfolders those are the split; otherwise
    every tenth file in sorted order (at least one) is held out as the test set.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MemvaeError(f"image folder {folder} does not exist")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_files, test_files = _image_files(folder / "train"), _image_files(folder / "test")
    else:
        files = _image_files(folder)
        held_out = set(range(9, len(files), 10)) or {len(files) - 1}  # at least one test image
        train_files = [f for i, f in enumerate(files) if i not in held_out]
        test_files = [f for i, f in enumerate(files) if i in held_out]
    if not train_files or not test_files:
        raise MemvaeError(f"image folder {folder} has too few PNG/JPEG images (need at least 2: train and test)")
    train = torch.stack([_load_image(f, size) for f in train_files])
    test = torch.stack([_load_image(f, size) for f in test_files])
    no_labels = lambda n: torch.full((n,), -1, dtype=torch.int64)  # noqa: E731
    return ImageData(train, test, no_labels(len(train)), no_labels(len(test)))


def load_array_images(path: str | os.PathLike, key: str = "x_test") -> torch.Tensor:
    """uint8 N×H×W×3 array ``key`` of an .npz file (e.g. the lossless CIFAR-10 subset)
    -> uint8 N×3×H×W."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if key not in arrays:
                raise MemvaeError(f"{path} has no array {key!r}; it has {', '.join(arrays.files)}")
            array = arrays[key]
    except (OSError, ValueError, EOFError) as exc:
        raise MemvaeError(f"cannot read {path}: {exc}") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise MemvaeError(f"{path}:{key} must be uint8 N×H×W×3, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).contiguous()


def load_data(source: str, data_dir: str | os.PathLike | None, image_size: int = 32) -> ImageData:
    """The data a config names: ``source`` "cifar10" or "folder" (then ``data_dir`` is the folder)."""
    if source == "cifar10":
        return load_cifar10(data_dir)
    if source == "folder":
        if not data_dir:
            raise MemvaeError("data.source = 'folder' needs a folder: pass --data-dir")
        return load_image_folder(data_dir, image_size)
    raise MemvaeError(f"unknown data source {source!r}; known: cifar10, folder")


# ---------------------------------------------------------------- batches
class EpochBatcher:
    """Indices of training batches: a fresh permutation of all N images each epoch,
    consumed ``batch_size`` at a time (a batch may span two epochs).

    The permutation of epoch e depends only on (seed, e), so the whole state is the pair
    (epoch, position): cheap to checkpoint, exact to resume. It is drawn on the CPU
    generator whatever ``device`` is (the same order everywhere) and then held on
    ``device``, the images' device, moved once per epoch without waiting: each batch is
    then a slice of a tensor already there, with no copy and no host sync per batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0,
                 device: str | torch.device = "cpu"):
        if batch_size > n:
            raise MemvaeError(f"batch size {batch_size} is larger than the {n} training images")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, torch.device(device)
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=gen)
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous: the host does not wait for it.
            return perm.pin_memory().to(self.device, non_blocking=True)
        return perm.to(self.device)  # the same tensor on the CPU

    def next(self) -> torch.Tensor:
        """The next ``batch_size`` indices (int64, on ``device``)."""
        parts, need = [], self.batch_size
        while need:
            take = self._perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
