"""What each attention head does, and how much it matters: ``aiayn heads``.

For every layer and head of the three kinds of attention (``encoder`` self-attention, masked
``decoder`` self-attention, ``cross`` = encoder-decoder attention), over the first sentence pairs
of a test set, three measurements:

**Where its weight goes** (`HeadStatistics`), teacher-forced through the explicit attention
path (`Transformer.attention_weights`) of the plain fp32 model, in padded batches. Rows and
columns are those of `aiayn.attention`: decoder row i reads the decoder input i (<s>, y_1, ...)
and predicts y_{i+1}; its columns are the inputs 0 ... i. Every figure is a mean over the real
query rows of all sentences (padding rows never count; padded key columns have weight 0):

    previous     weight on column i-1 (encoder, decoder; rows i >= 1)
    same         weight on column i (encoder, decoder)
    next         weight on column i+1 (encoder only, rows with a next real token: the decoder
                 never sees i+1)
    sink         weight on the sink token: the source's </s> (encoder, cross), the decoder's <s>,
                 its first input (decoder); `SINK_TOKENS`
    punctuation  weight on punctuation tokens: pieces that are only Unicode punctuation (categories
                 P*) once the word-start mark '▁' is removed (`is_punctuation`)
    entropy      -Σ p log p over the row, in nats
    entropy_normalized  entropy / log(number of keys the row may attend to): 0 one key, 1 uniform
                 (rows with a single allowed key are left out of this mean)
    confidence   the row's largest weight (Voita et al., 2019)

The decoder's first row (it reads <s> only, so its one weight is 1 whatever the head does) is
left out of every decoder statistic. The targets are the references (``--ref``) or, without
them, the model's own translations (beam search with the given settings).

**Agreement with reference word alignments** (``--alignments``, cross heads only): each head's
hard word alignment of every --src/--ref pair (`aiayn.alignment`: the rows that predict each target
subword, the source's </s> dropped, subwords gathered into words, one link per target word) and
each layer's head mean, scored against the reference Pharaoh lines (precision, recall, AER:
`aiayn.alignment.Agreement`).

**Importance** (with ``--ref``; Michel et al., 2019, "Are Sixteen Heads Really Better than
One?"). A head is masked by multiplying its output by 0 before W^O, which is zeroing its columns
h·d_k ... (h+1)·d_k of that attention's ``out_proj.weight`` in a copy of the plain fp32 model
(`mask_heads`; the model classes are not changed). For each head masked alone: BLEU (sacreBLEU of
the translations, searched as given, in the precision given) and the dev NLL per target token
(teacher-forced, fp32, no label smoothing: Σ -log p over the real target tokens, EOS included,
divided by their number). ``delta_bleu`` = masked - unmasked (negative: the head helped),
``delta_nll`` = masked - unmasked (positive: the head helped). A head's *importance* is its
``delta_nll``: a smooth, per-token measure that does not depend on the search (Michel et al. use
the loss too). Then the pruning curve: every head of every kind in one order, increasing
importance (ties: encoder, decoder, cross, then layer, then head), masked cumulatively, with BLEU
and NLL after each one, to all heads masked. ``prunable_heads`` is the largest k for which the
first k heads of that order together cost at most ``BLEU_TOLERANCE`` (0.5) BLEU.

**Roles** (`assign_role`): the first rule that fits, in this order, with the thresholds of
`ROLE_THRESHOLDS`:

    previous / same / next  that positional share >= 0.5 (self-attention kinds; the largest wins)
    sink                    sink share >= 0.5
    punctuation             punctuation share >= 0.5
    alignment               cross heads: with --alignments, an AER within 0.05 of the best head's;
                            without, confidence >= 0.5 and sink share < 0.3
    diffuse                 normalised entropy >= 0.8
    mixed                   anything else

heads.json (``format`` "aiayn-heads", ``version`` 1); layers and heads are 1-based in it, and
lists are indexed [layer - 1][head - 1]::

    checkpoint, sentences, skipped_lines, target ("reference" | "translation"), search {beam,
    alpha, max_len_a, max_len_b}, precision (of the searches), statistics_precision ("fp32"),
    settings {src, ref, alignments, max_sentences, importance, batch_size, alignment_rows,
    bleu_tolerance, role_thresholds}, sink_tokens {kind: token}, layers {kind: N}, n_heads,
    heads {kind: [[{layer, head, previous, same, next, sink, punctuation, entropy,
                    entropy_normalized, confidence, alignment {precision, recall, aer,
                    predicted_links, reference_links} | null, bleu, nll, delta_bleu, delta_nll,
                    role}]]},
    alignment_layer_mean [{layer, precision, recall, aer, ...}] | null,
    alignment_best {layer, head (null: the layer's mean), aer} | null,
    importance {measure: "delta_nll", baseline {bleu, nll, bleu_signature}, order [{kind, layer,
                head}], pruning [{pruned, kind, layer, head, bleu, nll, delta_bleu, delta_nll}],
                prunable_heads, bleu_tolerance} | null,
    roles {kind: [[role]]}

A figure that does not apply (``next`` of a decoder head, the alignment of a self-attention
head, importance without --ref) is null; so is one with no rows to average over.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .alignment import (
    WORD_START,
    Agreement,
    AlignmentSettings,
    aggregate,
    hard_links,
    parse_pharaoh,
    select,
    subword_rows,
    word_ids,
)
from .attention import KINDS as TITLES
from .checkpoint import Checkpoint, load_checkpoint
from .config import SearchConfig
from .data.text import clean, count_lines, iter_lines, iter_parallel, require_text
from .data.tokenizer import BOS_ID, EOS_ID
from .errors import UserError
from .files import atomic_directory, refuse_to_replace
from .progress import progress_bar

log = logging.getLogger(__name__)

KINDS = ("encoder", "decoder", "cross")
FORMAT, VERSION = "aiayn-heads", 1
FILES = ("heads.json", "heads.md", "heads.png")

SINK_TOKENS = {"encoder": "</s>", "decoder": "<s>", "cross": "</s>"}
"""The token each kind's ``sink`` share is measured on: the source's end-of-sentence for the
encoder and the encoder-decoder attention, the decoder's first input (<s>) for the decoder."""

