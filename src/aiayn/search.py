"""Greedy and beam search: source ids in, hypotheses out (paper §6.1).

The paper (§6.1): "we used beam search with a beam size of 4 and length penalty α = 0.6 ...
We set the maximum output length during inference to input length + 50, but terminate early
when possible." Those settings are `aiayn.config.SearchConfig`'s defaults. Both searches decode
incrementally with the decoder cache (`aiayn.inference.step.decode_step`: one new position per
step, logits of the last position only) under ``torch.inference_mode()``; with
``use_cache=False`` they recompute the whole prefix through ``Transformer.decode`` instead (the
reference the tests compare the cache against).

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

Shortlist (`aiayn.inference.shortlist`): each sentence may produce only its own candidates, and
its probabilities are normalised over them; the logits are computed once for the union of the
batch's candidates, and each sentence's row masks the others' out, so a sentence's result never
depends on the sentences batched with it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SearchConfig
from .data.tokenizer import BOS_ID, EOS_ID
from .errors import UserError
from .inference.shortlist import RestrictedOutput, Shortlist
from .inference.step import decode_step, new_cache
from .model import Transformer


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


def search(model: Transformer, src: Tensor, config: SearchConfig = SearchConfig(), nbest: int = 1,
           shortlist: Shortlist | None = None) -> list[list[Hypothesis]]:
    """The ``nbest`` best hypotheses of each sentence of ``src`` (B, S): beam search, or greedy
    search when ``config.beam`` is 1 (then ``nbest`` must be 1)."""
    if config.beam == 1:
        if nbest != 1:
            raise UserError(f"nbest must be between 1 and the beam size 1 (got {nbest})")
        return [[Hypothesis(tokens, log_prob / length_penalty(len(tokens) + 1, config.alpha), log_prob)]
                for tokens, log_prob in greedy_search_scored(model, src, config, shortlist=shortlist)]
    return beam_search(model, src, config, nbest=nbest, shortlist=shortlist)


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
    return new_cache(model, capacity=int(max_len.max()) + 2 if max_len.numel() else 1)


def _decoder_states(model: Transformer, tokens: Tensor, memory: Tensor, src_mask: Tensor, cache) -> Tensor:
    """(N, d_model) decoder output at the newest position of each row of ``tokens`` (N, t). With a
    cache only the newest token is fed; without one the whole prefix is recomputed, with each
    sentence's encoder output repeated for its N / B rows."""
    if cache is not None:
        return decode_step(model, tokens[:, -1:], memory, src_mask, cache)[:, -1]
    rows = tokens.size(0) // memory.size(0)
    if rows > 1:
        memory, src_mask = memory.repeat_interleave(rows, 0), src_mask.repeat_interleave(rows, 0)
    return model.decode(tokens, memory, src_mask)[:, -1]


_CHUNK = 64  # columns per block of the two-pass top-k (the fastest of 32/64/128 on the CPU)


