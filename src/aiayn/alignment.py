"""Word alignments from the encoder-decoder attention.

An alignment links each word of a translation to the source word it translates. aiayn reads it
off one layer's encoder-decoder attention (one head, or the mean of the layer's heads), the
subword weights gathered into words:

1. **The rows.** Decoder position r reads <s> y_1 ... y_r and predicts y_{r+1}. A target
   subword y_k can take the row that *predicts* it (r = k - 1) or the row that *reads* it
   (r = k, "shift-att", Chen et al. 2020: once a word is an input, the decoder may look at the
   source word it translated). ``rows``: "predicts" or "reads".
2. **EOS.** The source's </s> column is dropped and each row renormalised over the real source
   subwords: many heads park weight on </s> when nothing else fits, and an alignment must
   point at a word.
3. **Subwords to words.** Words are the subword model's words: a piece that starts with '▁'
   starts one, so a word is a whitespace-separated token of the text as the model read it
   (cleaned: NFC, single spaces) and of its translation, punctuation attached as written. The
   weight of target word j on source word i is the *sum* over i's subwords (the attention mass
   on the word) *averaged* over j's subwords: each row of the word matrix sums to 1.
4. **Hard alignment.** Each target word links to its source word of largest weight
   (``i-j`` in the Pharaoh form, 0-based source word i, target word j, source first): one
   link per target word, none for an empty side.

The layer and head are an `AlignmentSettings`. The defaults, the last layer (`DEFAULT_LAYER`),
the mean of its heads, the rows that predict each word and </s> dropped, were chosen by measuring
every layer, head and option against eflomal on two test sets with two models (docs/alignment.md):
of the layer means, they agreed best on both. A single head often agrees better still, but which
one differs from model to model: ``aiayn heads --alignments`` finds it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .data.tokenizer import BOS_ID, EOS_ID
from .errors import UserError

log = logging.getLogger(__name__)

WORD_START = "\u2581"  # sentencepiece's word-start mark '▁'

DEFAULT_LAYER = -1
"""The layer alignments are read from by default, counted from the top when negative: the last.
With the rows that predict each word, its mean of heads agreed best with eflomal of all layer
means on both measured models (docs/alignment.md)."""

ROWS = ("predicts", "reads")


@dataclass(frozen=True)
class AlignmentSettings:
    """Which attention an alignment is read from. ``layer``: 1-based decoder layer, or counted
    from the top when negative (-1 the last); ``head``: 1-based head, or None for the mean of the
    layer's heads; ``rows``: "predicts" (a target subword takes the decoder row that predicts it)
    or "reads" (the row that reads it); see the module's description."""

    layer: int = DEFAULT_LAYER
    head: int | None = None
    rows: str = "predicts"

    def resolve_layer(self, n_layers: int) -> int:
        """The 0-based layer index in a decoder of ``n_layers``; a `UserError` if out of range."""
        layer = self.layer
        if layer == 0 or not -n_layers <= layer <= n_layers:
            raise UserError(f"alignment layer {layer} does not exist: the decoder has {n_layers} layer(s) "
                            f"(1 ... {n_layers}, or -1 ... -{n_layers} from the top)")
        return layer - 1 if layer > 0 else n_layers + layer

    def check(self, n_layers: int, n_heads: int) -> AlignmentSettings:
        self.resolve_layer(n_layers)
        if self.head is not None and not 1 <= self.head <= n_heads:
            raise UserError(f"alignment head {self.head} does not exist: each layer has {n_heads} heads (1 ... {n_heads})")
        if self.rows not in ROWS:
            raise UserError(f"alignment rows must be one of {', '.join(ROWS)} (got {self.rows!r})")
        return self

    def describe(self, n_layers: int) -> str:
        layer = self.resolve_layer(n_layers) + 1
        head = "mean of heads" if self.head is None else f"head {self.head}"
        return f"layer {layer} of {n_layers}, {head}, rows that {self.rows[:-1]} the word"


@dataclass
class Alignment:
    """The alignment of one translation to its source: the words of each side, the soft
    alignment (``soft[j][i]``: weight of target word j on source word i; each row sums to 1)
    and the hard links (source word i, target word j), 0-based."""

    src_words: list[str]
    tgt_words: list[str]
    soft: list[list[float]]
    links: list[tuple[int, int]]

    @property
    def pharaoh(self) -> str:
        return to_pharaoh(self.links)

    def to_dict(self) -> dict:
        return {"src_words": self.src_words, "tgt_words": self.tgt_words, "pharaoh": self.pharaoh,
                "links": [list(link) for link in self.links],
                "soft": [[round(p, 4) for p in row] for row in self.soft]}


# -- words ----------------------------------------------------------------------------------


