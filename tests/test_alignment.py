"""aiayn.alignment: words from subwords, the rows and the EOS column, hard links, Pharaoh, AER;
`aiayn align` and `aiayn translate --alignment`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aiayn.alignment import (
    Agreement,
    AlignmentSettings,
    aggregate,
    align_ids,
    align_pairs,
    hard_links,
    parse_pharaoh,
    subword_rows,
    to_pharaoh,
    word_ids,
    words_of,
)
from aiayn.checkpoint import load_checkpoint
from aiayn.cli import main
from aiayn.errors import UserError
from aiayn.translator import Translator


def test_words_are_groups_of_pieces_starting_with_the_mark():
    pieces = ["▁Click", "▁O", "K", ".", "▁", "(", "x", ")"]
    assert word_ids(pieces) == [0, 1, 1, 1, 2, 2, 2, 2]
    assert words_of(pieces) == ["Click", "OK.", "(x)"]
    assert word_ids(["ab", "▁c"]) == [0, 1]  # a first piece without the mark still starts a word
    assert words_of([]) == [] and word_ids([]) == []


def test_aggregation_sums_over_source_subwords_and_averages_over_target_subwords():
    # 3 target subwords (words 0, 0, 1) over 4 source subwords (words 0, 1, 1, 2)
    sub = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                        [0.5, 0.2, 0.1, 0.2],
                        [0.0, 0.0, 1.0, 0.0]])
    words = aggregate(sub, [0, 0, 1], [0, 1, 1, 2])
    expected = torch.tensor([[(0.1 + 0.5) / 2, (0.2 + 0.3 + 0.2 + 0.1) / 2, (0.4 + 0.2) / 2],
                             [0.0, 1.0, 0.0]])
    torch.testing.assert_close(words, expected)
    torch.testing.assert_close(words.sum(1), torch.ones(2))
    assert hard_links(words) == [(1, 0), (1, 1)]
    assert hard_links(torch.zeros(0, 3)) == []


def test_rows_that_read_or_predict_and_the_eos_column_dropped():
    # decoder rows: <s>, y1, y2 (3 = n_tgt + 1); columns: x1, x2, </s>
    cross = torch.tensor([[0.6, 0.2, 0.2],
                          [0.1, 0.4, 0.5],
                          [0.0, 0.0, 1.0]])
    predicts = subword_rows(cross, n_tgt=2, n_src=2, rows="predicts")
    torch.testing.assert_close(predicts, torch.tensor([[0.75, 0.25], [0.2, 0.8]]))
    reads = subword_rows(cross, n_tgt=2, n_src=2, rows="reads")
    # row 2 had all its weight on </s>: no information left, a uniform row rather than NaN
    torch.testing.assert_close(reads, torch.tensor([[0.2, 0.8], [0.5, 0.5]]))


def test_pharaoh_round_trip_and_errors():
    links = [(2, 0), (0, 1), (1, 1), (3, 2)]
    line = to_pharaoh(links)
    assert line == "2-0 0-1 1-1 3-2"
    assert parse_pharaoh(line) == links
    assert parse_pharaoh("") == [] and to_pharaoh([]) == ""
    assert parse_pharaoh("0?1 2-2") == [(0, 1), (2, 2)]  # possible links of gold standards
    for bad in ("0-", "a-1", "1:2", "-1-2"):
        with pytest.raises(UserError, match="not an alignment link"):
            parse_pharaoh(bad, where="gold.txt:3")


def test_agreement_is_och_and_ney():
    a = Agreement()
    a.add([(0, 0), (1, 1), (2, 1)], sure=[(0, 0), (1, 1)])
    assert (a.precision, a.recall) == (2 / 3, 1.0)
    assert math.isclose(a.aer, 1 - 4 / 5)
    b = Agreement()
    b.add([(0, 0), (2, 1)], sure=[(0, 0)], possible=[(2, 1)])  # a possible hit counts for precision only
    assert (b.precision, b.recall, b.aer) == (1.0, 1.0, 0.0)
    assert math.isnan(Agreement().aer)


def test_settings_choose_a_layer_and_head():
    s = AlignmentSettings(layer=-1, head=2)
    assert s.resolve_layer(3) == 2 and AlignmentSettings(layer=1).resolve_layer(3) == 0
    assert AlignmentSettings().resolve_layer(1) == 0 and AlignmentSettings().resolve_layer(3) == 2  # the last
    for bad in (AlignmentSettings(layer=4), AlignmentSettings(layer=0), AlignmentSettings(layer=-4),
                AlignmentSettings(head=5), AlignmentSettings(rows="sideways")):
        with pytest.raises(UserError):
            bad.check(3, 4)


class _HandSet:
    """A real model whose cross-attention is replaced by given weights (B, h, T, S) per layer:
    what `align_ids` reads off must be exactly what the weights say."""

    def __init__(self, model, cross):
        self.model, self.cross = model, cross
        self.config = model.config
        self.training = False

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def attention_weights(self, src, tgt_in):
        return {"cross": self.cross}


def test_alignment_of_hand_set_attention_is_exact(random_checkpoint):
    ckpt = load_checkpoint(random_checkpoint)
    tok, cfg = ckpt.tokenizer, ckpt.model.config
    src = tok.encode("the cat sat on the mat", "src")
    tgt = tok.encode("the mat on the cat", "tgt")
    src_words, tgt_words = word_ids(tok.pieces(src, "src")), word_ids(tok.pieces(tgt, "tgt"))
    # target word j attends (in the rows that read it) to the first subword of source word perm[j]
    perm = [5, 4, 3, 2, 1]
    first_subword = {w: src_words.index(w) for w in set(src_words)}
    cross = torch.zeros(1, cfg.n_heads, len(tgt) + 1, len(src) + 1)
    cross[..., 0, -1] = 1.0  # the row reading <s> predicts y_1: not used with rows="reads"
    for k, w in enumerate(tgt_words):
        cross[0, :, k + 1, first_subword[perm[w]]] = 0.7
        cross[0, :, k + 1, -1] = 0.3  # weight on </s>: dropped
    layers = [torch.rand_like(cross).softmax(-1) for _ in range(cfg.n_decoder_layers)]
    layers[-2] = cross
    (a,) = align_ids(_HandSet(ckpt.model, layers), tok, [src], [tgt], AlignmentSettings(layer=-2, rows="reads"))
    assert a.links == [(perm[j], j) for j in range(5)]
    assert a.pharaoh == "5-0 4-1 3-2 2-3 1-4"
    assert a.src_words == "the cat sat on the mat".split() and a.tgt_words == "the mat on the cat".split()
    soft = torch.tensor(a.soft)
    assert soft.shape == (5, 6)
    torch.testing.assert_close(soft, torch.eye(6)[perm])


def test_alignment_from_the_model_equals_its_attention_weights(random_checkpoint):
    ckpt = load_checkpoint(random_checkpoint)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    pairs = [("the cat sat on the mat", "a dog"), ("a", "the cat sat")]
    sources = [tok.encode(s, "src") for s, _ in pairs]
    targets = [tok.encode(t, "tgt") for _, t in pairs]
    settings = AlignmentSettings(layer=1, head=3, rows="predicts")
    batched = align_ids(model, tok, sources, targets, settings)
    for s, t, a in zip(sources, targets, batched):  # padding in the batch changes nothing
        src = torch.tensor([s + [tok.eos_id]])
        tgt_in = torch.tensor([[tok.bos_id] + t])
        cross = model.attention_weights(src, tgt_in)["cross"][0][0, 2]  # layer 1, head 3
        sub = cross[: len(t), : len(s)]
        sub = sub / sub.sum(1, keepdim=True)
        expected = aggregate(sub, word_ids(tok.pieces(t, "tgt")), word_ids(tok.pieces(s, "src")))
        torch.testing.assert_close(torch.tensor(a.soft), expected, atol=1e-5, rtol=0)
        assert a.links == hard_links(expected)
    assert align_ids(model, tok, [[], sources[0]], [targets[0], []])[0].links == []


def test_align_pairs_keeps_input_order_and_skips_what_is_too_long(random_checkpoint, caplog):
    ckpt = load_checkpoint(random_checkpoint)
    long = " ".join(["the cat sat on the mat"] * 20)
    pairs = [(1, "a dog", "the cat"), (2, long, "a"), (4, "the cat sat on the mat", "a mat")]
    out = list(align_pairs(ckpt.model, ckpt.tokenizer, pairs, batch_size=1, where="in.en"))
    assert [n for n, _ in out] == [1, 2, 4]
    assert out[1][1] is None and "in.en:2 has" in caplog.text
    assert out[0][1].src_words == ["a", "dog"] and len(out[2][1].links) == 2


def test_translations_carry_their_alignment(copy_checkpoint):
    translator = Translator(copy_checkpoint, precision="fp32")
    lines = ["a b c d e f", "", "g h i"]
    results = translator.translate_nbest(lines, nbest=2, alignment=AlignmentSettings())
    assert results[1][0].alignment.links == []
    for line, hyps in zip(lines, results):
        for h in hyps:
            if not line:
                continue
            (expected,) = align_ids(translator.model, translator.tokenizer, [translator.tokenizer.encode(line)],
                                    [h.tokens], AlignmentSettings())
            assert h.alignment.links == expected.links
            assert len(h.alignment.tgt_words) == len(h.text.split())
    assert translator.translate_nbest(lines)[0][0].alignment is None


def test_translate_command_alignment_and_json(copy_checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a b c d\n\ne f g\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["translate", "--checkpoint", str(copy_checkpoint), "--input", str(src), "--output", str(out),
                 "--alignment", "--precision", "fp32"]) == 0
    rows = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(rows) == 3 and rows[1] == "\t"
    text, links = rows[0].split("\t")
    for i, j in parse_pharaoh(links):
        assert 0 <= i < 4 and 0 <= j < len(text.split())
    assert main(["translate", "--checkpoint", str(copy_checkpoint), "--input", str(src), "--json", "--alignment",
                 "--nbest", "2", "--alignment-layer", "1", "--alignment-head", "1", "--precision", "fp32"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["index"] for d in docs] == [0, 1, 2] and len(docs[0]["nbest"]) == 2
    best = docs[0]["nbest"][0]
    assert best["alignment"]["tgt_words"] == best["text"].split()
    assert len(best["alignment"]["soft"]) == len(best["text"].split())
    assert main(["translate", "--checkpoint", str(copy_checkpoint), "--input", str(src), "--alignment",
                 "--alignment-layer", "9"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "alignment layer 9 does not exist" in err


def test_align_command_writes_one_line_per_input_line(copy_checkpoint, tmp_path, capsys):
    src, tgt, out = tmp_path / "a.src", tmp_path / "a.tgt", tmp_path / "a.align"
    src.write_text("a b c\n\nd e f g\n", encoding="utf-8")
    tgt.write_text("a b c\n\nd e f g\n", encoding="utf-8")
    assert main(["align", "--checkpoint", str(copy_checkpoint), "--src", str(src), "--tgt", str(tgt),
                 "--output", str(out), "--precision", "fp32"]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    assert [j for _, j in parse_pharaoh(lines[2])] == [0, 1, 2, 3]
    # never overwritten silently
    assert main(["align", "--checkpoint", str(copy_checkpoint), "--src", str(src), "--tgt", str(tgt),
                 "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["align", "--checkpoint", str(copy_checkpoint), "--src", str(src), "--tgt", str(tgt),
                 "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert docs[1] == {} and docs[0]["src_words"] == ["a", "b", "c"]


@pytest.mark.parametrize("problem", ["missing", "uneven", "bad_utf8"])
def test_align_command_errors_are_one_line(copy_checkpoint, tmp_path, capsys, problem):
    src, tgt = tmp_path / "a.src", tmp_path / "a.tgt"
    src.write_text("a b\nc d\n", encoding="utf-8")
    tgt.write_text("a b\nc d\n", encoding="utf-8")
    if problem == "missing":
        tgt = tmp_path / "nope.tgt"
    elif problem == "uneven":
        tgt.write_text("a b\n", encoding="utf-8")
    else:
        tgt.write_bytes(b"a b\nc \xff\n")
    assert main(["align", "--checkpoint", str(copy_checkpoint), "--src", str(src), "--tgt", str(tgt)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("aiayn: error:")
    assert str(tgt if problem != "uneven" else src) in err
    if problem != "missing":
        assert ":2" in err