POSITIONAL = {"encoder": ("previous", "same", "next"), "decoder": ("previous", "same"), "cross": ()}
STATISTICS = ("previous", "same", "next", "sink", "punctuation", "entropy", "entropy_normalized", "confidence")

ROLE_THRESHOLDS = {
    "positional": 0.5,  # previous / same / next share
    "sink": 0.5,
    "punctuation": 0.5,
    "alignment_aer_margin": 0.05,  # AER within this of the best cross head's
    "alignment_confidence": 0.5,  # without reference alignments: confidence at least this ...
    "alignment_max_sink": 0.3,  # ... and sink share below this
    "diffuse": 0.8,  # normalised entropy
}
ROLES = ("previous", "same", "next", "sink", "punctuation", "alignment", "diffuse", "mixed")

BLEU_TOLERANCE = 0.5
"""The BLEU a pruned model may lose against the unmasked one and still count (``prunable_heads``)."""

ALIGNMENT_ROWS = AlignmentSettings.rows  # `aiayn.alignment`'s default (the rows that predict each subword)
NLL_ROWS = 1024  # target positions projected onto the vocabulary at a time (memory: NLL_ROWS x vocabulary)


class Head(NamedTuple):
    """One attention head: its kind, 0-based layer and 0-based head."""

    kind: str
    layer: int
    head: int


def layer_counts(config) -> dict[str, int]:
    """Layers of each kind of attention in a model of ``config``."""
    return {"encoder": config.n_encoder_layers, "decoder": config.n_decoder_layers, "cross": config.n_decoder_layers}


def all_heads(config) -> list[Head]:
    """Every head of the model, kinds in `KINDS` order, then layer, then head."""
    counts = layer_counts(config)
    return [Head(kind, layer, head) for kind in KINDS for layer in range(counts[kind]) for head in range(config.n_heads)]


# -- masking -----------------------------------------------------------------------------------


def attention_module(model: nn.Module, kind: str, layer: int) -> nn.Module:
    """The `MultiHeadAttention` of one kind and 0-based layer."""
    if kind == "encoder":
        return model.encoder.layers[layer].self_attn
    if kind == "decoder":
        return model.decoder.layers[layer].self_attn
    if kind == "cross":
        return model.decoder.layers[layer].cross_attn
    raise ValueError(f"unknown kind of attention {kind!r}; one of {', '.join(KINDS)}")


@torch.no_grad()
def mask_heads(model: nn.Module, heads: Iterable[Head]) -> nn.Module:
    """A copy of the plain model (an fp32 `Transformer`, before `prepare_for_inference`) in which
    each of ``heads`` is masked: its output multiplied by 0 before the output projection W^O,
    i.e. its d_k columns of ``out_proj.weight`` zeroed. ``model`` itself is not changed."""
    masked = copy.deepcopy(model)
    d_k = model.config.d_k
    for kind, layer, head in heads:
        out_proj = attention_module(masked, kind, layer).out_proj
        if type(out_proj) is not nn.Linear or out_proj.weight.dtype != torch.float32:
            raise ValueError("mask_heads takes the plain fp32 model, before prepare_for_inference packs it")
        if not 0 <= head < model.config.n_heads:
            raise ValueError(f"head {head} does not exist (0-based, {model.config.n_heads} heads)")
        out_proj.weight[:, head * d_k:(head + 1) * d_k] = 0.0
    return masked


# -- the sentence pairs --------------------------------------------------------------------------


@dataclass
class HeadsInputs:
    """The sentence pairs measured: the first ``max_sentences`` non-blank lines of ``src`` (and
    their ``ref`` lines), cleaned, with their line numbers and, with ``alignments``, the
    reference links of each pair (source word, target word), read from that file."""

    src_path: Path
    ref_path: Path | None
    alignments_path: Path | None
    max_sentences: int
    lines: list[int]
    sources: list[str]
    references: list[str] | None
    links: list[list[tuple[int, int]]] | None


