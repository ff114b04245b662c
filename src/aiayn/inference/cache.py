"""The decoder's key/value cache for incremental decoding (one new position per search step).

The paper's decoder (§3.1) is auto-regressive: position t attends to positions ≤ t. A search
that emits one token per step would recompute every earlier position's keys and values at
every step; the cache keeps them. `aiayn.inference.step.decode_step` reads and extends it.

    KeyValueBuffer  one self-attention layer's keys and values, preallocated, written in place
    DecoderCache    every layer's buffer, plus the encoder-decoder keys and values (computed once)
"""

from __future__ import annotations

import torch
from torch import Tensor

SPLIT_REORDER = 262_144  # elements per key (or value) tensor from which a reorder is split across threads


class KeyValueBuffer:
    """One self-attention layer's keys and values of the positions decoded so far.

    Preallocated and written in place: appending a step copies only the new position, where
    ``torch.cat`` would copy the whole history every step. The layout is (L, N, h, d_k), time
    first, so the first ``length`` positions are one contiguous block: reordering the rows
    (beams) writes into a second block with ``index_select(out=...)``, without allocating, and
    attention reads a permuted view (N, h, length, d_k) whose innermost axis is contiguous, as
    the fused attention kernels want. Capacity doubles when full (amortised: each position is
    copied O(1) times), so memory stays within 2x of what the positions need.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = max(1, capacity)
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._spare: tuple[Tensor, Tensor] | None = None  # the other block, for reordering

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``t`` new positions (k, v: (N, h, t, d_k)); returns all keys and values so far,
        (N, h, length, d_k) views."""
        n, h, t, d = k.shape
        end = self.length + t
        if self.k is None or end > self.k.size(0) or self.k.size(1) != n:
            self._resize(max(end, 2 * self.k.size(0) if self.k is not None else self.capacity), n, h, d, k)
        self.k[self.length : end].copy_(k.permute(2, 0, 1, 3))
        self.v[self.length : end].copy_(v.permute(2, 0, 1, 3))
        self.length = end
        return self.k[:end].permute(1, 2, 0, 3), self.v[:end].permute(1, 2, 0, 3)

    def _resize(self, capacity: int, n: int, h: int, d: int, like: Tensor) -> None:
        k = like.new_empty(capacity, n, h, d)
        v = like.new_empty(capacity, n, h, d)
        if self.k is not None:
            k[: self.length].copy_(self.k[: self.length])
            v[: self.length].copy_(self.v[: self.length])
        self.k, self.v, self._spare = k, v, None

    def reorder(self, index: Tensor) -> None:
        """Rows ``index`` of the current rows (beams after a search step, or fewer rows)."""
        if self.k is None:
            return
        length, n = self.length, index.numel()
        if self.k.requires_grad:  # autograd cannot record out=: the plain (allocating) form
            self.k, self.v, self._spare = self.k.index_select(1, index), self.v.index_select(1, index), None
            return
        cap, _, h, d = self.k.shape
        if self._spare is None or self._spare[0].size(1) != n:
            self._spare = (self.k.new_empty(cap, n, h, d), self.v.new_empty(cap, n, h, d))
        k, v = self._spare
        # Large reorders copy rows of the (N, L, h, d) views instead: index_select along dim 1
        # runs on one thread, along dim 0 torch splits it across threads. Below SPLIT_REORDER
        # elements, or on one thread, the split costs more than it saves (benchmarks/RESULTS.md).
        split = length * n * h * d >= SPLIT_REORDER and torch.get_num_threads() > 1
        for old, new in ((self.k, k), (self.v, v)):
            if split:
                torch.index_select(old[:length].transpose(0, 1), 0, index, out=new[:length].transpose(0, 1))
            else:
                torch.index_select(old[:length], 1, index, out=new[:length])
        # The old block becomes the spare only if it has the new row count.
        self._spare = (self.k, self.v) if self.k.size(1) == n else None
        self.k, self.v = k, v


class DecoderCache:
    """Keys and values kept between the steps of incremental decoding.

    Self-attention entries (`KeyValueBuffer`) grow by one position per step and follow the
    hypotheses (rows) of the decoder batch. Encoder-decoder entries are computed once and follow
    the sentences. ``capacity``: the number of target positions expected (the buffers grow
    beyond it if needed).
    """

    def __init__(self, n_layers: int, capacity: int = 16):
        self.layers = [{"self": KeyValueBuffer(capacity), "cross": {}} for _ in range(n_layers)]
        self.offset = 0  # number of target positions already decoded

    def reorder(self, index: Tensor) -> None:
        """Reorder (or select) decoder rows, e.g. beams after a beam-search step."""
        for layer in self.layers:
            layer["self"].reorder(index)

    def select_sentences(self, index: Tensor) -> None:
        """Keep only these sentences' encoder-decoder keys and values (finished ones leave)."""
        for layer in self.layers:
            for key in ("k", "v"):
                if key in layer["cross"]:
                    layer["cross"][key] = layer["cross"][key].index_select(0, index)
