"""Vocabulary shortlist: the target subwords a sentence may produce, for faster decoding.

The output layer is the largest matrix product of a decoder step (V × d_model: 37,000 × 512 for
the paper's vocabulary) and the normaliser and top-k read all V logits of every hypothesis. Most
of them cannot be right for a given source. A shortlist, as in Marian's lexical shortlist and
CTranslate2's vocabulary mapping, restricts each sentence's outputs to the subwords its source
makes plausible:

    candidates(x) = frequent ∪ {EOS} ∪ ⋃_{s ∈ x} (translations(s) ∪ {s})

- ``frequent``: the most frequent target subwords of the training data (function words,
  punctuation: what any sentence may need);
- ``translations(s)``: the target subwords t with the highest Dice coefficient
  2·c(s, t) / (c(s) + c(t)) with the source subword s, where c counts training pairs (a pair
  counts once, however often a subword occurs in it) and c(s, t) ≥ 2;
- s itself: the vocabulary is joint, so names and numbers copied from the source stay possible.

Built once from a prepared dataset (``aiayn shortlist``) and used with ``--shortlist FILE``.
The search then computes logits for the candidates only and **normalises over them**: log P is
a softmax over the sentence's shortlist (Marian does the same), so scores and, rarely, outputs
differ from the full-vocabulary search. A batch computes the logits of the union of its
sentences' candidates once, and each sentence masks out those that are not its own, so a
sentence's translation does not depend on the sentences batched with it (Marian and
CTranslate2 use the batch's union itself, which does). The BLEU cost is measured, not assumed
(benchmarks/RESULTS.md). A shortlist that contains every subword gives exactly the full
search's outputs (the tests check it). pad and bos are never candidates: a file that lists
them is refused.

The file is JSON: the settings, the vocabulary size, a SHA-256 of the subword model it was built
with (a checkpoint with another vocabulary is refused) and the lists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from ..errors import UserError
from ..files import read_versioned_json

FORMAT = "aiayn-shortlist"
VERSION = 1


def _cooccurrence(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], vocab: int, chunk: int = 50000,
                  progress: bool = False):
    """Sentence-level counts: (pair codes s·V + t, sorted, and their counts), c(s), c(t).

    Each pair contributes the product of its distinct source and target subwords once. Each
    chunk of pairs is reduced with np.unique and merged into the running counts by a sorted
    merge (linear in the distinct pairs so far), so memory follows the number of distinct
    (s, t) pairs, not the corpus size.
    """
    from ..progress import progress_bar

    src_count = np.zeros(vocab, dtype=np.int64)
    tgt_count = np.zeros(vocab, dtype=np.int64)
    codes = np.zeros(0, dtype=np.int64)
    counts = np.zeros(0, dtype=np.int64)
    with progress_bar(len(src), "shortlist", "pair", enabled=progress) as bar:
        for start in range(0, len(src), chunk):
            parts = []
            for s, t in zip(src[start : start + chunk], tgt[start : start + chunk]):
                s, t = np.unique(s).astype(np.int64), np.unique(t).astype(np.int64)
                src_count[s] += 1
                tgt_count[t] += 1
                parts.append((s[:, None] * vocab + t[None, :]).ravel())
            bar.update(len(parts))
            if not parts:
                continue
            new, new_counts = np.unique(np.concatenate(parts), return_counts=True)
            pos = np.searchsorted(codes, new)
            seen = pos < len(codes)
            seen[seen] = codes[pos[seen]] == new[seen]
            counts[pos[seen]] += new_counts[seen]
            codes = np.insert(codes, pos[~seen], new[~seen])
            counts = np.insert(counts, pos[~seen], new_counts[~seen])
    return codes, counts, src_count, tgt_count


def build(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], vocab: int, frequent: int = 100,
          per_source: int = 100, min_count: int = 2, progress: bool = False) -> tuple[list[int], list[list[int]]]:
    """(frequent target ids, translations of each source id) from encoded training pairs
    (int arrays of subword ids without specials). Ids are sorted; specials never appear."""
    if frequent < 0 or per_source < 0:
        raise UserError(f"the frequent and per-source counts must not be negative (got {frequent}, {per_source})")
    codes, counts, src_count, tgt_count = _cooccurrence(src, tgt, vocab, progress=progress)
    specials = np.array([PAD_ID, BOS_ID, EOS_ID])
    by_frequency = np.argsort(-tgt_count, kind="stable")
    top = [int(i) for i in by_frequency[: frequent + len(specials)] if tgt_count[i] > 0 and i not in specials]
    keep = counts >= min_count
    codes, counts = codes[keep], counts[keep]
    s, t = codes // vocab, codes % vocab
    dice = 2.0 * counts / (src_count[s] + tgt_count[t])
    # Best first within each source id: sort by source, then by descending Dice (then by id).
    order = np.lexsort((t, -dice, s))
    s, t = s[order], t[order]
    starts = np.searchsorted(s, np.arange(vocab + 1))
    translations = []
    for i in range(vocab):
        row = t[starts[i] : starts[i + 1]]
        translations.append(sorted(int(x) for x in row[np.isin(row, specials, invert=True)][:per_source]))
    return sorted(top[:frequent]), translations


@dataclass
class Shortlist:
    vocab_size: int
    frequent: list[int]
    translations: list[list[int]]  # indexed by source id
    tokenizer_sha256: str
    settings: dict

    # -- building and files ---------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, data, frequent: int = 100, per_source: int = 100, max_pairs: int | None = None) -> Shortlist:
        """Built from a prepared dataset's training split (`aiayn.data.load_dataset`): its first
        ``max_pairs`` pairs (None: all)."""
        if max_pairs is not None and max_pairs < 1:
            raise UserError(f"the number of pairs to read must be at least 1 (got {max_pairs})")
        split = data.split("train")
        n = len(split) if max_pairs is None else min(max_pairs, len(split))
        vocab = data.tokenizer.vocab_size
        if data.tokenizer.src_vocab_size != vocab or getattr(data.tokenizer, "separate", False):
            raise UserError("a shortlist maps source ids to target ids of one shared vocabulary; this dataset's "
                            "tokenizer has separate source and target vocabularies", path=data.path)
        top, translations = build(split.src[:n], split.tgt[:n], vocab, frequent, per_source, progress=n >= 100_000)
        return cls(vocab, top, translations, data.tokenizer.sha256,
                   dict(frequent=frequent, per_source=per_source, pairs=n, dataset=str(data.path)))

    def save(self, path: str | Path) -> None:
        payload = dict(format=FORMAT, version=VERSION, vocab_size=self.vocab_size,
                       tokenizer_sha256=self.tokenizer_sha256, settings=self.settings,
                       frequent=self.frequent, translations=self.translations)
        Path(path).write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Shortlist:
        path = Path(path)
        if not path.is_file():
            raise UserError("shortlist file not found (build one with aiayn shortlist)", path=path)
        data = read_versioned_json(path, FORMAT, VERSION, what="shortlist", remedy="build one with aiayn shortlist")
        vocab = data.get("vocab_size")
        lists = [data.get("frequent")] + list(data.get("translations") or [])
        valid = isinstance(vocab, int) and len(lists) == vocab + 1 and all(
            isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < vocab for i in ids) for ids in lists)
        if not valid:
            raise UserError("malformed shortlist: the lists must hold ids below vocab_size, one list per source id",
                            path=path)
        for where, ids in [("frequent", lists[0])] + [(f"translations[{s}]", t) for s, t in enumerate(lists[1:])]:
            special = sorted(set(ids) & {PAD_ID, BOS_ID})
            if special:
                raise UserError(f"malformed shortlist: {where} lists the special id(s) {special} (pad {PAD_ID}, "
                                f"bos {BOS_ID}), which are never outputs", path=path)
        return cls(vocab, lists[0], lists[1:], str(data.get("tokenizer_sha256")), dict(data.get("settings") or {}))

    def check(self, tokenizer, path: str | Path | None = None) -> None:
        """Refuse a shortlist built with another subword vocabulary than the checkpoint's."""
        if tokenizer.vocab_size != self.vocab_size or tokenizer.sha256 != self.tokenizer_sha256:
            raise UserError("this shortlist was built with another subword vocabulary than the checkpoint's "
                            "(rebuild it from the checkpoint's dataset)", path=path)

    # -- decoding -------------------------------------------------------------------------------
    def candidate_set(self, src_ids) -> set[int]:
        """Target ids one sentence (its source ids) may produce: frequent ∪ {EOS} ∪ each source
        subword and its translations. pad and bos are never candidates."""
        ids = set(self.frequent)
        ids.add(EOS_ID)
        for s in set(src_ids):
            if s in (PAD_ID, BOS_ID, EOS_ID) or not 0 <= s < self.vocab_size:
                continue
            ids.add(s)
            ids.update(self.translations[s])
        return ids

    def candidates(self, src: Tensor) -> Tensor:
        """Sorted target ids that any sentence of a batch of source ids (B, S) may produce."""
        ids = set().union(*(self.candidate_set(row) for row in src.tolist())) if src.numel() else {EOS_ID}
        return torch.tensor(sorted(ids), dtype=torch.long, device=src.device)

    def output_layer(self, model, src: Tensor) -> RestrictedOutput:
        """The output layer for a batch (B, S): the union of its sentences' candidates, each
        sentence restricted to its own."""
        sets = [self.candidate_set(row) for row in src.tolist()]
        ids = torch.tensor(sorted(set().union(*sets)) if sets else [EOS_ID], dtype=torch.long, device=src.device)
        allowed = torch.zeros(len(sets), ids.numel(), dtype=torch.bool)
        column = {int(t): j for j, t in enumerate(ids.tolist())}
        for row, own in enumerate(sets):
            allowed[row, [column[t] for t in own]] = True
        # One sentence, or sentences with the same candidates: no mask is needed.
        return RestrictedOutput.of(model, ids, None if bool(allowed.all()) else allowed.to(src.device))


