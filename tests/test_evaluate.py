"""`aiayn evaluate` and `aiayn.evaluate.score` against sacreBLEU's own command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sacrebleu.metrics import BLEU, CHRF

from aiayn import evaluate
from aiayn.cli import main
from aiayn.config import SearchConfig
from aiayn.errors import UserError
from aiayn.evaluate import Scorer, format_report, score, split_compounds, tokenized_bleu
from aiayn.translator import Translator

from helpers import BYTE_PIECE_TEXT

REFS = [
    "Ein Mann fährt mit dem Fahrrad über die Brücke.",
    "Zwei Kinder spielen im Park Fußball-Weltmeisterschaft.",
    "Eine Frau liest ein Buch, während es regnet.",
    "Der Hund läuft am Strand entlang.",
    "Menschen warten an der Bushaltestelle in der Stadt-Mitte.",
    "Der Hund läuft am Strand entlang.",
]
HYPS = [
    "Ein Mann fährt Fahrrad über die Brücke.",
    "Zwei Kinder spielen im Park Fußball.",
    "Eine Frau liest ein Buch während es regnet .",
    "",
    "Leute warten an der Bushaltestelle in der Stadt-Mitte.",
    "der hund läuft am strand entlang.",  # right but for case: only the lowercased BLEU credits it
]


def sacrebleu_cli(*args: str) -> float:
    exe = Path(sys.executable).with_name("sacrebleu")
    out = subprocess.run([str(exe), *args, "-b", "-w", "4"], capture_output=True, text=True, check=True, timeout=60)
    return float(out.stdout.strip())


@pytest.fixture
def files(tmp_path):
    hyp, ref = tmp_path / "hyp.de", tmp_path / "ref.de"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    return hyp, ref


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(files, capsys):
    hyp, ref = files
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bleu"] == pytest.approx(sacrebleu_cli(str(ref), "-i", str(hyp), "-m", "bleu"), abs=1e-4)
    assert result["chrf"] == pytest.approx(sacrebleu_cli(str(ref), "-i", str(hyp), "-m", "chrf"), abs=1e-4)
    # Lowercased ("Stadt-Mitte" vs "stadt-mitte" would otherwise differ): sacrebleu -lc.
    assert result["bleu_lowercase"] == pytest.approx(sacrebleu_cli(str(ref), "-i", str(hyp), "-m", "bleu", "-lc"), abs=1e-4)
    assert result["bleu_lowercase"] > result["bleu"]
    assert result["bleu_lowercase_signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a")
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert "nc:6|nw:0" in result["chrf_signature"]
    # the empty hypothesis makes the output shorter than the references: BP < 1, as sacreBLEU reports it
    assert result["brevity_penalty"] == pytest.approx(float(result["bleu_detail"].split("BP = ")[1].split()[0]), abs=1e-3)
    assert result["brevity_penalty"] < 0.95
    assert result == {**score(HYPS, REFS), "ref": str(ref), "hyp": str(hyp)}


def test_text_report_is_labelled(files, capsys):
    hyp, ref = files
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BLEU = ")
    assert "signature: nrefs:1|case:mixed" in out
    assert "chrF2 = " in out
    assert "Lowercased BLEU = " in out and "signature: nrefs:1|case:lc" in out
    assert "Tokenized BLEU (paper-comparable) = " in out and "NOT comparable with sacreBLEU" in out


def test_compound_splitting_follows_tensor2tensor():
    assert split_compounds("die Fußball-Weltmeisterschaft - toll") == "die Fußball ##AT##-##AT## Weltmeisterschaft - toll"
    # Perl's s///g does not rescan the consumed "b": only the first hyphen of a-b-c splits.
    assert split_compounds("a-b-c") == "a ##AT##-##AT## b-c"


def test_tokenized_bleu_rewards_compound_parts():
    """One wrong half of a compound: sacreBLEU sees one wrong word, the split form one wrong piece."""
    hyps = ["Das ist eine Fußball-Meisterschaft in der Stadt heute ."]
    refs = ["Das ist eine Fußball-Weltmeisterschaft in der Stadt heute ."]
    assert tokenized_bleu(hyps, refs) > score(hyps, refs)["bleu"]
    assert tokenized_bleu(refs, refs) == pytest.approx(100.0)


def test_evaluate_with_a_checkpoint_translates_then_scores(random_checkpoint, tmp_path, capsys):
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src_lines = ["a dog runs", "the cat", "", "two men are playing"]
    src.write_text("\n".join(src_lines) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS[:4]) + "\n", encoding="utf-8")
    args = ["evaluate", "--checkpoint", str(random_checkpoint), "--src", str(src), "--ref", str(ref), "--json",
            "--beam", "2", "--max-len-b", "4"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    hyps = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=4)).translate(src_lines)
    assert result["bleu"] == score(hyps, REFS[:4])["bleu"]
    assert result["beam"] == 2 and result["quantize"] is None
    assert result["lowercased_model"] is False and "lowercased text" not in format_report(result)
    assert "writes lowercased text" in format_report({**result, "lowercased_model": True})


def test_evaluate_user_errors(files, tmp_path, capsys, monkeypatch):
    hyp, ref = files
    short = tmp_path / "short.de"
    short.write_text("eins\nzwei\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(short), "--ref", str(ref)]) == 2
    assert "2 lines, but" in capsys.readouterr().err
    assert main(["evaluate", "--ref", str(ref)]) == 2
    assert "give --hyp FILE" in capsys.readouterr().err
    assert main(["evaluate", "--hyp", str(hyp), "--checkpoint", "x", "--src", "y", "--ref", str(ref)]) == 2
    assert "not both" in capsys.readouterr().err
    # The line counts are compared first (cheap), with one line naming the file that differs.
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(short)]) == 2
    assert capsys.readouterr().err == f"aiayn: error: {hyp}: 6 lines, but {short} has 2\n"
    # A bad line found late (files scored 4 lines at a time: in the second chunk): FILE:LINE, nothing printed.
    monkeypatch.setattr(evaluate, "CHUNK_LINES", 4)
    bad = tmp_path / "bad.de"
    bad.write_bytes("".join(line + "\n" for line in HYPS[:5]).encode() + b"\xff\xfe broken\n")
    for given in (["--hyp", str(bad), "--ref", str(ref)], ["--hyp", str(hyp), "--ref", str(bad)]):
        assert main(["evaluate", *given]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"aiayn: error: {bad}:6: invalid UTF-8 (byte 0xff at column 1)\n" and captured.out == ""


def test_evaluate_scores_one_line_translations(byte_piece_checkpoint, tmp_path, capsys):
    """The model spells ESC and other control characters between its words (tests/conftest.py);
    evaluate scores the one-line text that translate prints, which equals the reference."""
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("a dog\nthe cat\n", encoding="utf-8")
    ref.write_text(f"{BYTE_PIECE_TEXT}\n{BYTE_PIECE_TEXT}\n", encoding="utf-8")
    assert main(["evaluate", "--checkpoint", str(byte_piece_checkpoint), "--src", str(src), "--ref", str(ref),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)


@pytest.mark.parametrize("mode", ["hyp", "checkpoint"])
def test_evaluating_empty_files_is_one_line(mode, random_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    given = ["--hyp", str(empty)] if mode == "hyp" else ["--checkpoint", str(random_checkpoint), "--src", str(empty)]
    assert main(["evaluate", *given, "--ref", str(empty)]) == 2
    assert capsys.readouterr().err == f"aiayn: error: {empty}: the file is empty: nothing to score\n"


# ---------------------------------------------------------------------------------------------
# Streaming: a Scorer fed chunk by chunk equals sacreBLEU's corpus_score over the whole lists
# ---------------------------------------------------------------------------------------------


def _corpus(n: int = 60) -> tuple[list[str], list[str]]:
    """Real-ish German: the references above varied line by line (words dropped, case changed,
    a compound split or not, empty lines), so every n-gram order and the brevity penalty move."""
    hyps, refs = [], []
    for i in range(n):
        ref = REFS[i % len(REFS)]
        words = ref.split()
        hyp = " ".join(w for j, w in enumerate(words) if (i + j) % (3 + i % 4))
        if i % 5 == 0:
            hyp = hyp.lower()
        if i % 7 == 0:
            hyp = hyp.replace("-", " ")
        if i % 11 == 0:
            hyp = ""
        hyps.append(hyp)
        refs.append(ref if i % 13 else "")
    return hyps, refs


def _corpus_scores(hyps, refs) -> dict:
    """What score() computed before it streamed: sacreBLEU's corpus_score over the whole lists."""
    bleu, lc, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    b, low, c = bleu.corpus_score(hyps, [refs]), lc.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"sentences": len(hyps), "bleu": b.score, "bleu_signature": str(bleu.get_signature()),
            "bleu_detail": str(b), "brevity_penalty": b.bp, "bleu_lowercase": low.score,
            "bleu_lowercase_signature": str(lc.get_signature()), "chrf": c.score,
            "chrf_signature": str(chrf.get_signature()), "tokenized_bleu": tokenized_bleu(hyps, refs),
            "tokenized_bleu_method": evaluate.TOKENIZED_BLEU_METHOD}


