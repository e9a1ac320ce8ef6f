"""The memory read's top-k kernel (product-key memories, Lample et al. 2019): each query
reads only its k largest logits, at a cost of N·k, not N·K, past the one N×K×D product that
finds them. The maths are in :class:`~memvae.quantizers.memory.MemoryRead`'s docstring.

A part of MemoryRead (a mixin: it reads the module's ``top_k``, ``similarity``,
``codebook_size``, ``scores``, ``logits`` and ``_chunk_rows``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memvae.quantizers import functional as Fn

# In training, the top-k read's outside mass is measured on at most this many queries.
OUTSIDE_MASS_ROWS = 256


class TopKRead:
    @torch.no_grad()
    def _top_k_scores(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's k largest β-free scores (:meth:`scores`), N×k largest first, and
        their slots, N×k int64: one N×K×D product, chunk by chunk (at most
        ``fused_threshold`` scores at a time, into one buffer reused by every chunk).

        β > 0 scales every score of a row alike, so these are the slots of the k largest
        logits whatever β turns out to be: the relative temperature's β, which needs the
        nearest distances (the largest scores) first, costs no second product.
        """
        rows = self._chunk_rows(x.shape[0])
        buffer = x.new_empty(rows, self.codebook_size, dtype=torch.float32)
        parts = [self.scores(part, memory, out=buffer[: part.shape[0]]).topk(self.top_k, dim=1) for part in x.split(rows)]
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

    def _top_logits(self, x: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor, top_scores: torch.Tensor,
                    slots: torch.Tensor) -> torch.Tensor:
        """The N×k logits of the selected slots: β times their scores, or, when a gradient
        is wanted, recomputed from the N×k×D gathered slots, so that z, M and β get theirs
        through these k logits only (N·k·D, not the N×K product's backward)."""
        if not torch.is_grad_enabled():
            return beta * top_scores
        n, k = slots.shape
        m = memory.float().index_select(0, slots.reshape(-1)).view(n, k, -1)
        q = x.float()[:, :, None]
        if self.similarity == "l2":
            return beta * (2.0 * torch.bmm(m, q).squeeze(2) - m.pow(2).sum(2))
        return beta * torch.bmm(F.normalize(m, dim=2), F.normalize(q, dim=1)).squeeze(2)

    @torch.no_grad()
    def _outside_mass(self, x: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor, top: torch.Tensor,
                      slots: torch.Tensor) -> torch.Tensor:
        """The dense softmax's mass outside each query's k slots, N (from N×D queries and
        their N×k logits and slots): a second N×K product, chunked as :meth:`_top_k_scores`.

        Summed over the K − k slots left out (their exp shifted by the row's largest
        logit), not taken as 1 − Σ inside: the logits run to thousands at the end of the τ
        schedule, where 1 − Σ would leave only the rounding of the sum.
        """
        rows = self._chunk_rows(x.shape[0])
        out = []
        for part, part_top, part_slots in zip(x.split(rows), top.split(rows), slots.split(rows)):
            peak = part_top[:, :1]
            rest = self.logits(part, memory, beta).sub_(peak).exp_().scatter_(1, part_slots, 0.0).sum(1)
            inside = (part_top - peak).exp().sum(1)
            out.append(rest / (rest + inside))
        return torch.cat(out)

    def _top_k_read(self, x: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor, top_scores: torch.Tensor,
                    slots: torch.Tensor, mode: str, want_write: bool):
        """The top-k read of N×D queries (see the class docstring) from their k largest
        β-free scores and slots (:meth:`_top_k_scores`).

        Returns (codes N, stats dict of sums over N with ``outside_mass``, read N×D, and
        the soft write's counts K and sums K×D from the k weights, or None, None).
        """
        top = self._top_logits(x, memory, beta, top_scores, slots)
        w = top.softmax(1)
        stats, best = Fn.weight_statistics(top, w)
        n = x.shape[0]
        # In training the outside mass, a diagnostic, is measured on every s-th query only
        # (at most OUTSIDE_MASS_ROWS): on all N it would cost a second N×K product, as much
        # as the read itself. Evaluation measures it on every query.
        step = -(-n // OUTSIDE_MASS_ROWS) if self.training else 1
        outside = self._outside_mass(x[::step], memory, beta, top.detach()[::step], slots[::step])
        stats["outside_mass"] = outside.mean() * n
        idx = slots.gather(1, best[:, None]).squeeze(1)
        if mode == "hard":
            read = memory.index_select(0, idx)
        else:
            # The weighted sum of the k slots in one kernel: no N×k×D copy of the slots.
            read = F.embedding_bag(slots, memory, per_sample_weights=w, mode="sum")
            if mode == "straight_through":
                read = Fn.straight_through(read, memory.index_select(0, idx))
        counts = sums = None
        if want_write:
            wd, flat = w.detach(), slots.reshape(-1)
            counts = torch.zeros(self.codebook_size, device=x.device).index_add_(0, flat, wd.reshape(-1))
            weighted = (wd[:, :, None] * x.detach().float()[:, None, :]).reshape(-1, x.shape[1])
            sums = torch.zeros(self.codebook_size, x.shape[1], device=x.device).index_add_(0, flat, weighted)
        return idx, stats, read, counts, sums
