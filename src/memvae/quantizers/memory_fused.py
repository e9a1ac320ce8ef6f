"""The memory read's kernels that never hold the N×K weights: the fused read (through
``F.scaled_dot_product_attention``) and the statistics taken chunk by chunk beside it.

A part of :class:`~memvae.quantizers.memory.MemoryRead` (a mixin: it reads the module's
``similarity``, ``codebook_size``, ``dim``, ``chunk``, ``fused_threshold`` and ``logits``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memvae.quantizers import functional as Fn


class FusedRead:
    def _fused_read(self, x: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Σ_k softmax_k(β·s) M_k without the N×K matrix: N×D -> N×D.

        The fused kernels of ``F.scaled_dot_product_attention`` (flash attention on CPU and
        CUDA, memory-efficient attention on CUDA) take only 4-D inputs whose query, key and
        value share one width, a multiple of 8; anything else falls back, silently, to the
        math kernel, which holds the N×K weights. So q, k and M are zero-padded to that
        width (zeros add nothing to q·k, and the padded output columns are dropped) and
        passed as 1×1×N×W.
        """
        x, memory = x.float(), memory.float()
        if self.similarity == "l2":
            q = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            k = torch.cat([2.0 * beta * memory, -beta * memory.pow(2).sum(1, keepdim=True)], 1)
        else:
            q, k = F.normalize(x, dim=1), beta * F.normalize(memory, dim=1)
        width = -(-q.shape[1] // 8) * 8
        q, k, v = (F.pad(t, (0, width - t.shape[1]))[None, None] for t in (q, k, memory))
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)[0, 0, :, : memory.shape[1]]

    def _chunk_rows(self, n: int) -> int:
        """Queries per chunk when N×K scores are taken chunk by chunk: at most ``chunk``, and
        at most ``fused_threshold`` scores at a time, however large K is (at least 1, at most N)."""
        return max(1, min(self.chunk, self.fused_threshold // self.codebook_size, n))

    @torch.no_grad()
    def _chunked_statistics(self, x: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor, want_write: bool):
        """Codes, weight statistics and (optionally) soft-write sums, chunk by chunk.

        Returns (codes N, stats dict of sums over N, counts K or None, sums K×D or None).
        """
        codes, stats = [], {}
        counts = torch.zeros(self.codebook_size, device=x.device) if want_write else None
        sums = torch.zeros(self.codebook_size, self.dim, device=x.device) if want_write else None
        rows = self._chunk_rows(x.shape[0])
        for part in x.split(rows):
            logits = self.logits(part, memory, beta)
            w = logits.softmax(1)
            part_stats, part_codes = Fn.weight_statistics(logits, w)
            codes.append(part_codes)
            for key, value in part_stats.items():
                stats[key] = stats.get(key, 0.0) + value
            if want_write:
                counts += w.sum(0)
                sums += w.t() @ part.float()
        return torch.cat(codes), stats, counts, sums
