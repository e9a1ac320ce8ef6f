"""The non-finite guard: a non-finite loss or gradient undone on the device, read only at
log points (:class:`NonfiniteGuard`)."""
from __future__ import annotations

import torch

from memvae.training.distributed import Distributed


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """destinations[i] ← sources[i], in one call where torch has it (fewer dispatches)."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(destinations, sources)
    else:  # pragma: no cover - torch < 2.1
        for d, s in zip(destinations, sources):
            d.copy_(s)


class NonfiniteGuard:
    """Keeps a non-finite loss from reaching the weights without reading it per update,
    the way ``torch.amp.GradScaler`` skips a step: on the device.

    Each update takes its backward pass and Adam step whatever the loss; then, in place,
    ``torch.where(ok, new, old)`` puts back the weights, Adam's state and the buffers the
    forward pass wrote (moving-average slots, data initialisation) wherever ``ok`` (the
    loss and the gradients finite on every rank) is false. A finite update is untouched, to the bit. In stop
    mode (``train.on_nonfinite = "stop"``) ``ok`` stays false after the first bad update,
    so the model stays as it was before it until the loop reads the flags
    (:meth:`first_bad`, at the next log, evaluation, checkpoint or stop) and stops.

    The price is a copy of the weights and Adam's state per update and the ``where``
    over them (measured in docs/benchmarks.md). Adam's state is created by its first step;
    a first update that is undone leaves it all zeros, which is how Adam starts it. On
    CUDA, Adam's step counts live on the GPU (``capturable``), so that ``ok`` never
    has to come to the host.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ranks: Distributed, stop: bool):
        self.model, self.optimizer, self.ranks, self.stop = model, optimizer, ranks, stop
        self.clean = torch.ones((), dtype=torch.bool, device=ranks.device)  # no bad update yet (stop mode)
        self.pending: list[tuple] = []  # (update, ok, {name: measure}, batch indices) since the last read
        self._saved: list[torch.Tensor] = []  # weights and Adam's state before the current step

    def ok(self, loss: torch.Tensor) -> torch.Tensor:
        """Device bool, after the backward pass: apply this update (``loss`` and every gradient
        finite on every rank; in stop mode, and no bad one before). The gradients are checked
        by one reduction of their norms on the device: a finite loss can still give an
        infinite gradient (an overflow in the backward pass)."""
        ok = torch.isfinite(loss.detach())
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if self.ranks.world > 1:
            ok = self.ranks.min_(ok.to(torch.int32)).bool()
        if self.stop:
            ok = ok & self.clean
            self.clean = ok
        return ok

    def buffers(self) -> list[torch.Tensor]:
        """Copies of the buffers, before the forward pass writes them."""
        return [b.clone() for b in self.model.buffers()]

    @torch.no_grad()
    def step(self, ok: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        """The optimizer step, undone in place (with the forward pass's buffer writes) unless ``ok``."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        live = params + [v for p in params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        if [(t.shape, t.dtype, t.device) for t in self._saved] != [(t.shape, t.dtype, t.device) for t in live]:
            self._saved = [torch.empty_like(t) for t in live]  # kept from update to update: no allocation per update
        _copy_all(self._saved, live)
        fresh = [p for p in params if not self.optimizer.state.get(p)]
        self.optimizer.step()  # in place: ``live`` now holds the new values
        for new, old in zip(live, self._saved):
            torch.where(ok, new, old, out=new)
        for p in fresh:  # Adam's state created by this step goes back to zeros, as Adam starts it
            for value in self.optimizer.state[p].values():
                if torch.is_tensor(value):
                    torch.where(ok, value, torch.zeros_like(value), out=value)
        for b, old in zip(self.model.buffers(), buffers):
            torch.where(ok, b, old, out=b)

    def remember(self, update: int, ok: torch.Tensor, measures: dict[str, torch.Tensor], indices: torch.Tensor) -> None:
        """Keep update ``update``'s flag, its ``measures`` (device scalars: the loss and its
        parts) and batch indices until the next :meth:`first_bad`, unread."""
        self.pending.append((update, ok, {k: v.detach() for k, v in measures.items()}, indices))

    def first_bad(self) -> dict | None:
        """Read the flags of the updates since the last read (one host sync) -> the first
        update not applied ({"step", each remembered measure as a float, "batch_indices"}),
        or None."""
        pending, self.pending = self.pending, []
        if not pending:
            return None
        oks = torch.stack([p[1] for p in pending]).tolist()
        if all(oks):
            return None
        update, _, measures, indices = pending[oks.index(False)]
        return {"step": update, **{k: float(v) for k, v in measures.items()}, "batch_indices": indices}