@dataclass
class RestrictedOutput:
    """The output projection restricted to ``ids`` (sorted, with EOS): logits of those subwords.

    The rows are taken from the model's fp32 output weight (the tied embedding, or the
    dequantised int8 weight), so a shortlisted int8 model computes its small output layer in fp32.
    ``allowed`` (B, C), when given, says which columns each sentence of the batch may produce:
    the others get logit -inf, so they carry no probability mass either.
    """

    ids: Tensor  # (C,) target ids, sorted
    weight: Tensor  # (C, d_model) fp32
    eos: int  # column of EOS
    allowed: Tensor | None = None  # (B, C) bool, one row per sentence
    bias: Tensor | None = None  # (C,) fp32: a pretrained model's logits bias at those ids

    @classmethod
    def of(cls, model, ids: Tensor, allowed: Tensor | None = None) -> RestrictedOutput:
        eos = int(torch.searchsorted(ids, torch.tensor(EOS_ID, device=ids.device)))
        if eos >= ids.numel() or int(ids[eos]) != EOS_ID:
            raise ValueError("a restricted output layer must include EOS")
        generator = model.generator
        bias = getattr(generator, "bias", None)
        bias = None if bias is None else bias.detach().index_select(0, ids).float()
        if hasattr(generator, "weight_rows"):  # int8 (packed.Int8Linear): only these rows dequantised
            return cls(ids, generator.weight_rows(ids), eos, allowed, bias)
        return cls(ids, generator.weight.detach().index_select(0, ids).float(), eos, allowed, bias)

    def select(self, sentences: Tensor) -> RestrictedOutput:
        """The same layer for the batch's sentences ``sentences`` (finished ones leave)."""
        if self.allowed is None:
            return self
        return RestrictedOutput(self.ids, self.weight, self.eos, self.allowed.index_select(0, sentences), self.bias)

    def logits(self, states: Tensor) -> Tensor:
        """(N, C) logits of the decoder ``states`` (N, d_model); N = B·rows per sentence."""
        logits = torch.nn.functional.linear(states.float(), self.weight, self.bias)
        if self.allowed is not None:
            b = self.allowed.size(0)
            logits.view(b, -1, logits.size(-1)).masked_fill_(~self.allowed[:, None, :], -math.inf)
        return logits


def coverage(shortlist: Shortlist, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> tuple[float, float]:
    """A quick check of a shortlist on held-out pairs, each taken as a batch of its own: the share
    of reference target subwords among the candidates (1.0: none is cut) and the mean number of
    candidates per sentence."""
    covered = total = candidates = 0
    for s, t in zip(src, tgt):
        ids = shortlist.candidate_set(s)
        covered += sum(int(i) in ids for i in t)
        total += len(t)
        candidates += len(ids)
    return (covered / total if total else math.nan), (candidates / len(src) if len(src) else math.nan)