@pytest.mark.parametrize("chunk", [1, 2, 7, 59, 60, 1000])
def test_scorer_in_chunks_equals_corpus_score(chunk):
    hyps, refs = _corpus()
    expected = _corpus_scores(hyps, refs)
    assert 0 < expected["bleu"] < expected["bleu_lowercase"] < 100 and expected["brevity_penalty"] < 1
    scorer = Scorer()
    for start in range(0, len(hyps), chunk):
        scorer.add(hyps[start:start + chunk], refs[start:start + chunk])
    assert scorer.result() == expected  # exactly: the same integer sums, the same formulas
    assert score(hyps, refs, chunk=chunk) == expected
    assert score(HYPS, REFS, chunk=chunk) == _corpus_scores(HYPS, REFS)


def test_scorer_sums_every_chunk():
    """Not only the last chunk counts: a chunk that is perfect and one that is not give the corpus score."""
    hyps, refs = _corpus()
    scorer = Scorer()
    scorer.add(refs[:30], refs[:30])
    scorer.add([], [])
    scorer.add(hyps[30:], refs[30:])
    result = scorer.result()
    assert result == _corpus_scores(refs[:30] + hyps[30:], refs)
    assert result["sentences"] == 60 and result["bleu"] != _corpus_scores(hyps[30:], refs[30:])["bleu"]
    with pytest.raises(UserError, match="nothing to score"):
        Scorer().result()
    with pytest.raises(UserError, match="2 hypotheses but 1 references"):
        Scorer().add(["a", "b"], ["a"])