def topk_last(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` of a 2-D ``x`` (N, V), best first, in two cheap passes when k ≪ V.

    Exact: split each row into blocks of 64 columns and take every block's maximum (a fully
    vectorised reduction, one read of the row). If a value is among the row's k largest, its
    block is among the k blocks with the largest maxima: otherwise k other blocks each hold a
    value larger than it. So the top k of those k blocks' 64·k values is the top k of the row.
    torch.topk (and max with indices) over the whole row is several times slower on the CPU at
    decoding sizes (benchmarks/RESULTS.md). Ties between equal values may come out in another
    order than torch.topk.
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


RESCORE_EXTRA = 8  # bf16 logits: candidates recomputed in fp32 beyond the ``width`` a step keeps


def _rescore_best(logits: Tensor, states: Tensor, rescore, width: int) -> tuple[Tensor, Tensor]:
    """bf16 logits (N, V), in place: the ``width + RESCORE_EXTRA`` largest of each row replaced
    by their fp32 values, ``rescore(states, ids)``. The rounded logits only choose which tokens
    to recompute; those a step keeps are among them unless a token outside lost more than the
    gap to the extra ones to rounding. The log-probabilities then come from fp32 logits, with Z
    differing from fp32's only in the rounded rest of the row.

    Returns the rescored ids (N, m) and (N, 1) the smallest rounded logit among them: no logit
    outside ``ids`` is larger (`_top_among`)."""
    rounded, ids = topk_last(logits, min(width + RESCORE_EXTRA, logits.size(-1)))
    logits.scatter_(1, ids, rescore(states, ids).to(logits.dtype))
    return ids, rounded[:, -1:]


def _top_among(logits: Tensor, ids: Tensor, bound: Tensor, width: int) -> tuple[Tensor, Tensor] | None:
    """The ``width`` largest logits of each row and their ids, found among the columns ``ids``
    alone, or None where that cannot be sure. Every logit outside ``ids`` is at most ``bound``
    (the rescored columns were the row's largest before rescoring), so if each row's
    ``width``-th best among ``ids`` is above its bound, the row's top ``width`` are all in
    ``ids``: the same result as a top-k over the whole row (`topk_last`), without reading it."""
    top, pos = logits.gather(1, ids).topk(width, dim=-1)
    if not bool((top[:, -1:] > bound).all()):
        return None
    return top, ids.gather(1, pos)


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
    states = _decoder_states(model, tokens, memory, src_mask, cache)
    if output is None:
        logits = model.generator(states).float()
        rescore = getattr(model.generator, "rescore", None)  # bf16 logits (inference.packed.RescoredLogits)
        rescored = _rescore_best(logits, states, rescore, width) if rescore is not None else None
        specials, eos_col = [model.config.pad_id, BOS_ID], EOS_ID
    else:  # a shortlist: logits of each sentence's candidates only, and Z over them (no pad, bos)
        logits = output.logits(states)
        specials, eos_col = [], output.eos
        rescored = None
    special = logits[:, specials] if specials else None  # a copy: their mass belongs to Z
    forced = force.nonzero().squeeze(1) if force is not None and force.any() else None
    if forced is not None:  # only EOS may follow; Z of these few rows before any masking
        log_z_forced = torch.logsumexp(logits[forced], dim=-1)
        eos = logits[forced, eos_col]
        logits[forced] = -math.inf
        logits[forced, eos_col] = eos
    if specials:
        logits[:, specials] = -math.inf
    width = min(width, logits.size(-1))
    # bf16 logits: the best are usually among the rescored columns, a pass over the row fewer.
    found = _top_among(logits, *rescored, width) if rescored is not None and forced is None else None
    top, index = found if found is not None else topk_last(logits, width)
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


def greedy_search(model: Transformer, src: Tensor, config: SearchConfig = SearchConfig(), *,
                  use_cache: bool = True, shortlist: Shortlist | None = None) -> list[list[int]]:
    """The most probable next token at every step. src: (B, S) padded ids (tokens + EOS).
    Returns the output tokens of each sentence, without bos/eos. ``config.beam`` and
    ``config.alpha`` are not used (greedy search ranks nothing)."""
    return [tokens for tokens, _ in greedy_search_scored(model, src, config, use_cache=use_cache, shortlist=shortlist)]


@torch.inference_mode()
def greedy_search_scored(model: Transformer, src: Tensor, config: SearchConfig = SearchConfig(), *,
                         use_cache: bool = True, shortlist: Shortlist | None = None) -> list[tuple[list[int], float]]:
    """Greedy search that also returns each output's log P(Y | X) (tokens + EOS); with a
    ``shortlist`` (`aiayn.inference.shortlist`) only each sentence's candidates, P normalised over them."""
    with _eval_mode(model):
        src_mask = model.source_mask(src)
        memory = model.encode(src, src_mask)
        max_len = max_output_lengths(model, src_mask, config.max_len_a, config.max_len_b)
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
            if restricted is not None:
                restricted = restricted.select(keep)
            if cache is not None:  # finished sentences leave the batch
                cache.select_sentences(keep)
                cache.reorder(keep)
        return results


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(model: Transformer, src: Tensor, config: SearchConfig = SearchConfig(), *, nbest: int = 1,
                use_cache: bool = True, shortlist: Shortlist | None = None) -> list[list[Hypothesis]]:
    """Beam search with the GNMT length penalty (module docstring). src: (B, S) padded ids
    (tokens + EOS). Returns, per sentence, the ``nbest`` best hypotheses, best first.

    Layout: the K beams of sentence i are decoder rows i·K ... i·K+K-1 (the first step, from
    BOS alone, has one row per sentence). The encoder output and the encoder-decoder
    keys/values stay one per sentence; the model's attention groups the K rows onto them, so
    nothing is copied per beam.

    Each step takes the 2K best (beam, token) extensions. EOS candidates among the first K
    finish (as in fairseq, so beam 1 with α = 0 is exactly greedy search); the K best non-EOS
    candidates are the next live beams. With a ``shortlist`` (`aiayn.inference.shortlist`) the search
    considers only each sentence's candidates, with P normalised over them.
    """
    beam, alpha = config.beam, config.alpha
    if beam < 1 or not 1 <= nbest <= beam:
        raise UserError(f"nbest must be between 1 and the beam size {beam} (got {nbest})")
    k = beam
    with _eval_mode(model):
        device = src.device
        src_mask = model.source_mask(src)
        memory = model.encode(src, src_mask)
        max_len = max_output_lengths(model, src_mask, config.max_len_a, config.max_len_b)
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
                if restricted is not None:
                    restricted = restricted.select(keep)
                if cache is not None:  # finished sentences leave the batch
                    cache.select_sentences(keep)
                    cache.reorder(keep_rows)
        return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


