"""Greedy and beam search (aiayn.search): tensors in, hypotheses out.

Most tests use small random models: the properties checked (cache = no cache, beam 1 =
greedy, exactness of a wide beam, scores = model log-probabilities, order restored) hold for
any weights. The toy model's EOS row is scaled so outputs end at many different lengths,
which exercises early stopping and finished sentences leaving the batch.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from aiayn.config import SearchConfig
from aiayn.search import (
    _rescore_best,
    _top_among,
    beam_search,
    greedy_search,
    greedy_search_scored,
    length_penalty,
    topk_last,
)

from helpers import EOS_ID, LENGTHS, batch_of, model_log_prob, toy_model


def test_outputs_end_at_varied_lengths():
    """Precondition of the tests below: the toy model does stop early, at different lengths."""
    lengths = [len(t) for t in greedy_search(toy_model(), batch_of(LENGTHS), SearchConfig(max_len_b=10))]
    assert len(set(lengths)) >= 4
    assert any(n < src + 10 for n, src in zip(lengths, LENGTHS))


def test_beam_one_equals_greedy():
    # With alpha = 0 both rank by log-probability; with alpha > 0 a one-wide beam may still
    # prefer a longer continuation over an early EOS, which greedy search never does.
    model, src = toy_model(), batch_of(LENGTHS)
    greedy = greedy_search(model, src, SearchConfig(max_len_b=10))
    beam = beam_search(model, src, SearchConfig(beam=1, alpha=0.0, max_len_b=10))
    assert [h[0].tokens for h in beam] == greedy


@pytest.mark.parametrize("norm_first", [False, True])
def test_cache_equals_no_cache(norm_first):
    model, src = toy_model(norm_first=norm_first), batch_of(LENGTHS)
    assert greedy_search(model, src, SearchConfig(max_len_b=10)) == greedy_search(model, src, SearchConfig(max_len_b=10), use_cache=False)
    cached = beam_search(model, src, SearchConfig(beam=4, alpha=0.6, max_len_b=10), nbest=4)
    full = beam_search(model, src, SearchConfig(beam=4, alpha=0.6, max_len_b=10), nbest=4, use_cache=False)
    for a, b in zip(cached, full):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_beam_search_first_step_decodes_one_row_per_sentence():
    """The K beams all start from BOS: the first step decodes each sentence once, later steps
    K rows per live sentence."""
    model, src = toy_model(), batch_of(LENGTHS)
    rows = []
    hook = model.generator.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    try:
        beam_search(model, src, SearchConfig(beam=3, alpha=0.6, max_len_b=10))
    finally:
        hook.remove()
    assert rows[0] == len(LENGTHS)
    assert rows[1] == 3 * len(LENGTHS) and all(r % 3 == 0 for r in rows[1:])


def test_nbest_scores_sorted_and_equal_model_log_probs():
    model, src = toy_model(), batch_of(LENGTHS)
    alpha = 0.6
    results = beam_search(model, src, SearchConfig(beam=4, alpha=alpha, max_len_b=10), nbest=4)
    for row, hyps in enumerate(results):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4  # no duplicates
        for h in hyps:
            log_prob = model_log_prob(model, src[row], h.tokens)
            assert h.log_prob == pytest.approx(log_prob, abs=1e-4)
            # score = log P(Y|X) / ((5 + |Y|) / 6)^alpha, |Y| = tokens + EOS
            assert h.score == pytest.approx(log_prob / ((5 + len(h.tokens) + 1) / 6) ** alpha, abs=1e-4)


def test_greedy_log_prob_is_the_models():
    model, src = toy_model(), batch_of(LENGTHS)
    for row, (tokens, log_prob) in enumerate(greedy_search_scored(model, src, SearchConfig(max_len_b=10))):
        assert log_prob == pytest.approx(model_log_prob(model, src[row], tokens), abs=1e-4)


@pytest.mark.parametrize("vocab", [300, 643, 1024])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_topk_last_equals_torch_topk(vocab, k):
    """The two-pass top-k (blocks of 64 columns, a short last block when 64 does not divide V)
    returns torch.topk's values and indices, including rows whose best values share a block,
    sit in the short last block, or are mostly -inf (a row forced to EOS)."""
    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(16, vocab, generator=g)
    x[1, :64] += 10.0  # all of the best in one block
    x[2, -(vocab % 64 or 64):] += 10.0  # all of the best in the last block
    x[3] = -math.inf
    x[3, EOS_ID] = 0.5
    x[4, -1] += 20.0  # the best in the last column (643: a last block of 3 columns)
    top, index = topk_last(x, k)
    ref_top, ref_index = x.topk(k, dim=-1)
    assert torch.equal(top, ref_top)
    assert torch.equal(index[torch.isfinite(top)], ref_index[torch.isfinite(ref_top)])


def test_top_among_rescored_columns_equals_the_whole_rows_top_k():
    """bf16 logits: the top-k taken among the rescored columns alone (`_top_among`) is the
    whole row's top-k whenever it answers; where a logit outside could be larger (the k-th
    best among the columns is not above the bound), it declines instead of guessing."""
    g = torch.Generator().manual_seed(5)
    exact = torch.randn(32, 700, generator=g) * 3
    rounded = exact.bfloat16().float()
    logits = rounded.clone()
    ids, bound = _rescore_best(logits, exact, lambda states, cols: states.gather(1, cols), width=8)
    found = _top_among(logits, ids, bound, 8)
    assert found is not None
    top, index = found
    ref_top, ref_index = logits.topk(8, dim=-1)
    assert torch.equal(top, ref_top) and torch.equal(index, ref_index)
    # Rescored values pushed below the bound: a column outside might now be among the best.
    logits[0, ids[0]] = bound[0, 0] - 1.0
    assert _top_among(logits, ids, bound, 8) is None


def test_large_vocabulary_searches_score_with_the_models_log_probs():
    """A vocabulary large enough for the two-pass top-k and the in-place log Z: beam and greedy
    log-probabilities (forced EOS included: max_len_b is short) equal teacher-forced ones, and
    beam 1 still equals greedy."""
    vocab = 700
    model, src = toy_model(vocab=vocab), batch_of(LENGTHS, vocab=vocab)
    for row, hyps in enumerate(beam_search(model, src, SearchConfig(beam=4, alpha=0.6, max_len_b=4), nbest=4)):
        for h in hyps:
            assert h.log_prob == pytest.approx(model_log_prob(model, src[row], h.tokens), abs=1e-4)
    greedy = greedy_search_scored(model, src, SearchConfig(max_len_b=4))
    for row, (tokens, log_prob) in enumerate(greedy):
        assert log_prob == pytest.approx(model_log_prob(model, src[row], tokens), abs=1e-4)
    assert any(len(tokens) == 4 + LENGTHS[row] for row, (tokens, _) in enumerate(greedy))  # some were forced
    beam = beam_search(model, src, SearchConfig(beam=1, alpha=0.0, max_len_b=4))
    assert [h[0].tokens for h in beam] == [tokens for tokens, _ in greedy]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_best_output_exactly(alpha):
    """Outputs may use unk and 2 real tokens, at most 2 of them: 13 outputs in all. A beam of 16
    keeps every prefix and every EOS candidate, so beam search (with its early stopping) must
    return the true top 4."""
    vocab, max_len = 6, 2
    model = toy_model(vocab=vocab, seed=1)
    src = batch_of([2, 3, 1], vocab=vocab)
    results = beam_search(model, src, SearchConfig(beam=16, alpha=alpha, max_len_a=0.0, max_len_b=max_len), nbest=4)
    outputs = [list(y) for n in range(max_len + 1) for y in itertools.product([1, 4, 5], repeat=n)]
    for row, hyps in enumerate(results):
        scored = sorted(((model_log_prob(model, src[row], y) / length_penalty(len(y) + 1, alpha), y) for y in outputs),
                        reverse=True)
        assert [h.tokens for h in hyps] == [y for _, y in scored[:4]]
        assert [h.score for h in hyps] == pytest.approx([s for s, _ in scored[:4]], abs=1e-4)


def test_batched_search_equals_one_sentence_at_a_time():
    """Sentences finishing (and leaving the batch) must not disturb the others."""
    model, src = toy_model(), batch_of(LENGTHS)
    batched = beam_search(model, src, SearchConfig(beam=3, alpha=0.6, max_len_b=10), nbest=2)
    greedy = greedy_search(model, src, SearchConfig(max_len_b=10))
    for row in range(src.size(0)):
        one = src[row : row + 1, : LENGTHS[row] + 1]
        alone = beam_search(model, one, SearchConfig(beam=3, alpha=0.6, max_len_b=10), nbest=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[row]]
        assert greedy_search(model, one, SearchConfig(max_len_b=10))[0] == greedy[row]


def test_max_length_is_a_times_source_plus_b():
    model = toy_model()
    with torch.no_grad():  # never emit EOS voluntarily: every output runs to the limit
        final_norm = model.decoder.layers[-1].sublayers[2].norm  # post-LN: the decoder's output
        final_norm.weight[0], final_norm.bias[0] = 0.0, 100.0  # feature 0 is always 100 ...
        model.generator.weight[:, 0] = 0.0
        model.generator.weight[EOS_ID, 0] = -1.0  # ... so the EOS logit is always -100
    src = batch_of([3, 6, 1])
    for a, b in [(1.0, 2), (0.5, 0), (0.0, 0)]:
        expected = [int(a * n + b) for n in [3, 6, 1]]
        assert [len(t) for t in greedy_search(model, src, SearchConfig(max_len_a=a, max_len_b=b))] == expected
        assert [len(h[0].tokens) for h in beam_search(model, src, SearchConfig(beam=2, alpha=0.6, max_len_a=a, max_len_b=b))] == expected


def test_search_restores_training_mode():
    model = toy_model(dropout=0.1).train()
    greedy_search(model, batch_of([3]), SearchConfig(max_len_b=2))
    assert model.training


