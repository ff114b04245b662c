"""Greedy and beam search, and the `Translator` behind ``aiayn translate`` (paper §6.1).

The paper (§6.1): "we used beam search with a beam size of 4 and length penalty α = 0.6 ...
We set the maximum output length during inference to input length + 50, but terminate early
when possible." Both searches here decode incrementally with the model's cache (one new
position per step, logits of the last position only) under ``torch.inference_mode()``.

Scoring (GNMT length penalty, Wu et al. 2016, eq. 14). A finished hypothesis Y of source X is
ranked by

    score(Y) = log P(Y | X) / lp(Y),        lp(Y) = ((5 + |Y|) / 6) ** α

where log P(Y | X) = Σ_t log p(y_t | y_<t, X) sums over the output tokens *and* the final EOS,
and |Y| counts those same tokens (output tokens + EOS), as tensor2tensor does. α = 0 ranks by
the raw log-probability, which favours short outputs; α > 0 compensates.

Maximum length. A hypothesis has at most ``floor(a·|x| + b)`` tokens before its EOS, with |x|
the number of source subwords (without the source EOS); the paper's |x| + 50 is a=1, b=50.
At that length EOS is forced, so every hypothesis ends with a real model probability. The
length is also capped at ``config.max_positions - 1``: learned positions stop there, and it
keeps sinusoidal tables from growing inside inference mode.

Early stopping. Log-probabilities are ≤ 0, so a live hypothesis with cumulative log-probability
s and L tokens can at best finish with score s / max(lp(L+1), lp(max_len+1)). A sentence is
done as soon as its n-th best finished score (n = ``nbest``) is at least that bound for its best
live hypothesis: no continuation could change the result. Done sentences leave the batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .model import Transformer
from .packed import is_packed, pack_for_inference, use_int8_kernels
from .shortlist import RestrictedOutput, Shortlist

log = logging.getLogger(__name__)

# Project-wide special ids (aiayn.data.tokenizer): pad=0, unk=1, bos=2, eos=3.
BOS_ID, EOS_ID = 2, 3


@dataclass
class Hypothesis:
    """One search result: output tokens (no bos/eos), the length-penalised score used for
    ranking, and the raw log-probability log P(Y | X) (tokens + EOS)."""

    tokens: list[int]
    score: float
    log_prob: float


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** α, |Y| = output tokens + EOS."""
    return ((5.0 + length) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------------
# Shared pieces of both searches
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while searching; the caller's mode (e.g. the trainer's) is restored after.
    A model already in eval mode is left alone: switching walks every module, twice per
    search, which is not free next to a short sentence's decoding."""
    was_training = model.training
    if not was_training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def max_output_lengths(model: Transformer, src_mask: Tensor, a: float, b: float) -> Tensor:
    """(B,) the most output tokens (before EOS) per sentence: floor(a·|x| + b), |x| without EOS."""
    src_len = (src_mask.sum(1) - 1).clamp(min=0).double()
    limit = torch.floor(a * src_len + b).long()
    return limit.clamp(min=0, max=model.config.max_positions - 1)


def _new_cache(model: Transformer, max_len: Tensor):
    """A decoder cache sized for the longest output allowed (BOS + tokens + EOS), so its
    buffers never grow during the search."""
    return model.new_cache(capacity=int(max_len.max()) + 2 if max_len.numel() else 1)


_CHUNK = 64  # columns per block of the two-pass top-k (fastest of 32/64/128, measured)