def test_evaluate_streams_in_chunks(random_checkpoint, tmp_path, capsys, monkeypatch):
    """--hyp files scored 4 lines at a time, and --src translated 3 lines at a time and scored as
    each chunk is done, give the scores of the whole lists."""
    from aiayn import translator

    hyps, refs = _corpus(25)
    hyp, ref, src = tmp_path / "hyp.de", tmp_path / "ref.de", tmp_path / "src.en"
    hyp.write_text("".join(line + "\n" for line in hyps), encoding="utf-8")
    ref.write_text("".join(line + "\n" for line in refs), encoding="utf-8")
    src_lines = [("a dog runs", "the cat", "", "two men are playing", "a woman")[i % 5] for i in range(25)]
    src.write_text("".join(line + "\n" for line in src_lines), encoding="utf-8")
    monkeypatch.setattr(evaluate, "CHUNK_LINES", 4)
    monkeypatch.setattr(translator, "CHUNK_LINES", 3)
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**_corpus_scores(hyps, refs), "ref": str(ref), "hyp": str(hyp)}
    search = SearchConfig(beam=2, max_len_b=4)
    translations = Translator(random_checkpoint, search=search).translate(src_lines)
    assert main(["evaluate", "--checkpoint", str(random_checkpoint), "--src", str(src), "--ref", str(ref), "--json",
                 "--beam", "2", "--max-len-b", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result[k] for k in _corpus_scores(translations, refs)} == _corpus_scores(translations, refs)
    assert result["translate_seconds"] >= 0
    # --src and --ref of different lengths: one line naming --src, before the model is loaded.
    src.write_text("a dog\n", encoding="utf-8")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--src", str(src), "--ref", str(ref)]) == 2
    assert capsys.readouterr().err == f"aiayn: error: {src}: 1 lines, but {ref} has 25\n"
