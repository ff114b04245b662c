"""The Translator (aiayn.translator) and `aiayn translate` (aiayn.commands.translate)."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import warnings

import pytest
import torch

from aiayn.cli import main
from aiayn.config import SearchConfig
from aiayn.errors import UserError
from aiayn.inference import packed
from aiayn.inference.packed import Int8Linear, is_packed, quantize_int8
from aiayn.translator import Translator

from helpers import BOS_ID, BYTE_PIECE_OUTPUT, BYTE_PIECE_TEXT, EOS_ID, TEXT, UNSEEN_COPY_INPUTS

# ---------------------------------------------------------------------------------------------
# Translator and the command line, on a checkpoint of a random model with a real tokenizer
# ---------------------------------------------------------------------------------------------

def test_translator_restores_input_order(random_checkpoint):
    lines = ["a dog", "", "the cat sat on the mat and the dog runs in the park", "two men", "a woman is reading", "x"]
    translator = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=5), batch_size=2)
    batched = translator.translate(lines)
    assert batched == [translator.translate([line])[0] for line in lines]
    assert batched[1] == ""
    by_tokens = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=5), batch_tokens=12).translate(lines)
    assert by_tokens == batched
    nbest = translator.translate_nbest(lines, nbest=2)
    assert [n[0].text for n in nbest] == batched
    assert all(n[0].score >= n[1].score for n in nbest if len(n) == 2)


def test_over_long_line_is_truncated_with_a_warning(random_checkpoint, caplog):
    long_line = " ".join(TEXT * 10)  # far beyond max_positions = 64 learned positions
    translator = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=3))
    with caplog.at_level(logging.WARNING, logger="aiayn.translator"):
        out = translator.translate(["a dog", long_line])
    assert len(out) == 2
    assert "input line 2 has" in caplog.text and "first 63" in caplog.text


def test_int8_quantization_is_warning_free_and_close(random_checkpoint):
    # plain fp32 nn.Linear layers (precision auto would give bf16 products on a bf16 CPU)
    translator = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=3), prepack=False, precision="fp32")
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
    assert len(Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=3), quantize="int8").translate(TEXT)) == len(TEXT)


def test_cli_translate_files(random_checkpoint, tmp_path, capsys):
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("a dog\n\nthe cat\n", encoding="utf-8")
    args = ["translate", "--checkpoint", str(random_checkpoint), "--input", str(inp), "--max-len-b", "4"]
    assert main(args + ["--output", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    expected = Translator(random_checkpoint, search=SearchConfig(max_len_b=4)).translate(["a dog", "", "the cat"])
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
    assert proc.stdout.splitlines() == Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=3)).translate(["a dog", "the cat"])


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
    assert Translator(copy_checkpoint, search=SearchConfig(beam=4)).translate(lines) == lines
    assert Translator(copy_checkpoint, search=SearchConfig(beam=1)).translate(lines) == lines


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
        assert Translator(byte_piece_checkpoint, search=SearchConfig(beam=beam)).translate(lines) == [BYTE_PIECE_TEXT, "", BYTE_PIECE_TEXT]
    for hyps in Translator(byte_piece_checkpoint, search=SearchConfig(beam=2)).translate_nbest(lines, nbest=2):
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


needs_onednn = pytest.mark.skipif(not packed.onednn_available(), reason="this torch has no oneDNN packed linear")


@needs_onednn
def test_translator_packs_by_default_and_on_request_not(random_checkpoint, copy_checkpoint):
    fast, plain = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=5)), Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=5), prepack=False)
    assert is_packed(fast.model) and not is_packed(plain.model)
    for a, b in zip(fast.translate_nbest(TEXT, nbest=2), plain.translate_nbest(TEXT, nbest=2)):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)
    # A trained model: the packed path copies unseen inputs exactly, as the plain one does.
    copy = Translator(copy_checkpoint, search=SearchConfig(beam=4))
    assert is_packed(copy.model)
    assert copy.translate(UNSEEN_COPY_INPUTS) == UNSEEN_COPY_INPUTS


def test_translator_threads_are_set_while_translating_and_restored(random_checkpoint, monkeypatch):
    seen = []
    translator = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=3), threads=1)
    original = translator.search_ids
    monkeypatch.setattr(translator, "search_ids", lambda *a: (seen.append(torch.get_num_threads()), original(*a))[1])
    before = torch.get_num_threads()
    translator.translate(TEXT[:2])
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    with pytest.raises(Exception, match="threads must be at least 1"):
        Translator(random_checkpoint, threads=0)


def test_worker_processes_translate_as_one_process_does(random_checkpoint):
    """--workers: batches searched in spawned worker processes (one thread each) come back in
    input order with the same translations, n-best lists and scores as in this process."""
    lines = [f"{w} the cat sat" * (1 + i % 3) for i, w in enumerate("abcdefghij")]
    kwargs = dict(search=SearchConfig(beam=2, max_len_b=6), batch_size=3, threads=1)
    here = Translator(random_checkpoint, **kwargs).translate_nbest(lines, nbest=2)
    with contextlib.closing(Translator(random_checkpoint, workers=2, **kwargs)) as translator:
        there = translator.translate_nbest(lines, nbest=2)
        assert translator._pool is not None  # 4 batches: the workers did search
        # Streamed in chunks of 4 lines: 2 batches each in the workers, the last chunk's one batch here.
        streamed = [hyps for block in translator.translate_stream(iter(lines), nbest=2, chunk=4) for hyps in block]
    assert [[(t.text, t.tokens) for t in n] for n in there] == [[(t.text, t.tokens) for t in n] for n in here]
    assert [t.score for n in there for t in n] == pytest.approx([t.score for n in here for t in n], abs=1e-5)
    assert [[(t.text, t.tokens) for t in n] for n in streamed] == [[(t.text, t.tokens) for t in n] for n in here]
    with pytest.raises(Exception, match="workers must be at least 1"):
        Translator(random_checkpoint, workers=0)


def test_batch_tokens_replaces_the_sentence_count(random_checkpoint, monkeypatch):
    """--batch-tokens is a budget of padded source tokens per batch *instead of* --batch-size:
    100 short lines within the token budget are one batch, not batches of 64 and 36."""
    translator = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=2), batch_tokens=100_000)
    sizes = []
    original = translator.search_ids
    monkeypatch.setattr(translator, "search_ids", lambda s, *a: (sizes.append(len(s)), original(s, *a))[1])
    translator.translate(["the cat sat"] * 100)
    assert sizes == [100]
    # a budget that holds 10 lines of this length (3 subwords or fewer, + EOS): batches of at most 10
    ids = translator.encode(["the cat sat"])[0]
    budget = 10 * (len(ids) + 1)
    small = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=2), batch_tokens=budget)
    assert [len(b) for b in small._batches(list(range(25)), [ids] * 25)] == [10, 10, 5]
    sizes.clear()
    by_count = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=2), batch_size=64)
    monkeypatch.setattr(by_count, "search_ids", lambda s, *a: (sizes.append(len(s)), original(s, *a))[1])
    by_count.translate(["the cat sat"] * 100)
    assert sizes == [64, 36]


def test_devices_are_checked_with_one_line_errors():
    from aiayn.errors import UserError
    from aiayn.translator import resolve_device

    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None, quantize="int8").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="unknown device 'foo'"):
        resolve_device("foo")
    with pytest.raises(UserError, match="int8 quantisation runs on the CPU only"):
        resolve_device("cuda", quantize="int8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="'cuda' is not available"):
            resolve_device("cuda")


def test_prepare_for_inference_leaves_the_callers_model_alone(random_checkpoint):
    from aiayn.checkpoint import load_checkpoint
    from aiayn.translator import prepare_for_inference

    model = load_checkpoint(random_checkpoint).model
    cpu = torch.device("cpu")
    int8 = prepare_for_inference(model, cpu, quantize="int8")
    assert isinstance(int8.generator, Int8Linear) and type(model.generator) is torch.nn.Linear
    if packed.onednn_available():
        fast = prepare_for_inference(model, cpu)
        assert is_packed(fast) and not is_packed(model)
    assert prepare_for_inference(model, cpu, prepack=False) is model


# -- precision (aiayn.precision): auto resolved once; bf16 refused where emulated; int8 apart -------


def test_translator_precision_is_resolved_and_checked(random_checkpoint, monkeypatch):
    from aiayn import precision
    from aiayn.inference.packed import product_dtype
    from aiayn.precision import resolve_precision

    auto = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=4))
    assert auto.precision == resolve_precision("auto", torch.device("cpu"))
    assert product_dtype(auto.model) == (torch.bfloat16 if auto.precision == "bf16" else torch.float32)
    assert Translator(random_checkpoint, precision="fp32").precision == "fp32"
    assert Translator(random_checkpoint, quantize="int8").precision == "fp32"  # int8: fp32 activations
    with pytest.raises(UserError, match="int8 quantisation and precision bf16 exclude each other"):
        Translator(random_checkpoint, quantize="int8", precision="bf16")
    with pytest.raises(UserError, match="unknown precision 'half'"):
        Translator(random_checkpoint, precision="half")
    monkeypatch.setattr(precision, "cpu_arithmetic", lambda: precision.CpuArithmetic("AVX2", False, False, False))
    assert Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=4)).precision == "fp32"
    with pytest.raises(UserError, match="precision bf16: this CPU .* has no native bf16"):
        Translator(random_checkpoint, precision="bf16")


def test_bf16_products_translate_the_copy_task(copy_checkpoint, monkeypatch):
    """bf16 products (forced: on a CPU without native bf16 the mock lets it run, emulated and slow
    but tiny) translate the trained copy model as fp32 does."""
    from aiayn import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    lines = ["a b c d e f g", "f e d c b a", "b b c c"]
    fp32 = Translator(copy_checkpoint, search=SearchConfig(beam=4), precision="fp32").translate(lines)
    bf16 = Translator(copy_checkpoint, search=SearchConfig(beam=4), precision="bf16")
    assert bf16.precision == "bf16"
    assert bf16.translate(lines) == fp32 == lines


def test_cli_precision_flag_errors_in_one_line(random_checkpoint, capsys, monkeypatch, tmp_path):
    from aiayn import precision

    monkeypatch.setattr(precision, "cpu_arithmetic", lambda: precision.CpuArithmetic("AVX2", False, False, False))
    source = tmp_path / "in.txt"
    source.write_text("a dog\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(random_checkpoint), "--precision", "bf16", "--input", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aiayn: error: precision bf16: this CPU (AVX2, no native bf16)" in err


# ---------------------------------------------------------------------------------------------
# Streaming: translate_stream in chunks, `aiayn translate` writing each chunk as it completes
# ---------------------------------------------------------------------------------------------

# Empty lines at chunk boundaries (with chunk 2: lines 2, 3, 4 and 8), an over-long line (truncated), the last chunk short.
STREAM_LINES = ["a dog runs", "", "", "", "the cat sat on the mat and the dog runs in the park", "two men",
                "a woman is reading", "", "x", " ".join(TEXT * 10), "the cat"]


def _key(nbest):
    return [[(t.text, t.tokens) for t in hyps] for hyps in nbest]


@pytest.mark.parametrize("nbest", [1, 2])
def test_streaming_in_chunks_equals_the_whole_list_at_once(random_checkpoint, nbest):
    """Any chunk size gives the translations (n-best lists, scores) of one sort over the whole
    input, in input order, one chunk of results per chunk of lines."""
    translator = Translator(random_checkpoint, search=SearchConfig(beam=2, max_len_b=5), batch_size=3)
    n = len(STREAM_LINES)
    whole = translator.translate_nbest(STREAM_LINES, nbest=nbest, chunk=n)  # one chunk: the old whole-input path
    assert [hyps[0].text for hyps in whole] == [translator.translate([line])[0] for line in STREAM_LINES]
    assert [len(hyps) for hyps in whole][1:4] == [1, 1, 1] and whole[1][0].text == "" and whole[1][0].tokens == []
    for chunk in (1, 2, 3, 4, n, n + 5):
        blocks = list(translator.translate_stream(iter(STREAM_LINES), nbest=nbest, chunk=chunk))
        sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
        assert [len(b) for b in blocks] == sizes
        streamed = [hyps for block in blocks for hyps in block]
        assert _key(streamed) == _key(whole), chunk
        assert [t.score for h in streamed for t in h] == pytest.approx([t.score for h in whole for t in h], abs=1e-5)
        assert _key(translator.translate_nbest(STREAM_LINES, nbest=nbest, chunk=chunk)) == _key(whole)
    assert list(translator.translate_stream([])) == []


def test_streaming_reads_only_as_far_as_it_translates(random_checkpoint):
    """Each chunk is yielded before the next is read: an error the input raises late (a bad line
    of a file) comes after the chunks before it were delivered."""
    translator = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=3))
    read = []

    def lines():
        for i, line in enumerate(STREAM_LINES[:5]):
            read.append(i)
            yield line
        raise UserError("bad line", path="in.txt", line=6)

    stream = translator.translate_stream(lines(), chunk=2)
    assert read == []  # nothing is read before the first chunk is asked for
    assert len(next(stream)) == 2 and read == [0, 1]
    assert len(next(stream)) == 2 and read == [0, 1, 2, 3]
    with pytest.raises(UserError, match="in.txt:6: bad line"):
        next(stream)
    with pytest.raises(UserError, match="nbest must be between 1 and the beam size 1"):  # checked before any line is read
        translator.translate_stream(lines(), nbest=2)


def test_streaming_names_the_input_line_of_a_truncation(random_checkpoint, caplog):
    translator = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=2))
    with caplog.at_level(logging.WARNING, logger="aiayn.translator"):
        list(translator.translate_stream(STREAM_LINES, chunk=3))  # line 10 is the first line of the fourth chunk
    assert "input line 10 has" in caplog.text and "input line 1 has" not in caplog.text


def test_streaming_progress_with_and_without_a_total(random_checkpoint, capsys):
    translator = Translator(random_checkpoint, search=SearchConfig(beam=1, max_len_b=2))
    list(translator.translate_stream(STREAM_LINES, chunk=4, progress=True, total=len(STREAM_LINES)))
    assert f"translate: {len(STREAM_LINES)}/{len(STREAM_LINES)} sent" in capsys.readouterr().err  # empty lines count
    list(translator.translate_stream(iter(STREAM_LINES), chunk=4, progress=True))
    err = capsys.readouterr().err
    assert f"translate: {len(STREAM_LINES)} sent" in err and "/" not in err


@pytest.fixture
def small_chunks(monkeypatch):
    """``aiayn translate`` and ``evaluate`` streaming 2 lines at a time."""
    from aiayn import translator

    monkeypatch.setattr(translator, "CHUNK_LINES", 2)
    return 2


def _write_lines(path, lines, bad_line=None):
    """``lines`` to ``path``; line number ``bad_line`` (1-based) replaced by invalid UTF-8."""
    raw = [line.encode("utf-8") for line in lines]
    if bad_line is not None:
        raw[bad_line - 1] = b"caf\xe9 au lait"
    path.write_bytes(b"".join(r + b"\n" for r in raw))


def test_cli_translate_streams_in_order(random_checkpoint, small_chunks, tmp_path, capsys):
    """Chunk by chunk to stdout and to --output, the same lines as one sort of the whole input;
    the n-best index counts input lines across chunks."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    _write_lines(inp, STREAM_LINES)
    search = SearchConfig(beam=2, max_len_b=4)
    expected = Translator(random_checkpoint, search=search).translate_nbest(STREAM_LINES, nbest=2,
                                                                            chunk=len(STREAM_LINES))
    args = ["translate", "--checkpoint", str(random_checkpoint), "--input", str(inp), "--beam", "2", "--max-len-b", "4"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == [hyps[0].text for hyps in expected]
    assert main(args + ["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == [hyps[0].text for hyps in expected]
    assert not (tmp_path / "out.txt.partial").exists()
    assert main(args + ["--nbest", "2"]) == 0
    rows = [row.split("\t") for row in capsys.readouterr().out.splitlines()]
    assert [(int(r[0]), r[3]) for r in rows] == [(i, h.text) for i, hyps in enumerate(expected) for h in hyps]


def test_cli_translate_bad_line_late_leaves_a_partial_file_not_the_output(random_checkpoint, small_chunks, tmp_path,
                                                                        capsys):
    """A bad line found late: one line naming FILE:LINE, status 2; the chunks done before it are
    in OUTPUT.partial, OUTPUT is not written (an old one is kept), and the error says so."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    partial = tmp_path / "out.txt.partial"
    lines = STREAM_LINES[:7]
    _write_lines(inp, lines, bad_line=6)  # in the third chunk of 2
    done = Translator(random_checkpoint, search=SearchConfig(max_len_b=4)).translate(lines[:4])
    args = ["translate", "--checkpoint", str(random_checkpoint), "--input", str(inp), "--max-len-b", "4"]
    assert main(args + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"aiayn: error: {inp}:6: invalid UTF-8 (byte 0xe9 at column 4); "
                          f"the translations of the first 4 lines are in {partial}; {out} was not written")
    assert not out.exists()
    assert partial.read_text(encoding="utf-8").split("\n") == done + [""]
    # The partial file is a user's file now: replaced only with --force.
    assert main(args + ["--output", str(out)]) == 2
    assert f"{partial}: already exists" in capsys.readouterr().err
    # With --force, an existing output stays as it was until the translation is complete.
    out.write_text("keep me\n", encoding="utf-8")
    assert main(args + ["--output", str(out), "--force"]) == 2
    capsys.readouterr()
    assert out.read_text(encoding="utf-8") == "keep me\n"
    assert partial.read_text(encoding="utf-8").split("\n") == done + [""]
    # On stdout: the chunks before the bad line were printed, then the error; status 2.
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out.split("\n") == done + [""] and f"{inp}:6: invalid UTF-8" in captured.err
    # A bad line in the first chunk: no partial file is left behind.
    partial.unlink()
    _write_lines(inp, lines, bad_line=2)
    assert main(args + ["--output", str(out), "--force"]) == 2
    assert f"{inp}:2: invalid UTF-8" in capsys.readouterr().err
    assert not partial.exists() and out.read_text(encoding="utf-8") == "keep me\n"
    # Fixed, it completes: the whole output in place, no partial file.
    _write_lines(inp, lines)
    assert main(args + ["--output", str(out), "--force"]) == 0
    assert out.read_text(encoding="utf-8").splitlines()[:4] == done and not partial.exists()


def test_cli_translate_crash_keeps_the_finished_chunks(random_checkpoint, small_chunks, tmp_path, capsys, monkeypatch):
    """Not a user error (a bug, out of memory): the traceback stays, and a line on stderr says
    where the translations done so far are."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    _write_lines(inp, ["a dog", "the cat", "two men", "a woman"])
    calls = []
    original = Translator.search_ids

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args)

    monkeypatch.setattr(Translator, "search_ids", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["translate", "--checkpoint", str(random_checkpoint), "--input", str(inp), "--output", str(out),
              "--max-len-b", "3"])
    assert capsys.readouterr().err == (f"aiayn: translation stopped: the translations of the first 2 lines are in "
                                       f"{out}.partial; {out} was not written\n")
    assert not out.exists() and len((tmp_path / "out.txt.partial").read_text(encoding="utf-8").splitlines()) == 2
