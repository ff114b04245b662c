"""Token-based batches (paper §5.1) and the tensors a batch becomes.

"Sentence pairs were batched together by approximate sequence length. Each training batch
contained a set of sentence pairs containing approximately 25000 source tokens and 25000
target tokens." So a batch is bounded by tokens, not sentences, and pairs of similar length
go together to keep padding low.

Budget: a batch of n pairs pads every source to the longest source and every target to the
longest target, so it costs n * max(S, T) positions per side, where S and T count the added
eos/bos (len + 1). We keep ``n * max(S, T) <= max_tokens``; a single pair longer than the
budget gets a batch of its own rather than being dropped.

Order: each epoch draws a permutation from ``seed + epoch``, sorts pairs by length with that
permutation breaking ties (so batch composition changes between epochs), cuts the sorted
list greedily into batches, and shuffles the batch order with the same generator. The result
depends only on (lengths, max_tokens, seed, epoch), so every DDP process computes the same
list and takes every N-th batch, and a run resumed from ``state_dict()`` continues with
exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by `collate`, so that `aiayn prepare` (which never makes a
    import torch  # batch) does not load it: 200 MB and a second of start-up

from .tokenizer import BOS_ID, EOS_ID, PAD_ID


def _as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Lengths as a flat integer array: int32 kept as it is (4 bytes a pair: what a dataset of
    tens of millions of pairs gives), anything else as int64."""
    array = np.asarray(lengths).reshape(-1)
    return array if array.dtype == np.int32 else array.astype(np.int64)


