"""Greedy and beam search, the Translator and `aiayn translate`.

Most tests use small random models: the properties checked (cache = no cache, beam 1 =
greedy, exactness of a wide beam, scores = model log-probabilities, order restored) hold for
any weights. The toy model's EOS row is scaled so outputs end at many different lengths,
which exercises early stopping and finished sentences leaving the batch.
"""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch

from aiayn.cli import main
from conftest import BYTE_PIECE_OUTPUT, BYTE_PIECE_TEXT, TEXT, UNSEEN_COPY_INPUTS
from aiayn.decode import (
    BOS_ID,
    EOS_ID,
    Translator,
    beam_search,
    greedy_search,
    greedy_search_scored,
    length_penalty,
    quantize_int8,
    topk_last,
)
from aiayn.model import Transformer, TransformerConfig
from aiayn.packed import Int8Linear

VOCAB = 24


def toy_model(vocab: int = VOCAB, seed: int = 2, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(src_vocab_size=vocab, d_model=32, d_ff=64, n_heads=4, n_encoder_layers=2,
                  n_decoder_layers=2, dropout=0.0, tie_embeddings="none")
    fields.update(overrides)
    model = Transformer(TransformerConfig(**fields)).eval()
    with torch.no_grad():  # peakier distributions, and EOS likely enough to end at varied lengths
        model.generator.weight.mul_(2.0)
        model.generator.weight[EOS_ID].mul_(1.5)
    return model


def batch_of(lengths: list[int], vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """A padded source batch: random tokens + EOS, rows of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths) + 1, dtype=torch.long)
    for row, n in enumerate(lengths):
        src[row, :n] = torch.randint(4, vocab, (n,), generator=g)
        src[row, n] = EOS_ID
    return src


LENGTHS = [3, 7, 5, 1, 9, 4, 12, 2]


def model_log_prob(model: Transformer, src_row: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens + EOS | src) by one teacher-forced forward pass (no search, no cache)."""
    src = src_row[src_row.ne(0) | (torch.arange(src_row.numel()) == 0)].unsqueeze(0)
    tgt_in = torch.tensor([[BOS_ID] + tokens])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src, tgt_in).float(), dim=-1)[0]
    gold = tokens + [EOS_ID]
    return sum(log_probs[t, w].item() for t, w in enumerate(gold))


def test_outputs_end_at_varied_lengths():
    """Precondition of the tests below: the toy model does stop early, at different lengths."""
    lengths = [len(t) for t in greedy_search(toy_model(), batch_of(LENGTHS), max_len_b=10)]
    assert len(set(lengths)) >= 4
    assert any(n < src + 10 for n, src in zip(lengths, LENGTHS))


def test_beam_one_equals_greedy():
    # With alpha = 0 both rank by log-probability; with alpha > 0 a one-wide beam may still
    # prefer a longer continuation over an early EOS, which greedy search never does.
    model, src = toy_model(), batch_of(LENGTHS)
    greedy = greedy_search(model, src, max_len_b=10)
    beam = beam_search(model, src, beam=1, alpha=0.0, max_len_b=10)
    assert [h[0].tokens for h in beam] == greedy


@pytest.mark.parametrize("norm_first", [False, True])
def test_cache_equals_no_cache(norm_first):
    model, src = toy_model(norm_first=norm_first), batch_of(LENGTHS)
    assert greedy_search(model, src, max_len_b=10) == greedy_search(model, src, max_len_b=10, use_cache=False)
    cached = beam_search(model, src, beam=4, alpha=0.6, max_len_b=10, nbest=4)
    full = beam_search(model, src, beam=4, alpha=0.6, max_len_b=10, nbest=4, use_cache=False)
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
        beam_search(model, src, beam=3, alpha=0.6, max_len_b=10)
    finally:
        hook.remove()
    assert rows[0] == len(LENGTHS)
    assert rows[1] == 3 * len(LENGTHS) and all(r % 3 == 0 for r in rows[1:])


def test_nbest_scores_sorted_and_equal_model_log_probs():
    model, src = toy_model(), batch_of(LENGTHS)
    alpha = 0.6
    results = beam_search(model, src, beam=4, alpha=alpha, max_len_b=10, nbest=4)
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
    for row, (tokens, log_prob) in enumerate(greedy_search_scored(model, src, max_len_b=10)):
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


