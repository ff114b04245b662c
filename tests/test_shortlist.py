"""The vocabulary shortlist: how it is built, that a restricted search normalises over the
candidates exactly, and the command and files around it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aiayn.cli import main
from aiayn.config import SearchConfig
from aiayn.errors import UserError
from aiayn.inference.shortlist import Shortlist, _cooccurrence, build
from aiayn.search import beam_search, greedy_search_scored
from aiayn.translator import Translator

from helpers import BOS_ID, EOS_ID, LENGTHS, VOCAB, batch_of, toy_model


def test_build_finds_the_cooccurring_subword_and_the_frequent_ones():
    # source 10 always comes with target 20, source 11 with 21; target 5 is in every pair.
    src = [np.array([10, 12]), np.array([10, 13]), np.array([11, 12]), np.array([11, 10]), np.array([12])]
    tgt = [np.array([20, 5]), np.array([20, 5, 5]), np.array([21, 5]), np.array([21, 20, 5]), np.array([5, 6])]
    frequent, translations = build(src, tgt, vocab=30, frequent=1, per_source=1)
    assert frequent == [5]
    assert translations[10] == [20] and translations[11] == [21]
    assert translations[13] == []  # c(s, t) = 1 < min_count
    _, wide = build(src, tgt, vocab=30, frequent=3, per_source=10)
    assert set(wide[10]) == {5, 20} and not any(set(row) & {0, BOS_ID, EOS_ID} for row in wide)
    # counting chunk by chunk (the merge of sorted counts) gives the counts of one pass
    one_pass, by_twos = _cooccurrence(src, tgt, 30, chunk=100), _cooccurrence(src, tgt, 30, chunk=2)
    for a, b in zip(one_pass, by_twos):
        np.testing.assert_array_equal(a, b)
    assert dict(zip(one_pass[0].tolist(), one_pass[1].tolist()))[10 * 30 + 20] == 3


def _shortlist(frequent: list[int], translations: dict[int, list[int]] | None = None) -> Shortlist:
    rows = [[] for _ in range(VOCAB)]
    for s, ts in (translations or {}).items():
        rows[s] = ts
    return Shortlist(VOCAB, frequent, rows, "test", {})


def _restricted_log_prob(model, src_row, tokens, candidates) -> float:
    """log P(tokens + EOS | src) with the softmax over ``candidates`` only (teacher-forced)."""
    src = src_row[src_row.ne(0) | (torch.arange(src_row.numel()) == 0)].unsqueeze(0)
    with torch.no_grad():
        logits = model(src, torch.tensor([[BOS_ID] + tokens]))[0].float()
    allowed = torch.full((logits.size(-1),), -torch.inf)
    allowed[candidates] = 0.0
    log_probs = torch.log_softmax(logits + allowed, dim=-1)
    return sum(log_probs[t, w].item() for t, w in enumerate(tokens + [EOS_ID]))


def test_a_shortlist_of_every_subword_keeps_the_outputs():
    """Only normalisation changes (pad and bos leave Z): the same tokens, scores over the candidates."""
    model, src = toy_model(), batch_of(LENGTHS)
    everything = _shortlist([1] + list(range(4, VOCAB)))  # unk and every real subword
    full = greedy_search_scored(model, src, SearchConfig(max_len_b=10))
    short = greedy_search_scored(model, src, SearchConfig(max_len_b=10), shortlist=everything)
    assert [t for t, _ in short] == [t for t, _ in full]
    # (Beam search ranks prefixes by their normalised log-probabilities, so without pad and bos
    # in Z its choices may differ; the next test pins its scores instead.)


def test_a_restricted_search_uses_only_candidates_and_normalises_over_them():
    model, src = toy_model(), batch_of(LENGTHS)
    shortlist = _shortlist([4, 5, 6], {s: [s + 1] for s in range(4, VOCAB - 1)})
    candidates = shortlist.candidates(src)
    assert EOS_ID in candidates.tolist() and not {0, BOS_ID} & set(candidates.tolist())
    own = [shortlist.candidates(src[row : row + 1]) for row in range(len(src))]  # each sentence's own
    assert any(len(c) < len(candidates) for c in own)  # the batch's union is not what a sentence gets
    for row, (tokens, log_prob) in enumerate(greedy_search_scored(model, src, SearchConfig(max_len_b=10), shortlist=shortlist)):
        assert set(tokens) <= set(own[row].tolist())
        assert log_prob == pytest.approx(_restricted_log_prob(model, src[row], tokens, own[row]), abs=1e-4)
    for row, hyps in enumerate(beam_search(model, src, SearchConfig(beam=4, alpha=0.6, max_len_b=10), nbest=4, shortlist=shortlist)):
        for h in hyps:
            assert set(h.tokens) <= set(own[row].tolist())
            assert h.log_prob == pytest.approx(_restricted_log_prob(model, src[row], h.tokens, own[row]), abs=1e-4)
    # a single sentence's candidates: its own subwords, their translations, the frequent ones, EOS
    one = src[:1, : LENGTHS[0]]
    expected = {4, 5, 6, EOS_ID} | set(one[0].tolist()) | {s + 1 for s in one[0].tolist() if s < VOCAB - 1}
    assert set(shortlist.candidates(one).tolist()) == expected


def test_int8_and_packed_models_take_the_restricted_output(random_checkpoint):
    from aiayn.checkpoint import load_checkpoint

    lines = ["the cat sat on the mat", "a dog runs"]
    tokenizer = load_checkpoint(random_checkpoint, device="cpu").tokenizer
    everything = Shortlist(tokenizer.vocab_size, [1] + list(range(4, tokenizer.vocab_size)),
                           [[] for _ in range(tokenizer.vocab_size)], tokenizer.sha256, {})
    for options in (dict(), dict(quantize="int8"), dict(prepack=False)):
        plain = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=8), device="cpu", **options)
        short = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=8), device="cpu", **options)
        short.shortlist = everything
        for a, b in zip(plain.translate_nbest(lines), short.translate_nbest(lines)):
            if "quantize" in options:  # fp32 output rows against int8 ones: near-ties may differ
                assert b[0].tokens[:2] == a[0].tokens[:2]
            else:
                assert b[0].tokens == a[0].tokens


def test_shortlist_command_builds_a_file_the_translator_uses(tmp_path, copy_dataset, copy_checkpoint, capsys):
    out = tmp_path / "copy.shortlist.json"
    assert main(["shortlist", "--data", str(copy_dataset), "--out", str(out), "--frequent", "10",
                 "--per-source", "5"]) == 0
    report = capsys.readouterr().err
    assert "candidates per sentence" in report and "covered" in report
    shortlist = Shortlist.load(out)
    assert len(shortlist.frequent) == 10 and all(len(t) <= 5 for t in shortlist.translations)
    # copying: each source subword's best partner is itself, so translations are unchanged
    src = [line.strip() for line in (copy_dataset / "test.src").read_text().splitlines()[:40]]
    plain = Translator(copy_checkpoint, device="cpu").translate(src)
    assert Translator(copy_checkpoint, device="cpu", shortlist=out).translate(src) == plain
    # an existing file is not replaced without --force
    assert main(["shortlist", "--data", str(copy_dataset), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_shortlist_of_another_vocabulary_or_a_bad_file_is_refused(tmp_path, random_checkpoint):
    other = Shortlist(60, [4], [[] for _ in range(60)], "0" * 64, {})
    path = tmp_path / "other.json"
    other.save(path)
    with pytest.raises(UserError, match="another subword vocabulary"):
        Translator(random_checkpoint, device="cpu", shortlist=path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=str(bad)):
        Translator(random_checkpoint, device="cpu", shortlist=bad)
    wrong = tmp_path / "wrong.json"
    payload = json.loads(path.read_text())
    payload["translations"] = payload["translations"][:-1]
    wrong.write_text(json.dumps(payload))
    with pytest.raises(UserError, match="malformed shortlist"):
        Shortlist.load(wrong)
    with pytest.raises(UserError, match="not found"):
        Shortlist.load(tmp_path / "missing.json")


@pytest.mark.parametrize("field", ["frequent", "translations"])
@pytest.mark.parametrize("special", [0, 2])
def test_a_shortlist_listing_pad_or_bos_is_refused(tmp_path, field, special, capsys):
    """pad and bos are never outputs: a file that lists them is a one-line error naming it,
    exit 2, before any model work (it used to make the searches write pad tokens)."""
    rows = [[] for _ in range(VOCAB)]
    frequent = [4, 5, 6]
    if field == "frequent":
        frequent = [special, 5, 6]
    else:
        rows[7] = [special, 8]
    path = tmp_path / "specials.json"
    Shortlist(VOCAB, frequent, rows, "x", {}).save(path)
    with pytest.raises(UserError, match=rf"{path}: malformed shortlist: .*special id\(s\) \[{special}\]"):
        Shortlist.load(path)


def test_a_sentence_gets_the_same_result_alone_and_batched():
    """Each sentence is restricted to its own candidates and normalised over them, so what it
    is batched with (other sentences, other requests under aiayn serve) changes nothing."""
    model, src = toy_model(), batch_of(LENGTHS)
    shortlist = _shortlist([4, 5], {s: [s + 1, s + 2] for s in range(4, VOCAB - 2)})
    config = SearchConfig(beam=3, alpha=0.6, max_len_b=10)
    batched = beam_search(model, src, config, nbest=2, shortlist=shortlist)
    greedy = greedy_search_scored(model, src, config, shortlist=shortlist)
    for row, n in enumerate(LENGTHS):
        one = src[row : row + 1, : n + 1]
        alone = beam_search(model, one, config, nbest=2, shortlist=shortlist)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[row]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[row]], abs=1e-5)
        tokens, log_prob = greedy_search_scored(model, one, config, shortlist=shortlist)[0]
        assert tokens == greedy[row][0] and log_prob == pytest.approx(greedy[row][1], abs=1e-5)