def topk_last(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` of a 2-D ``x`` (N, V), best first, in two cheap passes when k ≪ V.

    Exact: split each row into blocks of 64 columns and take every block's maximum (a fully
    vectorised reduction, one read of the row). If a value is among the row's k largest, its
    block is among the k blocks with the largest maxima: otherwise k other blocks each hold a
    value larger than it. So the top k of those k blocks' 64·k values is the top k of the row.
    torch.topk (and max with indices) over the whole row is 4-7x slower on the CPU at decoding
    sizes (N = 1...256 rows, V = 37,000; measured, one thread), and was 13% of a beam-4 int8
    step at batch 64. Ties between equal values may come out in another order than torch.topk.
    """
    n, v = x.shape
    blocks = v // _CHUNK
    if blocks < 4 * k:  # short rows: nothing to gain
        return x.topk(k, dim=-1)
    maxima = x[:, : blocks * _CHUNK].view(n, blocks, _CHUNK).amax(-1)
    if v > blocks * _CHUNK:  # the short last block
        maxima = torch.cat([maxima, x[:, blocks * _CHUNK :].amax(-1, keepdim=True)], dim=1)
    chosen = maxima.topk(k, dim=-1).indices
    cols = (chosen[:, :, None] * _CHUNK + torch.arange(_CHUNK, device=x.device)).view(n, k * _CHUNK)
    outside = cols >= v  # the part of the short block past the row's end
    values = x.gather(1, cols.clamp(max=v - 1)).masked_fill_(outside, -math.inf)
    top, pos = values.topk(k, dim=-1)
    return top, cols.gather(1, pos)


def _top_next(model: Transformer, tokens: Tensor, memory: Tensor, src_mask: Tensor, cache, force: Tensor,
              width: int, output: RestrictedOutput | None = None) -> tuple[Tensor, Tensor]:
    """The ``width`` most probable next tokens of each row of ``tokens`` (N, t), best first:
    (log-probabilities (N, width), token ids (N, width)).

    With a cache only the newest token is fed; without one the whole prefix is recomputed
    (the reference the tests compare the cache against). pad and bos are never outputs; rows
    with ``force`` may only emit EOS, with its true log-probability.

    log p = logit - log Z, Z = Σ exp(logits) over the whole vocabulary (pad and bos included).
    Taking the top ``width`` logits first and normalising only those is exact and never writes
    a (N, V) log-softmax: any of the 2K best (beam, token) extensions is among the 2K best
    tokens of its own beam. Z is then summed in place over the logits, which are no longer
    needed (one read-write pass fewer than torch.logsumexp, and no (N, V) temporary).
    """
    inp = tokens[:, -1:] if cache is not None else tokens
    if output is None:
        logits = model.decode(inp, memory, src_mask, cache=cache, last_only=True)[:, -1].float()
        specials, eos_col = [model.config.pad_id, BOS_ID], EOS_ID
    else:  # a shortlist: logits of its candidates only, and Z over them (pad, bos are not among them)
        logits = output.logits(model.decode_states(inp, memory, src_mask, cache)[:, -1])
        specials, eos_col = [], output.eos
    special = logits[:, specials] if specials else None  # a copy: their mass belongs to Z
    forced = force.nonzero().squeeze(1) if force is not None and force.any() else None
    if forced is not None:  # only EOS may follow; Z of these few rows before any masking
        log_z_forced = torch.logsumexp(logits[forced], dim=-1)
        eos = logits[forced, eos_col]
        logits[forced] = -math.inf
        logits[forced, eos_col] = eos
    if specials:
        logits[:, specials] = -math.inf
    top, index = topk_last(logits, min(width, logits.size(-1)))
    # Z in place, shifted by the row maximum (the best token, or pad/bos if larger) so no exp
    # overflows: log Z = m + log Σ exp(logit - m).
    shift = torch.maximum(top[:, :1], special.amax(dim=-1, keepdim=True)) if specials else top[:, :1]
    mass = logits.sub_(shift).exp_().sum(dim=-1, keepdim=True)
    if specials:
        mass = mass + (special - shift).exp().sum(dim=-1, keepdim=True)
    log_z = shift + mass.log()
    if forced is not None:
        log_z[forced, 0] = log_z_forced
    if output is not None:
        index = output.ids[index]
    return top - log_z, index


# ---------------------------------------------------------------------------------------------
# Greedy search
# ---------------------------------------------------------------------------------------------


def greedy_search(model: Transformer, src: Tensor, max_len_a: float = 1.0, max_len_b: float = 50,
                  use_cache: bool = True, shortlist: Shortlist | None = None) -> list[list[int]]:
    """The most probable next token at every step. src: (B, S) padded ids (tokens + EOS).
    Returns the output tokens of each sentence, without bos/eos."""
    return [tokens for tokens, _ in greedy_search_scored(model, src, max_len_a, max_len_b, use_cache, shortlist)]


@torch.inference_mode()
def greedy_search_scored(model: Transformer, src: Tensor, max_len_a: float = 1.0, max_len_b: float = 50,
                         use_cache: bool = True, shortlist: Shortlist | None = None) -> list[tuple[list[int], float]]:
    """Greedy search that also returns each output's log P(Y | X) (tokens + EOS); with a
    ``shortlist`` (`aiayn.shortlist`) only its candidates for this batch, P normalised over them."""
    with _eval_mode(model):
        src_mask = model.source_mask(src)
        memory = model.encode(src, src_mask)
        max_len = max_output_lengths(model, src_mask, max_len_a, max_len_b)
        batch = src.size(0)
        alive = torch.arange(batch, device=src.device)  # original index of each decoding row
        tokens = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=src.device)
        total = torch.zeros(batch, device=src.device)
        cache = _new_cache(model, max_len) if use_cache else None
        restricted = shortlist.output_layer(model, src) if shortlist is not None else None
        results: list[tuple[list[int], float]] = [([], 0.0)] * batch
        for step in range(int(max_len.max()) + 1 if batch else 0):
            best, token = _top_next(model, tokens, memory, src_mask, cache, max_len == step, width=1, output=restricted)
            best, token = best[:, 0], token[:, 0]
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            total = total + best
            done = token == EOS_ID
            if not done.any():
                continue
            for row in done.nonzero().squeeze(1).tolist():
                results[int(alive[row])] = (tokens[row, 1:-1].tolist(), float(total[row]))
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            alive, tokens, total, max_len = alive[keep], tokens[keep], total[keep], max_len[keep]
            memory, src_mask = memory[keep], src_mask[keep]
            if cache is not None:  # finished sentences leave the batch
                cache.select_sentences(keep)
                cache.reorder(keep)
        return results


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(model: Transformer, src: Tensor, beam: int = 4, alpha: float = 0.6, max_len_a: float = 1.0,
                max_len_b: float = 50, nbest: int = 1, use_cache: bool = True,
                shortlist: Shortlist | None = None) -> list[list[Hypothesis]]:
    """Beam search with the GNMT length penalty (module docstring). src: (B, S) padded ids
    (tokens + EOS). Returns, per sentence, the ``nbest`` best hypotheses, best first.

    Layout: the K beams of sentence i are decoder rows i·K ... i·K+K-1 (the first step, from
    BOS alone, has one row per sentence). The encoder output and the encoder-decoder
    keys/values stay one per sentence; the model's attention groups the K rows onto them, so
    nothing is copied per beam.

    Each step takes the 2K best (beam, token) extensions. EOS candidates among the first K
    finish (as in fairseq, so beam 1 with α = 0 is exactly greedy search); the K best non-EOS
    candidates are the next live beams. With a ``shortlist`` (`aiayn.shortlist`) the search
    considers only its candidates for this batch, with P normalised over them.
    """
    if beam < 1 or not 1 <= nbest <= beam:
        raise UserError(f"need beam >= 1 and 1 <= nbest <= beam (beam {beam}, nbest {nbest})")
    k = beam
    with _eval_mode(model):
        device = src.device
        src_mask = model.source_mask(src)
        memory = model.encode(src, src_mask)
        max_len = max_output_lengths(model, src_mask, max_len_a, max_len_b)
        batch = src.size(0)
        alive = torch.arange(batch, device=device)
        # The first step extends one hypothesis per sentence (BOS alone): K identical rows would
        # cost K times the work and put each output in the beam K times. Its 2K best tokens
        # become the K beams; from then on each sentence has K rows.
        live = 1  # decoder rows per sentence
        tokens = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=device)
        scores = torch.zeros(batch, 1, device=device)
        cache = _new_cache(model, max_len) if use_cache else None
        finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
        nth_best = [-math.inf] * batch  # the nbest-th best finished score of each sentence
        beam_range, ranks = torch.arange(k, device=device), torch.arange(2 * k, device=device)
        sentence_index = torch.arange(batch, device=device)[:, None]
        restricted = shortlist.output_layer(model, src) if shortlist is not None else None
        # Python copies of the live sentences' ids and length limits: the per-step decisions
        # below read them without a tensor operation or a host sync.
        alive_l, limits = alive.tolist(), max_len.tolist()
        for step in range(int(max_len.max()) + 1 if batch else 0):
            n = alive.numel()
            force = (max_len == step).repeat_interleave(live) if step in limits else None
            log_probs, words = _top_next(model, tokens, memory, src_mask, cache, force, width=2 * k, output=restricted)
            width = log_probs.size(-1)
            candidates = (scores[:, :, None] + log_probs.view(n, live, width)).view(n, live * width)
            words = words.view(n, live * width)
            padded = live * width < 2 * k
            if padded:  # fewer than 2K candidates (tiny vocabulary): add impossible ones
                candidates = F.pad(candidates, (0, 2 * k - live * width), value=-math.inf)
                words = F.pad(words, (0, 2 * k - live * width), value=model.config.pad_id)
            top_scores, top_index = candidates.topk(2 * k, dim=1)  # sorted, best first
            top_beam = top_index // width
            if padded:  # a pad's beam: any live one (its score is -inf)
                top_beam.clamp_(max=live - 1)
            top_token = words.gather(1, top_index)
            is_eos = top_token == EOS_ID

            # EOS among the K best: that hypothesis is finished (|Y| = step + 1 with its EOS).
            ends = (is_eos[:, :k] & torch.isfinite(top_scores[:, :k])).nonzero().tolist()
            if ends:
                penalty = length_penalty(step + 1, alpha)
                beams_l, scores_l = top_beam.tolist(), top_scores.tolist()
                for i, j in ends:
                    sentence, log_prob = alive_l[i], scores_l[i][j]
                    output = tokens[i * live + beams_l[i][j], 1:].tolist()
                    finished[sentence].append(Hypothesis(output, log_prob / penalty, log_prob))
                    if len(finished[sentence]) >= nbest:
                        nth_best[sentence] = sorted((h.score for h in finished[sentence]), reverse=True)[nbest - 1]

            # The K best non-EOS candidates continue (EOS ones ranked after all others).
            rank = is_eos.long() * (2 * k) + ranks
            pick = rank.topk(k, dim=1, largest=False).indices  # ascending rank: best first
            scores = top_scores.gather(1, pick)
            rows = (sentence_index[:n] * live + top_beam.gather(1, pick)).view(-1)
            tokens = torch.cat([tokens[rows], top_token.gather(1, pick).view(-1, 1)], dim=1)
            if cache is not None:
                cache.reorder(rows)
            live = k

            # Done: the nbest-th finished score beats anything a live beam could still reach, or
            # the length limit is reached. Neither can hold before a sentence has nbest finished
            # hypotheses or its limit (a sentence whose live beams all fall to -inf then runs on
            # to its limit instead of stopping early: the same outputs).
            if step < min(limits) and all(nth_best[s] == -math.inf for s in alive_l):
                continue
            best_possible = scores[:, 0] / torch.maximum(
                length_penalty(torch.full_like(scores[:, 0], step + 2), alpha),
                length_penalty((max_len + 1).float(), alpha),
            )
            threshold = torch.tensor([nth_best[s] for s in alive_l], device=device)
            done = (threshold >= best_possible) | (max_len <= step)
            if done.any():
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                keep_rows = (keep[:, None] * k + beam_range).view(-1)
                keep_l = keep.tolist()
                alive_l, limits = [alive_l[i] for i in keep_l], [limits[i] for i in keep_l]
                alive, scores, max_len = alive[keep], scores[keep], max_len[keep]
                tokens, memory, src_mask = tokens[keep_rows], memory[keep], src_mask[keep]
                if cache is not None:  # finished sentences leave the batch
                    cache.select_sentences(keep)
                    cache.reorder(keep_rows)
        return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


# ---------------------------------------------------------------------------------------------
# int8 quantisation (CPU)
# ---------------------------------------------------------------------------------------------


def quantize_int8(model: Transformer) -> nn.Module:
    """A copy of ``model`` with every nn.Linear dynamically quantised to int8 (CPU only).

    Weights are stored as int8 with one scale per output channel; activations are quantised
    on the fly per batch. Embeddings stay fp32 (with tied embeddings the output projection
    gets its own int8 copy). The quantised layers then run as `aiayn.packed.Int8Linear`:
    torch's fbgemm kernels on the same packed weights, without the per-call Python of
    torch.ao's module. torch 2.13 still ships ``torch.ao.quantization.quantize_dynamic`` and
    its fbgemm/x86 kernels, but warns that the module is deprecated in favour of torchao (not a
    dependency here); the conversion runs with exactly those warnings silenced. The quantised
    model itself runs without warnings.
    """
    if is_packed(model):
        raise ValueError("quantize_int8 needs the plain fp32 model, not one packed by pack_for_inference")
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # a future torch without torch.ao.quantization
        raise UserError(f"--quantize int8 needs torch.ao.quantization, absent from torch {torch.__version__} ({e})") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
        quantized = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
    return use_int8_kernels(quantized)


# ---------------------------------------------------------------------------------------------
# Translator: text in, text out
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for a block, then restored (None: unchanged).
    The setting is process-wide: concurrent translations in one process share it."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Translation:
    text: str
    tokens: list[int]
    score: float  # log_prob / lp(|Y|); 0 for an empty input line
    log_prob: float


class Translator:
    """Translate lines of text with a checkpoint.

    Inputs are cleaned (NFC, single spaces) and encoded, sorted longest first and batched by
    ``batch_size`` sentences or, if given, ``batch_tokens`` padded source tokens; outputs come
    back in input order. An empty line translates to an empty line. A source longer than
    ``max_src_len`` subwords (default ``config.max_positions - 1``, room for the EOS) is
    truncated with a warning. ``threads``: torch's intra-op threads while translating (default:
    unchanged). ``workers`` > 1 (CPU): that many worker processes translate different batches at
    once, each on ``threads`` threads (default 1), like CTranslate2's ``inter_threads``; a small
    model gains most, as its batches are too small to keep several threads busy. ``prepack``
    (default on): fp32 CPU models run with oneDNN-packed weights (`aiayn.packed`), the same
    function with faster matrix products. ``shortlist``: a vocabulary shortlist file (`aiayn.shortlist`,
    built by ``aiayn shortlist``): each batch's outputs are restricted to its candidates, which is
    faster and changes scores (P normalised over the candidates). ``beam=1`` is greedy search. Every translation is one line of
    text: byte pieces that spell a newline or another control character become spaces
    (`Tokenizer.decode_line`), so output line i is always the translation of input line i.
    """

    def __init__(self, checkpoint, device: str | torch.device | None = None, beam: int = 4, alpha: float = 0.6,
                 max_len_a: float = 1.0, max_len_b: float = 50, batch_size: int = 64, batch_tokens: int | None = None,
                 quantize: str | None = None, max_src_len: int | None = None, threads: int | None = None,
                 prepack: bool = True, workers: int = 1, shortlist: str | Path | None = None):
        from .checkpoint import Checkpoint, load_checkpoint

        owned = not isinstance(checkpoint, Checkpoint)  # loaded here: nobody else holds the model
        ckpt = load_checkpoint(Path(checkpoint), device="cpu") if owned else checkpoint
        if threads is not None and threads < 1:
            raise UserError(f"--threads must be at least 1 (got {threads})")
        if workers < 1:
            raise UserError(f"--workers must be at least 1 (got {workers})")
        if workers > 1 and not owned:
            raise UserError("workers > 1 needs the checkpoint's path (each worker process loads it)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() and quantize is None else "cpu"
        self.device = torch.device(device)
        if workers > 1 and self.device.type != "cpu":
            raise UserError(f"--workers runs on the CPU only (device {self.device})")
        if beam < 1:
            raise UserError(f"--beam must be at least 1 (got {beam})")
        if batch_size < 1 or (batch_tokens is not None and batch_tokens < 1):
            raise UserError("--batch-size and --batch-tokens must be positive")
        self.shortlist = None
        if shortlist is not None:  # read and checked before any model work
            self.shortlist = Shortlist.load(shortlist)
            self.shortlist.check(ckpt.tokenizer, path=shortlist)
        model = ckpt.model.to(self.device)  # the searches switch to eval mode (and back) themselves
        if quantize is not None:
            if quantize != "int8":
                raise UserError(f"unknown --quantize {quantize!r}; known: int8")
            if self.device.type != "cpu":
                raise UserError(f"--quantize int8 runs on the CPU only (device {self.device})")
            model = quantize_int8(model)
        elif prepack:
            # fp32 on the CPU: oneDNN-packed weights (aiayn.packed; unchanged where unavailable).
            # A caller's model is copied, not altered; one loaded here is packed in place.
            model = pack_for_inference(model, inplace=owned)
        self.model, self.tokenizer, self.config = model, ckpt.tokenizer, ckpt.model.config
        self.threads = threads
        # Worker processes (started on first use): each builds this Translator with workers=1.
        self.workers, self._pool = workers, None
        self._worker_args = dict(checkpoint=str(checkpoint), device="cpu", beam=beam, alpha=alpha, max_len_a=max_len_a,
                                 max_len_b=max_len_b, quantize=quantize, max_src_len=max_src_len,
                                 threads=threads or 1, prepack=prepack,
                                 shortlist=None if shortlist is None else str(shortlist))
        self.beam, self.alpha, self.max_len_a, self.max_len_b = beam, alpha, max_len_a, max_len_b
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.max_src_len = max_src_len or self.config.max_positions - 1

    def translate(self, lines: Sequence[str], progress: bool = False) -> list[str]:
        return [n[0].text for n in self.translate_nbest(lines, nbest=1, progress=progress)]

    def translate_nbest(self, lines: Sequence[str], nbest: int = 1, progress: bool = False) -> list[list[Translation]]:
        """The ``nbest`` best translations of each line, best first, in input order."""
        from tqdm import tqdm

        from .data.text import clean

        if not 1 <= nbest <= self.beam:
            raise UserError(f"--nbest must be between 1 and the beam size {self.beam} (got {nbest})")
        texts = [clean(line) for line in lines]
        ids = self.tokenizer.encode_batch(texts) if texts else []
        for number, sentence in enumerate(ids, start=1):
            if len(sentence) > self.max_src_len:
                log.warning("aiayn: warning: input line %d has %d subwords; translating only the first %d",
                            number, len(sentence), self.max_src_len)
                ids[number - 1] = sentence[: self.max_src_len]
        results: list[list[Translation]] = [[Translation("", [], 0.0, 0.0)] for _ in texts]
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
        batches = list(self._batches(order, ids))
        if self.workers > 1 and len(batches) > 1:
            pool = self._worker_pool()
            searched = (f.result() for f in [pool.submit(_worker_search, [ids[i] for i in batch], nbest)
                                             for batch in batches])
        else:
            searched = (self._search([ids[i] for i in batch], nbest) for batch in batches)
        with _torch_threads(self.threads), tqdm(total=len(order), disable=not progress, file=sys.stderr, unit="sent", desc="translate") as bar:
            for batch, hyps_of_batch in zip(batches, searched):
                for i, hyps in zip(batch, hyps_of_batch):
                    results[i] = [Translation(self.tokenizer.decode_line(h.tokens), h.tokens, h.score, h.log_prob)
                                  for h in hyps]
                bar.update(len(batch))
        return results

    def _worker_pool(self):
        """``workers`` processes, each with its own copy of the model. Spawned, not forked: a fork of a
        process whose OpenMP threads are running is unsafe. They inherit the environment (the same
        memory allocator) and end with this Translator (`close`) or with the process."""
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(self._worker_args,))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes, if any (a later translation starts them again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _batches(self, order: list[int], ids: list[list[int]]) -> Iterator[list[int]]:
        """Consecutive runs of ``order`` (longest first) within the sentence or token budget."""
        batch: list[int] = []
        for i in order:
            longest = len(ids[batch[0]]) + 1 if batch else len(ids[i]) + 1  # + EOS
            over_tokens = self.batch_tokens is not None and (len(batch) + 1) * longest > self.batch_tokens
            if batch and (len(batch) >= self.batch_size or over_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _search(self, sentences: list[list[int]], nbest: int) -> list[list[Hypothesis]]:
        src = torch.full((len(sentences), max(map(len, sentences)) + 1), self.config.pad_id, dtype=torch.long)
        for row, sentence in enumerate(sentences):
            src[row, : len(sentence) + 1] = torch.tensor(sentence + [EOS_ID])
        src = src.to(self.device)
        if self.beam == 1:
            return [[Hypothesis(tokens, log_prob / length_penalty(len(tokens) + 1, self.alpha), log_prob)]
                    for tokens, log_prob in greedy_search_scored(self.model, src, self.max_len_a, self.max_len_b,
                                                                 shortlist=self.shortlist)]
        return beam_search(self.model, src, self.beam, self.alpha, self.max_len_a, self.max_len_b, nbest,
                           shortlist=self.shortlist)


_WORKER: Translator | None = None  # in a worker process: its own Translator


def _worker_init(kwargs: dict) -> None:
    global _WORKER
    torch.set_num_threads(kwargs["threads"])
    _WORKER = Translator(**kwargs)


def _worker_search(sentences: list[list[int]], nbest: int) -> list[list[Hypothesis]]:
    return _WORKER._search(sentences, nbest)


def translator_from_args(args) -> Translator:
    """A Translator from the search options of ``aiayn translate`` / ``aiayn evaluate``."""
    return Translator(args.checkpoint, device=args.device, beam=args.beam, alpha=args.alpha,
                      max_len_a=args.max_len_a, max_len_b=args.max_len_b, batch_size=args.batch_size,
                      batch_tokens=args.batch_tokens, quantize=args.quantize, threads=args.threads,
                      prepack=args.prepack, workers=args.workers, shortlist=args.shortlist)


# ---------------------------------------------------------------------------------------------
# aiayn translate
# ---------------------------------------------------------------------------------------------


def read_input_lines(path: str | None) -> list[str]:
    """Lines of a UTF-8 file, or of stdin when ``path`` is None, split on ``\\n`` only.

    Unlike `aiayn.data.text.read_lines` (training data, where an empty file is a mistake), a
    file that is empty or all blank lines is valid here: it has that many empty sentences.
    CRLF endings and a UTF-8 byte-order mark are accepted; invalid UTF-8 or a NUL byte is a
    UserError naming the line.
    """
    name = "<stdin>" if path is None else path
    if path is None:
        data = sys.stdin.buffer.read()
    else:
        if not Path(path).is_file():
            raise UserError("file not found" if not Path(path).exists() else "not a regular file", path=path)
        data = Path(path).read_bytes()
    from .data.text import BOM, decode_lines

    return decode_lines(data.removeprefix(BOM), name)


def check_output_path(path: str | None, force: bool) -> None:
    """Refuse to overwrite an existing --output file unless --force."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError("is a directory, not a file", path=p)
    if p.exists() and not force:
        raise UserError("already exists; pass --force to overwrite it", path=p)
    if not p.parent.is_dir():
        raise UserError("no such directory", path=p.parent)


def format_nbest(index: int, hyps: list[Translation]) -> list[str]:
    """Moses-style n-best lines: sentence index (0-based), score, log-probability, text."""
    return [f"{index}\t{h.score:.4f}\t{h.log_prob:.4f}\t{h.text}" for h in hyps]


def _interactive(translator: Translator, nbest: int, out) -> None:
    """Translate each line as it is typed; prompts go to stderr so stdout stays clean."""
    print("aiayn: type a sentence and press Enter; Ctrl-D quits.", file=sys.stderr)
    index = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        hyps = translator.translate_nbest([line.rstrip("\r\n")], nbest=nbest)[0]
        text = "\n".join(format_nbest(index, hyps)) if nbest > 1 else hyps[0].text
        print(text, file=out, flush=True)
        index += 1


def translate_main(args) -> int:
    """``aiayn translate``: stdin or --input -> stdout or --output, in input order."""
    check_output_path(args.output, args.force)
    interactive = args.input is None and sys.stdin.isatty()
    lines = None if interactive else read_input_lines(args.input)
    translator = translator_from_args(args)
    if interactive:
        if args.output is None:
            _interactive(translator, args.nbest, sys.stdout)
        else:
            with open(args.output, "w", encoding="utf-8") as out:
                _interactive(translator, args.nbest, out)
        return 0
    # A progress bar for files of many lines (tqdm, on stderr).
    results = translator.translate_nbest(lines, nbest=args.nbest, progress=len(lines) >= 100)
    if args.nbest > 1:
        output = [row for i, hyps in enumerate(results) for row in format_nbest(i, hyps)]
    else:
        output = [hyps[0].text for hyps in results]
    text = "".join(line + "\n" for line in output)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0