def test_large_vocabulary_searches_score_with_the_models_log_probs():
    """A vocabulary large enough for the two-pass top-k and the in-place log Z: beam and greedy
    log-probabilities (forced EOS included: max_len_b is short) equal teacher-forced ones, and
    beam 1 still equals greedy."""
    vocab = 700
    model, src = toy_model(vocab=vocab), batch_of(LENGTHS, vocab=vocab)
    for row, hyps in enumerate(beam_search(model, src, beam=4, alpha=0.6, max_len_b=4, nbest=4)):
        for h in hyps:
            assert h.log_prob == pytest.approx(model_log_prob(model, src[row], h.tokens), abs=1e-4)
    greedy = greedy_search_scored(model, src, max_len_b=4)
    for row, (tokens, log_prob) in enumerate(greedy):
        assert log_prob == pytest.approx(model_log_prob(model, src[row], tokens), abs=1e-4)
    assert any(len(tokens) == 4 + LENGTHS[row] for row, (tokens, _) in enumerate(greedy))  # some were forced
    beam = beam_search(model, src, beam=1, alpha=0.0, max_len_b=4)
    assert [h[0].tokens for h in beam] == [tokens for tokens, _ in greedy]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_best_output_exactly(alpha):
    """Outputs may use unk and 2 real tokens, at most 2 of them: 13 outputs in all. A beam of 16
    keeps every prefix and every EOS candidate, so beam search (with its early stopping) must
    return the true top 4."""
    vocab, max_len = 6, 2
    model = toy_model(vocab=vocab, seed=1)
    src = batch_of([2, 3, 1], vocab=vocab)
    results = beam_search(model, src, beam=16, alpha=alpha, max_len_a=0.0, max_len_b=max_len, nbest=4)
    outputs = [list(y) for n in range(max_len + 1) for y in itertools.product([1, 4, 5], repeat=n)]
    for row, hyps in enumerate(results):
        scored = sorted(((model_log_prob(model, src[row], y) / length_penalty(len(y) + 1, alpha), y) for y in outputs),
                        reverse=True)
        assert [h.tokens for h in hyps] == [y for _, y in scored[:4]]
        assert [h.score for h in hyps] == pytest.approx([s for s, _ in scored[:4]], abs=1e-4)


def test_batched_search_equals_one_sentence_at_a_time():
    """Sentences finishing (and leaving the batch) must not disturb the others."""
    model, src = toy_model(), batch_of(LENGTHS)
    batched = beam_search(model, src, beam=3, alpha=0.6, max_len_b=10, nbest=2)
    greedy = greedy_search(model, src, max_len_b=10)
    for row in range(src.size(0)):
        one = src[row : row + 1, : LENGTHS[row] + 1]
        alone = beam_search(model, one, beam=3, alpha=0.6, max_len_b=10, nbest=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[row]]
        assert greedy_search(model, one, max_len_b=10)[0] == greedy[row]


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
        assert [len(t) for t in greedy_search(model, src, a, b)] == expected
        assert [len(h[0].tokens) for h in beam_search(model, src, 2, 0.6, a, b)] == expected


def test_search_restores_training_mode():
    model = toy_model(dropout=0.1).train()
    greedy_search(model, batch_of([3]), max_len_b=2)
    assert model.training


# ---------------------------------------------------------------------------------------------
# Translator and the command line, on a checkpoint of a random model with a real tokenizer
# ---------------------------------------------------------------------------------------------

def test_translator_restores_input_order(random_checkpoint):
    lines = ["a dog", "", "the cat sat on the mat and the dog runs in the park", "two men", "a woman is reading", "x"]
    translator = Translator(random_checkpoint, beam=2, max_len_b=5, batch_size=2)
    batched = translator.translate(lines)
    assert batched == [translator.translate([line])[0] for line in lines]
    assert batched[1] == ""
    by_tokens = Translator(random_checkpoint, beam=2, max_len_b=5, batch_tokens=12).translate(lines)
    assert by_tokens == batched
    nbest = translator.translate_nbest(lines, nbest=2)
    assert [n[0].text for n in nbest] == batched
    assert all(n[0].score >= n[1].score for n in nbest if len(n) == 2)


def test_over_long_line_is_truncated_with_a_warning(random_checkpoint, caplog):
    long_line = " ".join(TEXT * 10)  # far beyond max_positions = 64 learned positions
    translator = Translator(random_checkpoint, beam=2, max_len_b=3)
    with caplog.at_level(logging.WARNING, logger="aiayn.decode"):
        out = translator.translate(["a dog", long_line])
    assert len(out) == 2
    assert "input line 2 has" in caplog.text and "first 63" in caplog.text