def word_ids(pieces: list[str]) -> list[int]:
    """The 0-based word of each subword piece: a piece that starts with '▁' starts a new word
    (the first piece always does). ``["▁Click", "▁O", "K", "."]`` -> ``[0, 1, 1, 1]``."""
    ids, word = [], -1
    for index, piece in enumerate(pieces):
        if index == 0 or piece.startswith(WORD_START):
            word += 1
        ids.append(word)
    return ids


def words_of(pieces: list[str]) -> list[str]:
    """The words the pieces spell, as `word_ids` groups them (the '▁' marks removed)."""
    words: list[str] = []
    for piece, word in zip(pieces, word_ids(pieces)):
        if word == len(words):
            words.append("")
        words[word] += piece.replace(WORD_START, "")
    return words


def aggregate(weights: Tensor, tgt_words: list[int], src_words: list[int]) -> Tensor:
    """Subword weights (target subwords × source subwords) -> word weights (target words ×
    source words): summed over a source word's subwords, averaged over a target word's."""
    weights = weights.float()
    n_src, n_tgt = max(src_words) + 1, max(tgt_words) + 1
    src_index = torch.tensor(src_words, device=weights.device)
    tgt_index = torch.tensor(tgt_words, device=weights.device)
    by_src = torch.zeros(weights.size(0), n_src, device=weights.device).index_add_(1, src_index, weights)
    summed = torch.zeros(n_tgt, n_src, device=weights.device).index_add_(0, tgt_index, by_src)
    counts = torch.bincount(tgt_index, minlength=n_tgt).clamp_min(1).unsqueeze(1)
    return summed / counts


def hard_links(soft: Tensor) -> list[tuple[int, int]]:
    """Each target word (row) linked to its source word (column) of largest weight."""
    if soft.numel() == 0:
        return []
    return [(int(i), j) for j, i in enumerate(soft.argmax(dim=1).tolist())]


def subword_rows(cross: Tensor, n_tgt: int, n_src: int, rows: str) -> Tensor:
    """From one sentence's cross-attention (decoder rows × source columns, with the target's
    </s> row and the source's </s> column; padding beyond) the (n_tgt × n_src) matrix of its
    target subwords over its source subwords: the rows that read or predict each subword, the
    </s> column dropped, each row renormalised."""
    first = 1 if rows == "reads" else 0
    block = cross[first: first + n_tgt, :n_src].float()
    total = block.sum(dim=1, keepdim=True)
    return torch.where(total > 0, block / total.clamp_min(1e-30), torch.full_like(block, 1.0 / max(n_src, 1)))


def select(cross_layers: list[Tensor], settings: AlignmentSettings) -> Tensor:
    """The (B, T, S) attention an alignment is read from: one layer's head, or its heads' mean."""
    layer = cross_layers[settings.resolve_layer(len(cross_layers))]
    return layer.mean(dim=1) if settings.head is None else layer[:, settings.head - 1]


# -- from a model ---------------------------------------------------------------------------