def read_inputs(src: str | Path, ref: str | Path | None = None, alignments: str | Path | None = None,
                max_sentences: int = 500) -> HeadsInputs:
    """Read and check the files of ``aiayn heads``; every problem a user can fix is a one-line
    `UserError` naming the file (and the line): a missing or empty file, bad UTF-8, --ref or
    --alignments not line-aligned with --src, a malformed Pharaoh line."""
    if max_sentences < 1:
        raise UserError(f"--max-sentences must be at least 1 (got {max_sentences})")
    if alignments is not None and ref is None:
        raise UserError("--alignments needs --ref: the reference alignments are of the --src/--ref pairs")
    src_path = Path(src)
    ref_path = None if ref is None else Path(ref)
    align_path = None if alignments is None else Path(alignments)
    require_text(src_path)
    n_src = count_lines(src_path)
    if ref_path is not None:
        require_text(ref_path)
        _same_line_count(src_path, n_src, ref_path, count_lines(ref_path))
        pairs = itertools.islice(iter_parallel(src_path, ref_path), max_sentences)
    else:
        pairs = itertools.islice(((n, clean(s), None) for n, s in enumerate(iter_lines(src_path), start=1)
                                  if s.strip()), max_sentences)
    lines, sources, references = [], [], []
    for number, s, t in pairs:
        lines.append(number)
        sources.append(s)
        references.append(t)
    if not lines:
        raise UserError("has no sentences (every line is blank)", path=src_path)
    links = None
    if align_path is not None:
        require_text(align_path)
        n_align = count_lines(align_path)
        if n_align < n_src:
            raise UserError(f"the file ends here: it has {n_align} lines, {src_path} has {n_src} (one Pharaoh "
                            "line per --src/--ref pair)", path=align_path, line=n_align + 1)
        if n_align > n_src:
            raise UserError(f"line has no sentence pair: the file has {n_align} lines, {src_path} has {n_src} "
                            "(one Pharaoh line per --src/--ref pair)", path=align_path, line=n_src + 1)
        wanted = {number: index for index, number in enumerate(lines)}
        links = [[] for _ in lines]
        for number, line in enumerate(iter_lines(align_path), start=1):
            parsed = parse_pharaoh(line, where=f"{align_path}:{number}")  # every line is checked
            if number in wanted:
                links[wanted[number]] = parsed
    return HeadsInputs(src_path, ref_path, align_path, max_sentences, lines, sources,
                       references if ref_path is not None else None, links)


def _same_line_count(src: Path, n_src: int, ref: Path, n_ref: int) -> None:
    if n_src != n_ref:
        longer = ref if n_ref > n_src else src
        raise UserError(f"line has no counterpart: {src} has {n_src} lines, {ref} has {n_ref} (the files must "
                        "be line-aligned)", path=longer, line=min(n_src, n_ref) + 1)


# -- statistics ----------------------------------------------------------------------------------


def is_punctuation(piece: str) -> bool:
    """A subword piece that is only punctuation (Unicode categories P*) once '▁' is removed."""
    text = piece.replace(WORD_START, "")
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


class StatisticsAccumulator:
    """Sums of each `STATISTICS` figure per layer and head over real query rows, batch by batch
    (`add`); `result` divides. The sums are fp64."""

    def __init__(self, layers: dict[str, int], n_heads: int):
        self.layers, self.n_heads = layers, n_heads
        self.sums = {kind: {name: torch.zeros(layers[kind], n_heads, dtype=torch.float64) for name in STATISTICS}
                     for kind in KINDS}
        self.counts = {kind: dict.fromkeys(STATISTICS, 0) for kind in KINDS}

    @torch.no_grad()
    def add(self, weights: dict[str, list[Tensor]], src_lengths: Tensor, tgt_lengths: Tensor,
            src_punct: Tensor, tgt_punct: Tensor) -> None:
        """One batch. ``weights``: `Transformer.attention_weights` of it, per kind a list per
        layer of (B, h, rows, columns); ``src_lengths`` (B,): real source positions, </s>
        included; ``tgt_lengths`` (B,): real decoder positions, <s> included (target length + 1);
        ``src_punct`` (B, S) and ``tgt_punct`` (B, T): which source tokens and decoder inputs
        are punctuation."""
        src_lengths, tgt_lengths = src_lengths.cpu(), tgt_lengths.cpu()
        for kind in KINDS:
            w = torch.stack([layer.float().cpu() for layer in weights[kind]])  # (L, B, h, R, C)
            rows = torch.arange(w.size(3))
            if kind == "encoder":
                real = rows[None, :] < src_lengths[:, None]
                allowed = src_lengths[:, None].expand_as(real)
                sink, punct = src_lengths - 1, src_punct
                next_ok = real & (rows[None, :] + 1 < src_lengths[:, None])
            elif kind == "decoder":
                real = (rows[None, :] < tgt_lengths[:, None]) & (rows[None, :] >= 1)
                allowed = (rows + 1)[None, :].expand_as(real)
                sink, punct, next_ok = torch.zeros_like(tgt_lengths), tgt_punct, None
            else:
                real = rows[None, :] < tgt_lengths[:, None]
                allowed = src_lengths[:, None].expand_as(real)
                sink, punct, next_ok = src_lengths - 1, src_punct, None
            self._add(kind, w, real, allowed, sink, punct.cpu(), next_ok)

    def _add(self, kind: str, w: Tensor, real: Tensor, allowed: Tensor, sink: Tensor, punct: Tensor,
             next_ok: Tensor | None) -> None:
        n_layers, batch, heads, n_rows, n_cols = w.shape
        zero = torch.zeros((), dtype=w.dtype)
        entropy = -torch.where(w > 0, w * torch.log(w.clamp_min(1e-38)), zero).sum(-1)  # (L, B, h, R)
        log_allowed = torch.log(allowed.clamp_min(1).double()).float()
        values: dict[str, tuple[Tensor, Tensor]] = {
            "entropy": (entropy, real),
            "entropy_normalized": (entropy / log_allowed.clamp_min(1e-12)[None, :, None, :], real & (allowed >= 2)),
            "confidence": (w.amax(-1), real),
            "sink": (w.gather(-1, sink.view(1, batch, 1, 1, 1).expand(n_layers, batch, heads, n_rows, 1)).squeeze(-1),
                     real),
            "punctuation": ((w * punct[None, :, None, None, :].to(w.dtype)).sum(-1), real),
        }
        if POSITIONAL[kind]:
            rows = torch.arange(n_rows)
            values["same"] = (torch.diagonal(w, 0, -2, -1), real)
            values["previous"] = (F.pad(torch.diagonal(w, -1, -2, -1), (1, 0)), real & (rows[None, :] >= 1))
            if next_ok is not None:
                values["next"] = (F.pad(torch.diagonal(w, 1, -2, -1), (0, 1)), next_ok)
        for name, (value, mask) in values.items():
            value = torch.where(mask[None, :, None, :], value, zero).double()
            self.sums[kind][name] += value.sum(dim=(1, 3))
            self.counts[kind][name] += int(mask.sum())

    def result(self) -> dict[str, list[list[dict[str, float | None]]]]:
        """{kind: [[{statistic: mean or None} per head] per layer]}; None where no row counted
        (or the statistic does not apply to the kind)."""
        out = {}
        for kind in KINDS:
            means = {name: (self.sums[kind][name] / self.counts[kind][name]).tolist() if self.counts[kind][name]
                     else None for name in STATISTICS}
            out[kind] = [[{name: None if means[name] is None else float(means[name][layer][head])
                           for name in STATISTICS}
                          for head in range(self.n_heads)] for layer in range(self.layers[kind])]
        return out


