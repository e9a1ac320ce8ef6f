"""Where and how a run computes: the device, the ranks of a torchrun job and the few
collectives the loop needs (:class:`Distributed`), the settings under which a run repeats
its numbers (:func:`repeatable`) and the CPU thread count (:func:`choose_threads`)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from memvae.errors import MemvaeError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemvaeError(f"device {name!r} asked for, but no CUDA device is available")
    return device


# ------------------------------------------------------------------ distributed setup
class Distributed:
    """One process, or one of several launched by ``torchrun`` (DistributedDataParallel).

    Every rank walks the same permutation and takes its share ``batch[rank::world]`` of
    each global batch; only rank 0 writes the run directory. ``device`` is this rank's.
    """

    @classmethod
    def single(cls, device: torch.device) -> "Distributed":
        """This process alone on ``device``, whatever torchrun set (e.g. the prior's fit)."""
        self = cls.__new__(cls)
        self.rank, self.world, self.device = 0, 1, device
        return self

    def __init__(self, device_name: str = "auto"):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(device_name)
        if world > 1 and not dist.is_initialized():
            # The backend follows the device training runs on: NCCL for CUDA, gloo for
            # CPU, also on a machine that has a GPU.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(device)
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s minimum over ranks, in place, without reading it."""
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, in place, without reading it (a no-op on one process)."""
        if dist.is_initialized():
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any, so that all ranks take the same
        branch (a rank that stops or skips alone leaves the others waiting in a collective)."""
        if not dist.is_initialized():
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=self.device)).item() > 0)


# ------------------------------------------------------------------ repeatable numbers
@contextmanager
def repeatable(device: torch.device, deterministic: bool = False):
    """While training: the settings under which a run gives the same numbers every time
    at a fixed thread count; PyTorch's previous settings come back on exit.

    CPU, always: ``torch.use_deterministic_algorithms(True)``. With more than one thread,
    the backward of ``memory[idx]`` (VQ's codebook gradient: ``index_put_`` with
    ``accumulate=True``) adds rows from several threads with atomic float additions, in
    an order that changes from run to run; in deterministic mode PyTorch adds them one
    after another in index order, the order one thread uses, so 1-thread numbers do not
    change. Every other operation here was found repeatable at a fixed thread count (the
    thread count itself changes how convolutions and reductions split their sums, so
    1 and 2 threads give different, each repeatable, numbers). Uninitialised memory is not
    filled (``fill_uninitialized_memory``): nothing here reads it, and filling costs time.

    CUDA, with ``deterministic``: also cuDNN's deterministic algorithms without
    benchmarking, and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which
    must be set before the process first uses cuBLAS). Ops with no deterministic kernel
    warn (``warn_only``) rather than stop the run.
    """
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                det.fill_uninitialized_memory, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if device.type == "cpu" or deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            det.fill_uninitialized_memory = device.type != "cpu"
        if device.type == "cuda" and deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        det.fill_uninitialized_memory = previous[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[3], previous[4]


def default_threads() -> int:
    """The thread count of a new run when train.threads is 0: ``$OMP_NUM_THREADS`` where it is
    set (a cluster job's share of its cores, torchrun's 1), else 1.

    One, not torch's own default of one per core: a run whose threads outnumber the cores
    free to it (two runs side by side, or any other work on the machine) slows down several
    times over, as its threads wait on each other (memory_discrete on the busy 2-core
    machine at about the same load: 0.82–1.15 updates/s at 1 thread, 0.28 at 2; README,
    "What the two commands print, and how long they take"). More
    threads are for a machine known to be idle (--threads N). A fixed rule, not one read
    from the machine's load, because the count changes a run's numbers.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def choose_threads(requested: int, saved: int | None, step: int, resuming: bool) -> tuple[int, str | None]:
    """The CPU thread count to train with, and a one-line note when it breaks exactness.

    The thread count changes the numbers (how convolutions and sums split their work), so
    a resumed run keeps the count recorded in its checkpoint unless ``train.threads``
    asks for another; then the note says from which update the numbers differ.
    ``requested`` 0 means :func:`default_threads` for a new run (resuming: the recorded
    count; a checkpoint that records none, written when the default was torch's own
    count, continues with torch's count, the count it most likely had).
    """
    if not resuming:
        return requested or default_threads(), None
    if saved is None:
        threads = requested or torch.get_num_threads()
        return threads, (f"note: the checkpoint of update {step} does not record its thread count; if it was not "
                         f"{threads}, the numbers differ from update {step} on from an unbroken run")
    threads = requested or saved
    if threads != saved:
        return threads, (f"note: trained with {saved} threads up to update {step}, continuing with {threads}: the "
                         f"numbers differ from update {step} on from an unbroken run (set train.threads={saved} to keep them exact)")
    return threads, None


# ------------------------------------------------------------------ interval logging