@torch.no_grad()
def cross_attention(model, sources: list[list[int]], targets: list[list[int]]) -> list[Tensor]:
    """Teacher-forced encoder-decoder attention of a batch: per decoder layer (B, h, T, S),
    sources without EOS, targets without BOS/EOS (both added here), padded."""
    cfg = model.config
    device = next(model.parameters()).device
    s_len = max(len(s) for s in sources) + 1
    t_len = max(len(t) for t in targets) + 1
    src = torch.full((len(sources), s_len), cfg.pad_id, dtype=torch.long)
    tgt = torch.full((len(targets), t_len), cfg.pad_id, dtype=torch.long)
    for row, (s, t) in enumerate(zip(sources, targets)):
        src[row, : len(s) + 1] = torch.tensor(list(s) + [EOS_ID], dtype=torch.long)
        tgt[row, : len(t) + 1] = torch.tensor([BOS_ID] + list(t), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        return model.attention_weights(src.to(device), tgt.to(device))["cross"]
    finally:
        model.train(was_training)


def align_ids(model, tokenizer, sources: list[list[int]], targets: list[list[int]],
              settings: AlignmentSettings = AlignmentSettings()) -> list[Alignment]:
    """Alignments of a batch of (source ids, target ids) pairs, teacher-forced through ``model``;
    ids without BOS/EOS. A pair with an empty side has no links."""
    cfg = model.config
    settings.check(cfg.n_decoder_layers, cfg.n_heads)
    results: list[Alignment | None] = [None] * len(sources)
    live = [i for i in range(len(sources)) if sources[i] and targets[i]]
    if live:
        weights = select(cross_attention(model, [sources[i] for i in live], [targets[i] for i in live]), settings)
    for row, i in enumerate(live):
        src_pieces = tokenizer.pieces(sources[i], "src")
        tgt_pieces = tokenizer.pieces(targets[i], "tgt")
        sub = subword_rows(weights[row], len(targets[i]), len(sources[i]), settings.rows)
        soft = aggregate(sub, word_ids(tgt_pieces), word_ids(src_pieces))
        results[i] = Alignment(words_of(src_pieces), words_of(tgt_pieces),
                               soft.tolist(), hard_links(soft))
    for i in range(len(sources)):
        if results[i] is None:
            results[i] = Alignment(words_of(tokenizer.pieces(sources[i], "src")) if sources[i] else [],
                                   words_of(tokenizer.pieces(targets[i], "tgt")) if targets[i] else [], [], [])
    return results


def align_pairs(model, tokenizer, pairs: Iterable[tuple[int, str, str]], settings: AlignmentSettings = AlignmentSettings(),
                *, batch_size: int = 64, chunk: int = 10_000, max_subwords: int | None = None,
                where: str = "input") -> Iterator[tuple[int, Alignment | None]]:
    """Alignments of (line number, source text, target text) pairs, read ``chunk`` pairs at a
    time, sorted by length within a chunk and aligned ``batch_size`` at a time; yields (line
    number, alignment) in input order. A pair with a side longer than ``max_subwords`` subwords
    (default: what the model's positions allow for a learned table, else no limit) is skipped
    with a warning naming ``where`` and its line, and yields None."""
    cfg = model.config
    settings.check(cfg.n_decoder_layers, cfg.n_heads)
    if max_subwords is None and cfg.positions == "learned":
        max_subwords = cfg.max_positions - 1
    pairs = iter(pairs)
    while block := list(itertools.islice(pairs, chunk)):
        sources = tokenizer.encode_batch([s for _, s, _ in block], "src")
        targets = tokenizer.encode_batch([t for _, _, t in block], "tgt")
        found: list[Alignment | None] = [None] * len(block)
        keep = []
        for k, (number, _, _) in enumerate(block):
            longest = max(len(sources[k]), len(targets[k]))
            if max_subwords is not None and longest > max_subwords:
                log.warning("aiayn: warning: %s:%d has %d subwords; this model reads at most %d: not aligned",
                            where, number, longest, max_subwords)
            else:
                keep.append(k)
        keep.sort(key=lambda k: -(len(sources[k]) + len(targets[k])))
        for start in range(0, len(keep), batch_size):
            batch = keep[start: start + batch_size]
            for k, a in zip(batch, align_ids(model, tokenizer, [sources[k] for k in batch],
                                             [targets[k] for k in batch], settings)):
                found[k] = a
        yield from ((number, a) for (number, _, _), a in zip(block, found))


# -- the Pharaoh form -----------------------------------------------------------------------


def to_pharaoh(links: list[tuple[int, int]]) -> str:
    """Links as one Pharaoh line: ``i-j`` pairs (source word i, target word j, 0-based),
    space-separated, sorted by target word then source word."""
    return " ".join(f"{i}-{j}" for i, j in sorted(links, key=lambda link: (link[1], link[0])))


def parse_pharaoh(line: str, where: str = "alignment") -> list[tuple[int, int]]:
    """One Pharaoh line -> links (source word, target word). eflomal's and fast_align's
    output, and GIZA++'s after conversion; 'p' links (possible, as in gold standards written
    ``i?j``) are read as links too. A malformed pair is a `UserError` naming ``where``."""
    links = []
    for pair in line.split():
        i, sep, j = pair.replace("?", "-").partition("-")
        if not sep or not i.isdigit() or not j.isdigit():
            raise UserError(f"{where}: {pair!r} is not an alignment link i-j (0-based word indices)")
        links.append((int(i), int(j)))
    return links


# -- agreement ------------------------------------------------------------------------------


@dataclass
class Agreement:
    """Precision, recall and alignment error rate of predicted links A against reference links,
    summed over sentences (Och & Ney 2003): sure links S and possible links P ⊇ S,
    precision |A∩P| / |A|, recall |A∩S| / |S|, AER = 1 - (|A∩S| + |A∩P|) / (|A| + |S|). With one
    reference set (another aligner's output: S = P), AER = 1 - F1."""

    predicted: int = 0
    sure: int = 0
    sure_hits: int = 0
    possible_hits: int = 0

    def add(self, predicted: list[tuple[int, int]], sure: list[tuple[int, int]],
            possible: list[tuple[int, int]] = ()) -> None:
        a, s = set(predicted), set(sure)
        p = s | set(possible)
        self.predicted += len(a)
        self.sure += len(s)
        self.sure_hits += len(a & s)
        self.possible_hits += len(a & p)

    @property
    def precision(self) -> float:
        return self.possible_hits / self.predicted if self.predicted else math.nan

    @property
    def recall(self) -> float:
        return self.sure_hits / self.sure if self.sure else math.nan

    @property
    def aer(self) -> float:
        total = self.predicted + self.sure
        return 1.0 - (self.sure_hits + self.possible_hits) / total if total else math.nan

    def to_dict(self) -> dict:
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "aer": round(self.aer, 4),
                "predicted_links": self.predicted, "reference_links": self.sure}