def test_int8_quantization_is_warning_free_and_close(random_checkpoint):
    translator = Translator(random_checkpoint, beam=2, max_len_b=3, prepack=False)  # plain nn.Linear layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantized = quantize_int8(translator.model)
    assert isinstance(quantized.generator, Int8Linear)
    src = torch.tensor([[5, 6, 7, 8, EOS_ID]])
    tgt = torch.tensor([[BOS_ID, 9, 10]])
    with torch.inference_mode():
        ref, q = translator.model(src, tgt), quantized(src, tgt)
    assert (q - ref).abs().max() < 0.05 * ref.abs().max()
    assert isinstance(translator.model.generator, torch.nn.Linear)  # the original is untouched
    assert len(Translator(random_checkpoint, quantize="int8", beam=2, max_len_b=3).translate(TEXT)) == len(TEXT)


def test_cli_translate_files(random_checkpoint, tmp_path, capsys):
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("a dog\n\nthe cat\n", encoding="utf-8")
    args = ["translate", "--checkpoint", str(random_checkpoint), "--input", str(inp), "--max-len-b", "4"]
    assert main(args + ["--output", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    expected = Translator(random_checkpoint, max_len_b=4).translate(["a dog", "", "the cat"])
    assert lines[:3] == expected
    # An existing output file is never overwritten silently.
    out.write_text("keep me\n", encoding="utf-8")
    assert main(args + ["--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "keep me\n"
    assert main(args + ["--output", str(out), "--force"]) == 0
    assert out.read_text(encoding="utf-8").split("\n")[:3] == expected
    # n-best: INDEX, SCORE, LOG_PROB, TEXT; two per line, best first; one empty row for an empty line.
    assert main(args + ["--nbest", "2"]) == 0
    rows = [r.split("\t") for r in capsys.readouterr().out.splitlines()]
    assert [int(r[0]) for r in rows] == [0, 0, 1, 2, 2]
    assert rows[2] == ["1", "0.0000", "0.0000", ""]
    assert rows[0][3] == expected[0] and float(rows[0][1]) >= float(rows[1][1])


def test_cli_translate_stdin_subprocess(random_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "aiayn", "translate", "--checkpoint", str(random_checkpoint),
                           "--beam", "1", "--max-len-b", "3"],
                          input="a dog\nthe cat\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == Translator(random_checkpoint, beam=1, max_len_b=3).translate(["a dog", "the cat"])


def test_cli_missing_or_corrupt_checkpoint(random_checkpoint, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("a dog\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(tmp_path / "nope"), "--input", str(inp)]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "spm.model"):
        (broken / name).write_bytes((random_checkpoint / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert main(["translate", "--checkpoint", str(broken), "--input", str(inp)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_copy_model_copies_unseen_inputs(copy_checkpoint):
    """The text path (clean, encode, sort and batch, search, decode, restore the order) of a model
    trained on the copy task (tests/conftest.py, which checks the model on token ids) copies
    unseen inputs exactly."""
    lines = UNSEEN_COPY_INPUTS
    assert Translator(copy_checkpoint, beam=4).translate(lines) == lines
    assert Translator(copy_checkpoint, beam=1).translate(lines) == lines


# ---------------------------------------------------------------------------------------------
# One line per translation, whatever bytes the model spells
# ---------------------------------------------------------------------------------------------


def test_a_translation_is_always_one_line(byte_piece_checkpoint, tmp_path, capsys):
    """The model writes newline, TAB, ESC, U+2028, NEL and CR as byte pieces between words;
    `Tokenizer.decode` keeps them (it inverts `encode`), every translation replaces them."""
    tokenizer = Translator(byte_piece_checkpoint).tokenizer
    ids = [tokenizer.sp.piece_to_id(p) for p in BYTE_PIECE_OUTPUT]
    assert tokenizer.decode(ids) == "the\n cat\t sat\x1b on\u2028 mat\x85 dog\r"  # what the model spells

    lines = ["a dog", "", "the cat sat"]
    for beam in (1, 2):
        assert Translator(byte_piece_checkpoint, beam=beam).translate(lines) == [BYTE_PIECE_TEXT, "", BYTE_PIECE_TEXT]
    for hyps in Translator(byte_piece_checkpoint, beam=2).translate_nbest(lines, nbest=2):
        assert all(h.text.isprintable() for h in hyps)  # the runner-up too

    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    args = ["translate", "--checkpoint", str(byte_piece_checkpoint), "--input", str(inp)]
    assert main(args + ["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == f"{BYTE_PIECE_TEXT}\n\n{BYTE_PIECE_TEXT}\n"
    assert main(args + ["--nbest", "2", "--beam", "2"]) == 0
    rows = capsys.readouterr().out.split("\n")
    assert rows.pop() == "" and len(rows) == 5  # 2 + 1 (the empty line) + 2
    assert all(len(row.split("\t")) == 4 and row.replace("\t", " ").isprintable() for row in rows)
    assert [row.split("\t")[0] for row in rows] == ["0", "0", "1", "2", "2"]