def length_order(src_lens: np.ndarray, tgt_lens: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Pair indices by (max(S, T), S, T), ties by ``tiebreak`` (a permutation: the values rank
    the pairs): ``np.lexsort((tiebreak, tgt_lens, src_lens, max(S, T)))``, computed as three
    stable sorts of 16-bit keys (numpy sorts those by radix, in linear time; 4× faster than
    the lexsort at 3M pairs) when every length is below 2¹⁶."""
    longest = np.maximum(src_lens, tgt_lens)
    if len(longest) == 0 or int(longest.max()) >= 1 << 16:
        return np.lexsort((tiebreak, tgt_lens, src_lens, longest))
    order = np.empty(len(tiebreak), dtype=np.int64)
    order[tiebreak] = np.arange(len(tiebreak))  # the pairs in tiebreak order
    for key in (tgt_lens, src_lens, longest):  # least significant key first
        order = order[np.argsort(key.astype(np.uint16)[order], kind="stable")]
    return order


def make_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int,
                 order: np.ndarray) -> list[np.ndarray]:
    """Cut pairs, visited in ``order``, into consecutive batches within the token budget.

    ``order`` must visit the pairs by non-decreasing max(S, T) (both samplers' orders do). Then
    the greedy rule (add the next pair while (n + 1) · max(S, T) stays within the budget) cuts a
    batch starting at position s after the largest k with k · cost[s + k - 1] <= max_tokens
    (at least one pair), and k · cost[s + k - 1] grows with k: each batch is found by a binary
    search, so an epoch costs O(batches · log max_tokens) steps in Python, not one per pair.
    Returns views of ``order``, one array of pair indices per batch.
    """
    order = np.asarray(order, dtype=np.int64)
    cost = np.maximum(src_lens[order], tgt_lens[order]).astype(np.int64) + 1  # + eos / + bos
    if len(cost) > 1 and bool(np.any(cost[1:] < cost[:-1])):
        raise ValueError("make_batches needs an order by non-decreasing max(S, T)")
    n, start, cuts = len(order), 0, []
    while start < n:
        lo, hi = 1, min(n - start, max_tokens)  # k · cost >= k: no batch has more than max_tokens pairs
        while lo < hi:  # the largest k in [lo, hi] with k · cost[start + k - 1] <= max_tokens
            mid = (lo + hi + 1) // 2
            if mid * int(cost[start + mid - 1]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        start += lo
        cuts.append(start)
    return np.split(order, cuts[:-1]) if n else []


class TokenBatchSampler:
    """Yields arrays of pair indices, each array a batch of about ``max_tokens`` tokens per side.

    - ``shuffle=False`` (evaluation): pairs sorted by length, batches in that order.
    - ``set_epoch(e)`` reshuffles (calling it with the current epoch keeps a resumed position);
      a pass that runs to the end of an epoch advances to the next epoch by itself.
    - ``state_dict()`` / ``load_state_dict()``: epoch and batches consumed this epoch, for an
      exact resume in the middle of an epoch.
    - ``num_shards``/``shard_id``: shard k takes batches k, k+N, ...; the tail that does not
      divide evenly is dropped so all shards step together.
    """

    def __init__(self, src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int, *,
                 shuffle: bool = True, seed: int = 0, num_shards: int = 1, shard_id: int = 0):
        self.src_lens = _as_lengths(src_lens)
        self.tgt_lens = _as_lengths(tgt_lens)
        if len(self.src_lens) != len(self.tgt_lens):
            raise ValueError("src_lens and tgt_lens differ in length")
        if max_tokens < 1:
            raise ValueError("max_tokens must be positive")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_shards = int(num_shards)
        self.shard_id = int(shard_id)
        self.epoch = 0
        self.position = 0  # batches of this shard consumed in the current epoch
        self._cache: tuple[int, list[np.ndarray]] | None = None

    # -- the batch list of one epoch ---------------------------------------------------------

    def _all_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of all shards for one epoch (identical in every process)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.src_lens)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = length_order(self.src_lens, self.tgt_lens, rng.permutation(n))
            batches = make_batches(self.src_lens, self.tgt_lens, self.max_tokens, order)
            batches = [batches[j] for j in rng.permutation(len(batches))]
        else:
            order = length_order(self.src_lens, self.tgt_lens, np.arange(n))
            batches = make_batches(self.src_lens, self.tgt_lens, self.max_tokens, order)
        self._cache = (epoch, batches)
        return batches

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This shard's batches for an epoch (default: the current one): an int64 array of pair
        indices per batch."""
        every = self._all_batches(self.epoch if epoch is None else epoch)
        usable = len(every) - len(every) % self.num_shards if self.num_shards > 1 else len(every)
        return every[self.shard_id:usable:self.num_shards]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[np.ndarray]:
        batches = self.batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        # Epoch finished: move on, so a checkpoint saved now resumes in the next epoch (not a
        # replay of this one), and a plain second pass gets a fresh order.
        self.epoch += 1
        self.position = 0

    # -- epochs and resuming -----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "max_tokens": self.max_tokens, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "max_tokens", "num_shards"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: {key} was {state[key]}, now {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    # -- reports -----------------------------------------------------------------------------

    def padding_efficiency(self, epoch: int | None = None) -> float:
        """Real tokens / padded tokens over one epoch of this shard, both sides together."""
        return self.stats(epoch)["padding_efficiency"]

    def stats(self, epoch: int | None = None) -> dict:
        """Batches, sentences and tokens per batch, and padding efficiency for one epoch."""
        batches = self.batches(epoch)
        real = padded = sentences = 0
        for batch in batches:
            s = self.src_lens[batch] + 1
            t = self.tgt_lens[batch] + 1
            real += int(s.sum() + t.sum())
            padded += len(batch) * int(s.max() + t.max())
            sentences += len(batch)
        n = max(len(batches), 1)
        return {"batches": len(batches), "sentences_per_batch": sentences / n,
                "real_tokens_per_batch": real / 2 / n,  # per side, like the paper's 25000
                "padding_efficiency": real / padded if padded else 1.0}


@dataclass
class Batch:
    """One batch as model inputs; ``tgt_out`` is ``tgt_in`` shifted left by one.

    src        (B, S): tokens + eos, padded       -> the encoder
    tgt_in     (B, T): bos + tokens, padded       -> the decoder (teacher forcing)
    tgt_out    (B, T): tokens + eos, padded       -> what the decoder must predict
    tgt_index  (N,):   flat positions (row·T + t) of the N real (non-pad) targets
    tgt_labels (N,):   tgt_out at those positions

The last two are found on the host while collating, so the loss can project only the real
positions without a device synchronisation (boolean masking on a GPU waits for the count).
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tgt_index: torch.Tensor
    tgt_labels: torch.Tensor
    n_src_tokens: int
    n_tgt_tokens: int  # real (non-pad) target tokens: the loss is normalized by these

    def to(self, device, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.src), move(self.tgt_in), move(self.tgt_out), move(self.tgt_index),
                     move(self.tgt_labels), self.n_src_tokens, self.n_tgt_tokens)

    def __len__(self) -> int:
        return self.src.shape[0]


def _pad(rows: list[np.ndarray], prefix: int | None, suffix: int | None, pad_id: int) -> np.ndarray:
    extra = (prefix is not None) + (suffix is not None)
    out = np.full((len(rows), max(len(r) for r in rows) + extra), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        start = 0
        if prefix is not None:
            out[i, 0] = prefix
            start = 1
        out[i, start:start + len(r)] = r
        if suffix is not None:
            out[i, start + len(r)] = suffix
    return out


def collate(src_list: Sequence[Sequence[int]], tgt_list: Sequence[Sequence[int]],
            pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> Batch:
    """Token-id sequences (no specials) -> a padded `Batch` of LongTensors."""
    if len(src_list) != len(tgt_list) or not src_list:
        raise ValueError("collate needs equally many (and at least one) sources and targets")
    src = [np.asarray(s, dtype=np.int64) for s in src_list]
    tgt = [np.asarray(t, dtype=np.int64) for t in tgt_list]
    src_arr = _pad(src, None, eos_id, pad_id)
    tgt_in = _pad(tgt, bos_id, None, pad_id)
    tgt_out = _pad(tgt, None, eos_id, pad_id)
    index = np.flatnonzero(tgt_out != pad_id)
    import torch

    return Batch(torch.from_numpy(src_arr), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out),
                 torch.from_numpy(index), torch.from_numpy(tgt_out.reshape(-1)[index]),
                 n_src_tokens=sum(len(s) + 1 for s in src),
                 n_tgt_tokens=len(index))