# -- batches ---------------------------------------------------------------------------------------


def _batches(sources: Sequence[list[int]], targets: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of ``batch_size``, longest pairs first (little padding)."""
    order = sorted(range(len(sources)), key=lambda i: -(len(sources[i]) + len(targets[i])))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _tensors(sources: Sequence[list[int]], targets: Sequence[list[int]], index: list[int], pad_id: int,
             device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(src + </s>, <s> + target, target + </s>, source lengths, decoder lengths), padded."""
    s_len = max(len(sources[i]) for i in index) + 1
    t_len = max(len(targets[i]) for i in index) + 1
    src = torch.full((len(index), s_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((len(index), t_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((len(index), t_len), pad_id, dtype=torch.long)
    for row, i in enumerate(index):
        s, t = list(sources[i]), list(targets[i])
        src[row, :len(s) + 1] = torch.tensor(s + [EOS_ID])
        tgt_in[row, :len(t) + 1] = torch.tensor([BOS_ID] + t)
        tgt_out[row, :len(t) + 1] = torch.tensor(t + [EOS_ID])
    src_lengths = torch.tensor([len(sources[i]) + 1 for i in index])
    tgt_lengths = torch.tensor([len(targets[i]) + 1 for i in index])
    return src.to(device), tgt_in.to(device), tgt_out.to(device), src_lengths, tgt_lengths


@torch.no_grad()
def nll_per_token(model: nn.Module, sources: Sequence[list[int]], targets: Sequence[list[int]],
                  batch_size: int = 64) -> float:
    """Teacher-forced negative log-likelihood per target token, in nats: Σ -log p(y_t | y_<t, x)
    over every real target token and each sentence's </s>, divided by their number; fp32 logits,
    fp64 sums, no label smoothing. Ids without </s> (sources) or <s>/</s> (targets)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for index in _batches(sources, targets, batch_size):
            src, tgt_in, tgt_out, _, tgt_lengths = _tensors(sources, targets, index, model.config.pad_id, device)
            real = torch.arange(tgt_out.size(1), device=device)[None, :] < tgt_lengths.to(device)[:, None]
            states, gold = model.states(src, tgt_in)[real], tgt_out[real]  # only the real positions are projected
            for start in range(0, gold.numel(), NLL_ROWS):
                logits = model.generator(states[start:start + NLL_ROWS]).float()
                log_probs = torch.log_softmax(logits, dim=-1).gather(-1, gold[start:start + NLL_ROWS, None])
                total -= float(log_probs.double().sum())
            count += int(real.sum())
    finally:
        model.train(was_training)
    return total / count


def _alignment_agreements(cross: list[Tensor], index: list[int], sources: Sequence[list[int]],
                          targets: Sequence[list[int]], links: Sequence[list[tuple[int, int]]],
                          src_words: Sequence[list[int]], tgt_words: Sequence[list[int]],
                          agreements: dict[tuple[int, int | None], Agreement]) -> None:
    """Add one batch's hard alignments of every cross head (1-based layer, head; None: the
    layer's mean) to ``agreements``, scored against the reference ``links``."""
    for (layer, head), agreement in agreements.items():
        chosen = select(cross, AlignmentSettings(layer=layer, head=head, rows=ALIGNMENT_ROWS))  # (B, T, S)
        for row, i in enumerate(index):
            sub = subword_rows(chosen[row], len(targets[i]), len(sources[i]), ALIGNMENT_ROWS)
            soft = aggregate(sub, tgt_words[i], src_words[i])
            agreement.add(hard_links(soft), links[i])


# -- roles -----------------------------------------------------------------------------------------


def assign_role(kind: str, stats: dict[str, float | None], aer: float | None = None,
                best_aer: float | None = None, thresholds: dict[str, float] = ROLE_THRESHOLDS) -> str:
    """A head's role: the first rule of the module's description that fits. ``aer``: this cross
    head's AER against reference alignments and ``best_aer`` the best cross head's (both None
    without reference alignments)."""

    def at_least(name: str, threshold: float) -> bool:
        value = stats.get(name)
        return value is not None and value >= threshold

    positional = [name for name in POSITIONAL[kind] if at_least(name, thresholds["positional"])]
    if positional:
        return max(positional, key=lambda name: stats[name])
    if at_least("sink", thresholds["sink"]):
        return "sink"
    if at_least("punctuation", thresholds["punctuation"]):
        return "punctuation"
    if kind == "cross":
        if best_aer is not None:
            if aer is not None and aer <= best_aer + thresholds["alignment_aer_margin"]:
                return "alignment"
        elif (at_least("confidence", thresholds["alignment_confidence"]) and stats.get("sink") is not None
              and stats["sink"] < thresholds["alignment_max_sink"]):
            return "alignment"
    if at_least("entropy_normalized", thresholds["diffuse"]):
        return "diffuse"
    return "mixed"


# -- the measurement -------------------------------------------------------------------------------


def _number(x: float | None, digits: int = 6) -> float | None:
    """A JSON-safe figure: rounded, None for None and NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


def _bleu(ckpt: Checkpoint, model: nn.Module, sources: list[str], references: list[str], search: SearchConfig,
          precision: str, device: torch.device, batch_size: int) -> dict:
    """sacreBLEU (`aiayn.evaluate.score`) of ``model``'s translations of ``sources``, searched with
    ``search`` in ``precision`` (`Translator`, which prepares a copy of the model for inference)."""
    from .evaluate import score
    from .translator import Translator

    translator = Translator(dataclasses.replace(ckpt, model=model), search=search, device=device,
                            precision=precision, batch_size=batch_size)
    return score(translator.translate(sources), references)


@torch.no_grad()
def measure_heads(checkpoint: Checkpoint | str | Path, inputs: HeadsInputs, *, search: SearchConfig | None = None,
                  precision: str = "fp32", device: str | torch.device | None = None, importance: bool = True,
                  batch_size: int = 64, progress: bool = False) -> dict:
    """Measure every head of a checkpoint's model (a `Checkpoint` or its directory) on ``inputs``
    (`read_inputs`): the heads.json document described in the module's docstring. ``search``:
    the searches' settings (default the checkpoint's); ``precision``: a resolved precision (fp32
    or bf16: `aiayn.translator.inference_precision`) for the searches; statistics and NLL run on
    the fp32 model. ``importance``: mask each head (needs references; skipped without).
    ``progress``: a progress bar over the masked models on standard error."""
    from .translator import Translator, resolve_device

    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1 (got {batch_size})")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    search = (search or ckpt.search).check()
    device = resolve_device(device)
    model = ckpt.model
    if next(model.parameters()).device != device:
        model = copy.deepcopy(model).to(device)
    model = model.float().eval()
    ckpt = dataclasses.replace(ckpt, model=model)
    cfg, tok = model.config, ckpt.tokenizer
    counts, n_heads = layer_counts(cfg), cfg.n_heads

    # The pairs, encoded; those longer than the model reads are left out, with a warning.
    limit = cfg.max_positions - 1
    keep, sources, targets, skipped = [], [], [], []
    for k, (number, text) in enumerate(zip(inputs.lines, inputs.sources)):
        src_ids = tok.encode(text, "src")
        tgt_ids = tok.encode(inputs.references[k], "tgt") if inputs.references is not None else []
        if len(src_ids) > limit or len(tgt_ids) > limit:
            log.warning("aiayn: warning: %s:%d: the pair has %d/%d subwords, more than the model's %d positions; "
                        "left out", inputs.src_path, number, len(src_ids), len(tgt_ids), limit)
            skipped.append(number)
            continue
        keep.append(k)
        sources.append(src_ids)
        targets.append(tgt_ids)
    if not keep:
        raise UserError("no sentence pair fits the model's positions", path=inputs.src_path)
    src_text = [inputs.sources[k] for k in keep]
    references = None if inputs.references is None else [inputs.references[k] for k in keep]

    baseline_bleu = None
    if references is None:  # the model's own translations are the targets
        translator = Translator(ckpt, search=search, device=device, precision=precision, batch_size=batch_size)
        targets = [hyps[0].tokens for hyps in translator.translate_nbest(src_text)]

    # Reference alignments: words as the model reads them, every link inside the pair.
    src_words = [word_ids(tok.pieces(s, "src")) for s in sources]
    tgt_words = [word_ids(tok.pieces(t, "tgt")) if t else [] for t in targets]
    links = None
    if inputs.links is not None:
        links = [inputs.links[k] for k in keep]
        for row, (k, pair_links) in enumerate(zip(keep, links)):
            n_src, n_tgt = max(src_words[row], default=-1) + 1, max(tgt_words[row], default=-1) + 1
            for i, j in pair_links:
                if i >= n_src or j >= n_tgt:
                    raise UserError(f"link {i}-{j} is outside the pair: its source has {n_src} words, its target "
                                    f"{n_tgt} (0-based, whitespace-separated words of --src and --ref)",
                                    path=inputs.alignments_path, line=inputs.lines[k])

    # Where each head's weight goes (and its alignments), one teacher-forced pass.
    stats = StatisticsAccumulator(counts, n_heads)
    agreements = None
    if links is not None:
        agreements = {(layer, head): Agreement() for layer in range(1, counts["cross"] + 1)
                      for head in [None, *range(1, n_heads + 1)]}
    punct_of: dict[tuple[str, int], bool] = {}

    def punct(ids: list[int], side: str) -> list[bool]:
        out = []
        for i in ids:
            if (side, i) not in punct_of:
                punct_of[side, i] = is_punctuation(tok.pieces([i], side)[0])
            out.append(punct_of[side, i])
        return out

    for index in _batches(sources, targets, batch_size):
        src, tgt_in, _, src_lengths, tgt_lengths = _tensors(sources, targets, index, cfg.pad_id, device)
        weights = model.attention_weights(src, tgt_in)
        src_punct = torch.zeros(src.shape, dtype=torch.bool)
        tgt_punct = torch.zeros(tgt_in.shape, dtype=torch.bool)
        for row, i in enumerate(index):
            src_punct[row, :len(sources[i])] = torch.tensor(punct(sources[i], "src"), dtype=torch.bool)
            tgt_punct[row, 1:len(targets[i]) + 1] = torch.tensor(punct(targets[i], "tgt"), dtype=torch.bool)
        stats.add(weights, src_lengths, tgt_lengths, src_punct, tgt_punct)
        if agreements is not None:
            _alignment_agreements([w.cpu() for w in weights["cross"]], index, sources, targets, links,
                                  src_words, tgt_words, agreements)
    head_stats = stats.result()

    # Importance: each head masked alone, then the pruning curve.
    importance_doc, per_head = None, {}
    if importance and references is not None:
        heads = all_heads(cfg)
        with progress_bar(2 * len(heads) + 1, "heads", "model", enabled=progress) as bar:
            base = _bleu(ckpt, model, src_text, references, search, precision, device, batch_size)
            baseline_bleu, baseline_nll = base["bleu"], nll_per_token(model, sources, targets, batch_size)
            bar.update(1)
            for head in heads:
                masked = mask_heads(model, [head])
                per_head[head] = (_bleu(ckpt, masked, src_text, references, search, precision, device,
                                        batch_size)["bleu"], nll_per_token(masked, sources, targets, batch_size))
                bar.update(1)
            order = sorted(heads, key=lambda h: per_head[h][1] - baseline_nll)  # stable: ties keep all_heads order
            pruning = [{"pruned": 0, "kind": None, "layer": None, "head": None, "bleu": _number(baseline_bleu),
                        "nll": _number(baseline_nll), "delta_bleu": 0.0, "delta_nll": 0.0}]
            curve = [baseline_bleu]  # BLEU after pruning the first k heads of the order
            for k in range(1, len(order) + 1):
                masked = mask_heads(model, order[:k])
                bleu = _bleu(ckpt, masked, src_text, references, search, precision, device, batch_size)["bleu"]
                nll = nll_per_token(masked, sources, targets, batch_size)
                added = order[k - 1]
                curve.append(bleu)
                pruning.append({"pruned": k, "kind": added.kind, "layer": added.layer + 1, "head": added.head + 1,
                                "bleu": _number(bleu), "nll": _number(nll), "delta_bleu": _number(bleu - baseline_bleu),
                                "delta_nll": _number(nll - baseline_nll)})
                bar.update(1)
        prunable = max(k for k, bleu in enumerate(curve) if bleu >= baseline_bleu - BLEU_TOLERANCE)
        importance_doc = {
            "measure": "delta_nll",
            "baseline": {"bleu": _number(baseline_bleu), "nll": _number(baseline_nll),
                         "bleu_signature": base["bleu_signature"]},
            "order": [{"kind": h.kind, "layer": h.layer + 1, "head": h.head + 1} for h in order],
            "pruning": pruning,
            "prunable_heads": prunable,
            "bleu_tolerance": BLEU_TOLERANCE,
        }

    # Alignment agreement, the best cross head, roles.
    alignment_layer_mean = alignment_best = None
    best_head_aer = None
    if agreements is not None:
        alignment_layer_mean = [{"layer": layer, **agreements[layer, None].to_dict()}
                                for layer in range(1, counts["cross"] + 1)]
        candidates = [(agreement.aer, layer, head) for (layer, head), agreement in agreements.items()
                      if not math.isnan(agreement.aer)]
        if candidates:
            aer, layer, head = min(candidates, key=lambda c: c[0])  # min keeps the first of equals
            alignment_best = {"layer": layer, "head": head, "aer": round(aer, 4)}
        head_aers = [c[0] for c in candidates if c[2] is not None]
        best_head_aer = min(head_aers) if head_aers else None

    doc_heads: dict[str, list[list[dict]]] = {}
    roles: dict[str, list[list[str]]] = {}
    for kind in KINDS:
        doc_heads[kind], roles[kind] = [], []
        for layer in range(counts[kind]):
            row_docs, row_roles = [], []
            for head in range(n_heads):
                s = head_stats[kind][layer][head]
                agreement = agreements[layer + 1, head + 1] if agreements is not None and kind == "cross" else None
                aer = None if agreement is None or math.isnan(agreement.aer) else agreement.aer
                role = assign_role(kind, s, aer, best_head_aer if kind == "cross" else None)
                entry = {"layer": layer + 1, "head": head + 1, **{name: _number(s[name]) for name in STATISTICS},
                         "alignment": None if agreement is None else _json_safe(agreement.to_dict()),
                         "bleu": None, "nll": None, "delta_bleu": None, "delta_nll": None, "role": role}
                if per_head:
                    bleu, nll = per_head[Head(kind, layer, head)]
                    entry.update(bleu=_number(bleu), nll=_number(nll), delta_bleu=_number(bleu - baseline_bleu),
                                 delta_nll=_number(nll - baseline_nll))
                row_docs.append(entry)
                row_roles.append(role)
            doc_heads[kind].append(row_docs)
            roles[kind].append(row_roles)

    return {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": str(ckpt.path),
        "sentences": len(sources),
        "skipped_lines": skipped,
        "target": "reference" if references is not None else "translation",
        "search": dataclasses.asdict(search),
        "precision": precision,
        "statistics_precision": "fp32",
        "settings": {
            "src": str(inputs.src_path), "ref": None if inputs.ref_path is None else str(inputs.ref_path),
            "alignments": None if inputs.alignments_path is None else str(inputs.alignments_path),
            "max_sentences": inputs.max_sentences, "importance": importance_doc is not None,
            "batch_size": batch_size, "alignment_rows": ALIGNMENT_ROWS, "bleu_tolerance": BLEU_TOLERANCE,
            "role_thresholds": dict(ROLE_THRESHOLDS),
        },
        "sink_tokens": dict(SINK_TOKENS),
        "layers": counts,
        "n_heads": n_heads,
        "heads": doc_heads,
        "alignment_layer_mean": alignment_layer_mean,
        "alignment_best": alignment_best,
        "importance": importance_doc,
        "roles": roles,
    }


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


# -- writing ---------------------------------------------------------------------------------------


def check_output(out: str | Path, force: bool) -> None:
    """Before any work: ``out`` may be new or an empty directory; a directory ``aiayn heads``
    wrote is replaced only with ``force``; anything else never (`aiayn.files.refuse_to_replace`)."""
    refuse_to_replace(out, force, kind="heads")


def write_report(doc: dict, out: str | Path, *, force: bool = False) -> list[Path]:
    """Write heads.json, heads.md and heads.png into the directory ``out`` (replaced only with
    ``force``, and only if ``aiayn heads`` wrote it), all at once (`aiayn.files.atomic_directory`)."""
    with atomic_directory(out, kind="heads", force=force) as tmp:
        (tmp / "heads.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / "heads.md").write_text(markdown(doc), encoding="utf-8")
        plot(doc, tmp / "heads.png")
    return [Path(out) / name for name in FILES]


def _cell(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(doc: dict) -> str:
    """heads.md: the settings, a table per kind of attention, the alignment of each layer's mean,
    the pruning curve."""
    imp = doc["importance"]
    search = doc["search"]
    lines = [f"# Attention heads of {doc['checkpoint']}", ""]
    target = "the references" if doc["target"] == "reference" else "the model's own translations"
    lines.append(f"{doc['sentences']} sentence pairs of {doc['settings']['src']}, teacher-forced on {target}; "
                 f"search beam {search['beam']}, alpha {search['alpha']:g}, max length "
                 f"{search['max_len_a']:g}·|x| + {search['max_len_b']}, precision {doc['precision']}.")
    if imp is not None:
        base = imp["baseline"]
        lines.append(f"Unmasked: BLEU {base['bleu']:.2f}, NLL {base['nll']:.4f} nats per target token "
                     f"({base['bleu_signature']}).")
    lines += ["", "Shares of the attention weight, averaged over real query rows; sink: </s> for the encoder and "
              "the encoder-decoder attention, <s> for the decoder; entropy in nats; H/log n: entropy over the log "
              "of the keys allowed; confidence: mean largest weight; ΔBLEU and ΔNLL: the head masked alone, minus "
              "the unmasked model. Roles and formulas: docs/heads.md.", ""]
    aligned = doc["alignment_layer_mean"] is not None
    for kind in KINDS:
        columns = [("layer", None), ("head", None)]
        columns += [(name, name) for name in POSITIONAL[kind]]
        columns += [("sink", "sink"), ("punct.", "punctuation"), ("entropy", "entropy"),
                    ("H/log n", "entropy_normalized"), ("confidence", "confidence")]
        if kind == "cross" and aligned:
            columns.append(("AER", "aer"))
        if imp is not None:
            columns += [("ΔBLEU", "delta_bleu"), ("ΔNLL", "delta_nll")]
        columns.append(("role", "role"))
        lines += [f"## {TITLES[kind]}", "", "| " + " | ".join(c[0] for c in columns) + " |",
                  "|" + "|".join(" ---: " if c[1] != "role" else " --- " for c in columns) + "|"]
        for layer in doc["heads"][kind]:
            for entry in layer:
                cells = []
                for title, key in columns:
                    if key is None:
                        cells.append(str(entry[title]))
                    elif key == "role":
                        cells.append(entry["role"])
                    elif key == "aer":
                        cells.append(_cell(None if entry["alignment"] is None else entry["alignment"]["aer"]))
                    elif key == "delta_bleu":
                        cells.append(_cell(entry[key], "{:+.2f}"))
                    elif key == "delta_nll":
                        cells.append(_cell(entry[key], "{:+.4f}"))
                    else:
                        cells.append(_cell(entry[key]))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if aligned:
        best = doc["alignment_best"]
        lines += ["## Alignment of each layer's mean", "", "| layer | precision | recall | AER |", "| ---: | ---: | ---: | ---: |"]
        for entry in doc["alignment_layer_mean"]:
            lines.append(f"| {entry['layer']} | {_cell(entry['precision'])} | {_cell(entry['recall'])} | "
                         f"{_cell(entry['aer'])} |")
        if best is not None:
            which = "the mean of its heads" if best["head"] is None else f"head {best['head']}"
            lines += ["", f"Best: layer {best['layer']}, {which}, AER {best['aer']:.3f}."]
        lines.append("")
    if imp is not None:
        total = len(imp["order"])
        lines += ["## Pruning, least important first (by ΔNLL)", "",
                  "| pruned | head added | BLEU | ΔBLEU | NLL | ΔNLL |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for step in imp["pruning"]:
            added = "–" if step["kind"] is None else f"{step['kind']} {step['layer']}.{step['head']}"
            lines.append(f"| {step['pruned']} | {added} | {_cell(step['bleu'], '{:.2f}')} | "
                         f"{_cell(step['delta_bleu'], '{:+.2f}')} | {_cell(step['nll'], '{:.4f}')} | "
                         f"{_cell(step['delta_nll'], '{:+.4f}')} |")
        lines += ["", f"Heads pruned at a BLEU cost of at most {imp['bleu_tolerance']:g}: "
                      f"{imp['prunable_heads']} of {total}.", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """heads.png: one panel per kind, layers × heads coloured by ΔBLEU (masked alone; by
    confidence without importance), each cell labelled with the head's role; and the pruning
    curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    imp = doc["importance"]
    n_heads = doc["n_heads"]
    width, height = max(4.5, 0.9 * n_heads + 2.2), max(3.2, 0.6 * max(doc["layers"].values()) + 1.6)
    fig, grid_axes = plt.subplots(2, 2, figsize=(2 * width, 2 * height), squeeze=False)
    axes = list(grid_axes.flat)
    if imp is None:
        axes[-1].set_visible(False)
    key = "delta_bleu" if imp is not None else "confidence"
    values = [e[key] for kind in KINDS for layer in doc["heads"][kind] for e in layer if e[key] is not None]
    if imp is not None:
        span = max([abs(v) for v in values] + [1e-6])
        cmap, vmin, vmax, label = "RdBu", -span, span, "ΔBLEU, head masked alone"
    else:
        cmap, vmin, vmax, label = "viridis", 0.0, 1.0, "confidence (mean largest weight)"
    for ax, kind in zip(axes, KINDS):
        grid = np.array([[np.nan if e[key] is None else e[key] for e in layer] for layer in doc["heads"][kind]],
                        dtype=float).reshape(doc["layers"][kind], n_heads)
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for layer, row in enumerate(doc["heads"][kind]):
            for head, entry in enumerate(row):
                text = entry["role"] if entry[key] is None else f"{entry['role']}\n{entry[key]:+.2f}"
                dark = entry[key] is not None and (abs(entry[key]) > 0.6 * vmax if imp is not None
                                                   else entry[key] < 0.5)
                ax.text(head, layer, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_xticks(range(n_heads), [str(h + 1) for h in range(n_heads)])
        ax.set_yticks(range(doc["layers"][kind]), [str(layer + 1) for layer in range(doc["layers"][kind])])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(TITLES[kind], fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    if imp is not None:
        ax = axes[-1]
        steps = imp["pruning"]
        ks = [s["pruned"] for s in steps]
        ax.plot(ks, [np.nan if s["bleu"] is None else s["bleu"] for s in steps], marker=".", color="tab:blue",
                label="BLEU")
        ax.axhline(imp["baseline"]["bleu"] - imp["bleu_tolerance"], color="tab:blue", linestyle=":",
                   label=f"unmasked - {imp['bleu_tolerance']:g}")
        ax.axvline(imp["prunable_heads"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("heads pruned (least important first, by ΔNLL)")
        ax.set_ylabel("BLEU", color="tab:blue")
        twin = ax.twinx()
        twin.plot(ks, [np.nan if s["nll"] is None else s["nll"] for s in steps], color="tab:red", linewidth=0.8)
        twin.set_ylabel("NLL per target token", color="tab:red")
        ax.legend(loc="best", fontsize=7)
        ax.set_title(f"Pruning: {imp['prunable_heads']} of {len(imp['order'])} heads within "
                     f"{imp['bleu_tolerance']:g} BLEU", fontsize=9)
    fig.suptitle(f"Attention heads: {doc['sentences']} sentences", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse_heads(checkpoint: Checkpoint | str | Path, src: str | Path, out: str | Path, *,
                  ref: str | Path | None = None, alignments: str | Path | None = None, max_sentences: int = 500,
                  importance: bool = True, search: SearchConfig | None = None, precision: str = "fp32",
                  device: str | torch.device | None = None, batch_size: int = 64, force: bool = False,
                  progress: bool = False) -> list[Path]:
    """`read_inputs`, `measure_heads` and `write_report` in one call: the files written. The
    output directory and the input files are checked before any model work."""
    check_output(out, force)
    inputs = read_inputs(src, ref, alignments, max_sentences)
    doc = measure_heads(checkpoint, inputs, search=search, precision=precision, device=device,
                        importance=importance, batch_size=batch_size, progress=progress)
    return write_report(doc, out, force=force)
