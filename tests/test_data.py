"""The data stage: validation of user files, LibreOffice alignment, the tokenizer, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aiayn.cli import main
from aiayn.data import TokenBatchSampler, Tokenizer, collate, load_dataset
from aiayn.data.libreoffice import align_trees, paragraphs
from aiayn.data.text import read_parallel
from aiayn.data.tokenizer import train_bpe
from aiayn.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MULTI30K = SHARED / "data" / "multi30k"


# -- validating user files ----------------------------------------------------------------------


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _prepare(tmp_path: Path, *extra: str) -> int:
    return main(["prepare", "--out", str(tmp_path / "out"), "--valid-size", "1",
                 "--test-size", "1", *extra])


GOOD = b"one\ntwo\nthree\nfour\nfive\nsix\n"
GOOD_DE = b"eins\nzwei\ndrei\nvier\nf\xc3\xbcnf\nsechs\n"


@pytest.mark.parametrize("src,tgt,bad,line,words", [
    (GOOD, b"eins\nzwei\n", "src", 3, "no counterpart"),
    (GOOD, GOOD_DE + b"sieben\n", "tgt", 7, "no counterpart"),
    (b"one\ntw\xffo\n", b"eins\nzwei\n", "src", 2, "invalid UTF-8"),
    (b"one\ntwo\n", b"eins\nzw\x00ei\n", "tgt", 2, "NUL byte"),
    (b"one\n\nthree\n", b"eins\nzwei\ndrei\n", "src", 2, "empty"),
    (b"one\ntwo\nthree\n", b"eins\nzwei\n  \n", "tgt", 3, "empty"),
])
def test_malformed_parallel_files(tmp_path, capsys, src, tgt, bad, line, words):
    paths = {"src": _write(tmp_path / "a.en", src), "tgt": _write(tmp_path / "b.de", tgt)}
    assert _prepare(tmp_path, "--src", paths["src"], "--tgt", paths["tgt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aiayn: error: {paths[bad]}:{line}: "), err
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # validated before any work


def test_empty_and_missing_files(tmp_path, capsys):
    empty = _write(tmp_path / "empty.en", b"\xef\xbb\xbf\r\n")
    good = _write(tmp_path / "good.de", GOOD_DE)
    assert _prepare(tmp_path, "--src", empty, "--tgt", good) == 2
    assert f"{empty}: file is empty" in capsys.readouterr().err
    missing = str(tmp_path / "missing.en")
    assert _prepare(tmp_path, "--src", missing, "--tgt", good) == 2
    assert f"{missing}: file not found" in capsys.readouterr().err


def test_tsv_needs_one_tab(tmp_path, capsys):
    tsv = _write(tmp_path / "p.tsv", b"a\tb\nc d\n")
    assert _prepare(tmp_path, "--tsv", tsv) == 2
    assert f"{tsv}:2: expected exactly one TAB" in capsys.readouterr().err


def test_crlf_and_bom_are_accepted(tmp_path):
    src = _write(tmp_path / "a.en", b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n"))
    tgt = _write(tmp_path / "b.de", GOOD_DE.replace(b"\n", b"\r\n"))
    s, t, lines = read_parallel(src, tgt)
    assert s[0] == "one" and t[4] == "fünf" and lines == [1, 2, 3, 4, 5, 6]


def test_blank_on_both_sides_is_skipped(tmp_path):
    src = _write(tmp_path / "a.en", b"one\n\nthree\n")
    tgt = _write(tmp_path / "b.de", b"eins\n\ndrei\n")
    assert read_parallel(src, tgt) == (["one", "three"], ["eins", "drei"], [1, 3])


# -- LibreOffice help alignment -----------------------------------------------------------------

PAGE_EN = """<html><body><div id="DisplayArea">
<h1 id="hd_id1" dir="auto">Page <span class="emph">Title</span></h1>
<p id="par_id2" class="paragraph">Choose <span id="swln1" class="switchinline"><span hidden="true"
 id="MACtextshared1" class="MAC"><span class="emph">Preferences</span></span><span hidden="true"
 id="defaulttextshared1"><span class="emph">Tools - Options</span></span></span>.<br>Done.</p>
<p id="par_id3">Only in English.</p>
<img src="x.png" alt="an image"><p id="par_id4">Line one
   and   line two &amp; more.</p>
<p id="par_id2">An embedded copy of paragraph two.</p>
<p class="noid">Not a paragraph with an id.</p>
</div></body></html>"""

PAGE_DE = """<html><body><div id="DisplayArea">
<h1 id="hd_id1" dir="auto">Seite <span class="emph">Titel</span></h1>
<p id="par_id2" class="paragraph">Wählen Sie <span id="swln1" class="switchinline"><span
 hidden="true" id="MACtextshared1" class="MAC">Einstellungen</span><span hidden="true"
 id="defaulttextshared1">Extras - Optionen</span></span>.<br>Fertig.</p>
<p id="par_id4">Zeile eins und Zeile zwei &amp; mehr.</p>
<p id="par_id5">Nur auf Deutsch.</p>
</div></body></html>"""


def test_paragraphs_keep_default_variant_and_visible_text():
    pars = paragraphs(PAGE_EN)
    assert pars == {"hd_id1": "Page Title", "par_id2": "Choose Tools - Options. Done.",
                    "par_id3": "Only in English.", "par_id4": "Line one and line two & more."}


def test_align_trees_by_page_and_element_id(tmp_path):
    en, de = tmp_path / "en-US", tmp_path / "de"
    for root, page in ((en, PAGE_EN), (de, PAGE_DE)):
        (root / "text" / "shared").mkdir(parents=True)
        (root / "text" / "shared" / "page.html").write_text(page, encoding="utf-8")
    # A page only in English and a page with the same ids but a different path do not align.
    (en / "text" / "shared" / "only_en.html").write_text(PAGE_EN, encoding="utf-8")
    (de / "text" / "other.html").parent.mkdir(exist_ok=True)
    (de / "text" / "other.html").write_text(PAGE_DE, encoding="utf-8")
    pairs = align_trees(en, de)
    assert [(p.page, p.element_id, p.src, p.tgt) for p in pairs] == [
        ("text/shared/page.html", "hd_id1", "Page Title", "Seite Titel"),
        ("text/shared/page.html", "par_id2", "Choose Tools - Options. Done.",
         "Wählen Sie Extras - Optionen. Fertig."),
        ("text/shared/page.html", "par_id4", "Line one and line two & more.",
         "Zeile eins und Zeile zwei & mehr."),
    ]


def test_libreoffice_without_apt_points_to_src_tgt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)
    code = main(["prepare", "--out", str(tmp_path / "out"), "--corpus", "libreoffice-help",
                 "--lang", "fr", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get" in err and "--src FILE --tgt FILE" in err


# -- the tokenizer ------------------------------------------------------------------------------

SENTENCES = ["Wählen Sie Extras - Optionen.", "Choose Tools - Options.",
             "Die Größe der Seite ändern.", "Change the size of the page 42 times."] * 50


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    train_bpe(SENTENCES, tmp_path / "spm", vocab_size=1000)
    tok = Tokenizer.load(tmp_path / "spm.model")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    # Unseen characters (byte fallback) and digits round-trip exactly too.
    for text in SENTENCES[:4] + ["Straße → 東京 2024 ✓"]:
        ids = tok.encode(text)
        assert min(ids) > 3 and tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
        assert "".join(tok.pieces(ids)).replace("▁", " ").strip() != ""
    assert tok.vocab_size <= 1000


def test_a_lowercasing_tokenizer_is_str_lower_and_nothing_else(tmp_path):
    """--lowercase: the model lowercases what it encodes exactly as ``str.lower`` (so 'ß' and '…'
    stay, unlike sentencepiece's nmt_nfkc_cf), and says so; the default model does not."""
    settings = train_bpe(SENTENCES, tmp_path / "lc", vocab_size=1000, lowercase=True)
    assert settings["normalization_rule_name"] == "lowercase"
    assert not list(tmp_path.glob("*.tsv"))  # the rules file is not left behind
    tok = Tokenizer.load(tmp_path / "lc.model")
    assert tok.lowercases
    for text in SENTENCES[:4] + ["STRASSE, Straße … ÄÖÜ Ωμέγα İstanbul 2024 ✓"]:
        assert tok.decode(tok.encode(text)) == text.lower()
    train_bpe(SENTENCES, tmp_path / "cased", vocab_size=1000)
    assert not Tokenizer.load(tmp_path / "cased.model").lowercases


def test_prepare_lowercase(tmp_path, capsys):
    """prepare --lowercase: a lowercasing tokenizer, in the settings (a new dataset), the raw
    references kept as given, and no round-trip failures counted for the lowercasing."""
    src, tgt = _corpus(tmp_path, 400)
    out = tmp_path / "out"
    base = ["prepare", "--src", src, "--tgt", tgt, "--out", str(out), "--valid-size", "20", "--test-size", "20",
            "--vocab-size", "200"]
    assert main(base + ["--lowercase"]) == 0
    data = load_dataset(out)
    assert data.tokenizer.lowercases and data.manifest["settings"]["lowercase"] is True
    assert data.manifest["roundtrip_failures_valid_test"] == 0
    raw = data.raw("valid", "tgt")
    assert any(line != line.lower() for line in raw)  # the targets are upper case, kept as given
    assert [data.tokenizer.decode(x) for x in data.split("valid").tgt] == [line.lower() for line in raw]
    capsys.readouterr()
    assert main(base) == 2 and "--force" in capsys.readouterr().err  # cased is another dataset
    assert main(base + ["--lowercase", "--tokenizer-from", str(out)]) == 2
    assert "--lowercase does not apply with --tokenizer-from" in capsys.readouterr().err


def test_tokenizer_load_rejects_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError):
        Tokenizer.load(bad)


# -- batches ------------------------------------------------------------------------------------


def _lengths(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 60, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 1, None)
    src[7] = 500  # one pair longer than the whole budget
    return src, tgt


def _lists(batches):
    return [b.tolist() for b in batches]


def _greedy_batches(src, tgt, max_tokens, order):
    """The per-pair greedy loop the vectorised `make_batches` must reproduce exactly."""
    batches, current, longest = [], [], 0
    for i in order:
        need = max(longest, src[i] + 1, tgt[i] + 1)
        if current and (len(current) + 1) * need > max_tokens:
            batches.append(current)
            current, need = [], max(src[i] + 1, tgt[i] + 1)
        current.append(int(i))
        longest = need
    return batches + ([current] if current else [])


@pytest.mark.parametrize("max_tokens", [1, 7, 60, 400, 5000])
def test_vectorised_batches_equal_the_greedy_loop(max_tokens):
    from aiayn.data.batching import make_batches

    for seed in range(3):
        src, tgt = _lengths(n=1500, seed=seed)
        order = np.lexsort((np.random.default_rng(seed).permutation(len(src)), tgt, src, np.maximum(src, tgt)))
        assert _lists(make_batches(src, tgt, max_tokens, order)) == _greedy_batches(src, tgt, max_tokens, order)
    assert make_batches(src[:0], tgt[:0], 400, order[:0]) == []
    with pytest.raises(ValueError, match="non-decreasing"):
        make_batches(src, tgt, 400, np.arange(len(src)))  # not sorted by length


def test_length_order_equals_the_lexsort():
    from aiayn.data.batching import length_order

    src, tgt = _lengths(n=5000, seed=4)
    tiebreak = np.random.default_rng(1).permutation(len(src))
    expected = np.lexsort((tiebreak, tgt, src, np.maximum(src, tgt)))
    assert (length_order(src, tgt, tiebreak) == expected).all()
    src[9] = 70_000  # beyond 16-bit keys: the lexsort itself
    expected = np.lexsort((tiebreak, tgt, src, np.maximum(src, tgt)))
    assert (length_order(src, tgt, tiebreak) == expected).all()


def test_token_budget_and_each_pair_once_per_epoch():
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=400, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert sampler.epoch == epoch
        seen = []
        for batch in sampler:
            cost = len(batch) * max((src[batch] + 1).max(), (tgt[batch] + 1).max())
            assert cost <= 400 or len(batch) == 1
            seen.extend(batch)
        assert sorted(seen) == list(range(len(src)))  # nothing lost or duplicated
    assert [7] in _lists(sampler.batches())
    assert sampler.padding_efficiency() > 0.9


def test_batches_are_deterministic_and_reshuffled_per_epoch():
    src, tgt = _lengths()
    a = TokenBatchSampler(src, tgt, 400, seed=3)
    b = TokenBatchSampler(src, tgt, 400, seed=3)
    assert _lists(a.batches(0)) == _lists(b.batches(0))
    assert _lists(a.batches(0)) != _lists(a.batches(1))
    assert _lists(a.batches(0)) != _lists(TokenBatchSampler(src, tgt, 400, seed=4).batches(0))
    plain = TokenBatchSampler(src, tgt, 400, shuffle=False)
    assert _lists(plain.batches(0)) == _lists(plain.batches(1))


def test_resume_mid_epoch_continues_exactly():
    src, tgt = _lengths()
    full = TokenBatchSampler(src, tgt, 400, seed=5)
    full.set_epoch(2)
    expected = list(full)
    run = TokenBatchSampler(src, tgt, 400, seed=5)
    run.set_epoch(2)
    it = iter(run)
    first = [next(it) for _ in range(10)]
    state = run.state_dict()
    resumed = TokenBatchSampler(src, tgt, 400, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the same epoch keeps the position
    assert _lists(first + list(resumed)) == _lists(expected)
    # A finished epoch moves on by itself: its state resumes at the next epoch, not a replay.
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0
    assert _lists(resumed) == _lists(full.batches(3))


def test_shards_partition_the_batches():
    src, tgt = _lengths()
    whole = TokenBatchSampler(src, tgt, 400, seed=1).batches(0)
    shards = [TokenBatchSampler(src, tgt, 400, seed=1, num_shards=3, shard_id=k) for k in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == len(whole) // 3
    assert [_lists(s.batches(0)) for s in shards] == [_lists(whole[k:len(whole) // 3 * 3:3]) for k in range(3)]


def test_collate_layout():
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11]])
    assert batch.src.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert batch.tgt_in.tolist() == [[2, 9, 0], [2, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, 3, 0], [10, 11, 3]]
    assert (batch.n_src_tokens, batch.n_tgt_tokens) == (6, 5)
    assert batch.to("cpu").src.dtype == batch.tgt_out.dtype == torch.int64


# -- prepare end to end -------------------------------------------------------------------------


def test_prepare_copy_task_load_and_reuse(tmp_path, capsys):
    out = tmp_path / "copy"
    args = ["prepare", "--out", str(out), "--corpus", "reverse", "--train-size", "600",
            "--valid-size", "50", "--test-size", "50", "--seed", "7"]
    assert main(args) == 0
    data = load_dataset(out)
    m = data.manifest
    assert m["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert m["counts"]["valid"] == 50 and m["counts"]["test"] == 50
    train = data.split("train")
    assert len(train) == m["counts"]["train"] and len(train.src) == len(train.tgt)
    raw_src, raw_tgt = data.raw("test", "src"), data.raw("test", "tgt")
    test = data.split("test")
    for i in range(len(test)):
        assert data.tokenizer.decode(test.src[i]) == raw_src[i]
        assert raw_tgt[i].split() == raw_src[i].split()[::-1]
    batch = train.collate(next(iter(train.sampler(200, seed=0))))
    assert batch.src.shape[0] == batch.tgt_in.shape[0]
    capsys.readouterr()

    stamp = (out / "train.src.ids.npy").stat().st_mtime_ns
    assert main(args) == 0  # identical settings: a no-op that says so
    assert "reusing" in capsys.readouterr().out
    assert (out / "train.src.ids.npy").stat().st_mtime_ns == stamp
    changed = args[:-1] + ["8"]
    assert main(changed) == 2  # different settings: never overwrite without --force
    assert "--force" in capsys.readouterr().err
    assert main(changed + ["--force"]) == 0
    assert load_dataset(out).manifest["settings"]["seed"] == 8


@pytest.mark.parametrize("names,change", [
    (("en/train.txt", "de/train.txt"), "edit the source"),  # two files of one name
    (("train.en", "train.de"), "swap --src and --tgt"),  # no file name changes
])
def test_changed_or_swapped_input_is_a_new_dataset(tmp_path, capsys, names, change):
    """The fingerprint keys each input by its role (train.src, train.tgt), not by file name."""
    src, tgt = (tmp_path / name for name in names)
    for path, word in ((src, "sentence number"), (tgt, "Satz Nummer")):
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(f"{word} {i}\n" for i in range(30)), encoding="utf-8")
    out = tmp_path / "out"

    def prepare(*extra: str) -> int:
        return main(["prepare", "--out", str(out), "--src", str(src), "--tgt", str(tgt), "--valid-size", "2",
                     "--test-size", "2", "--vocab-size", "60", *extra])

    assert prepare() == 0
    assert prepare() == 0 and "reusing" in capsys.readouterr().out
    before = load_dataset(out).manifest["fingerprint"]
    if change == "edit the source":
        src.write_text(src.read_text(encoding="utf-8").replace("number 7\n", "number seven\n"), encoding="utf-8")
    else:
        src, tgt = tgt, src
    assert prepare() == 2
    assert "different settings or input" in capsys.readouterr().err
    assert prepare("--force") == 0
    data = load_dataset(out)
    assert data.manifest["fingerprint"] != before
    sources = data.raw("train", "src") + data.raw("valid", "src") + data.raw("test", "src")
    assert sorted(sources) == sorted(src.read_text(encoding="utf-8").splitlines())


def test_same_seed_same_dataset(tmp_path):
    for name in ("a", "b"):
        assert main(["prepare", "--out", str(tmp_path / name), "--corpus", "copy",
                     "--train-size", "300", "--valid-size", "20", "--test-size", "20"]) == 0
    for f in ("train.src", "valid.tgt", "test.origin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    a, b = load_dataset(tmp_path / "a").split("train"), load_dataset(tmp_path / "b").split("train")
    assert all(np.array_equal(x, y) for x, y in zip(a.src, b.src))


def test_load_dataset_rejects_missing_or_corrupt(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(UserError, match="no manifest.json"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt dataset manifest"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "aiayn-dataset", "version": 1}))
    with pytest.raises(UserError, match="spm.model is missing"):
        load_dataset(tmp_path)


def test_never_overwrites_a_foreign_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for force in ([], ["--force"]):
        assert main(["prepare", "--out", str(out), "--corpus", "copy", "--train-size", "100",
                     "--valid-size", "5", "--test-size", "5", *force]) == 2
        assert "--force replaces only an aiayn dataset" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="Multi30k not available (../shared/data)")
def test_prepare_multi30k(tmp_path):
    out = tmp_path / "m30k"
    assert main(["prepare", "--out", str(out), "--corpus", "multi30k", "--path", str(MULTI30K),
                 "--pair", "en-de", "--vocab-size", "2000"]) == 0
    m = load_dataset(out).manifest
    assert m["counts"]["valid"] == 1014 and m["counts"]["test"] == 1000
    assert m["roundtrip_failures_valid_test"] == 0


def test_split_keeps_groups_together_and_is_deterministic():
    from aiayn.data.prepare import LABELS, split_pool

    n = 400
    names = [f"page{g}" for g in range(n // 3 + 1)]
    groups = np.arange(n) // 3
    a = split_pool(groups, names, 30, 21, seed=1)
    assert (a == split_pool(groups, names, 30, 21, seed=1)).all()
    assert (a != split_pool(groups, names, 30, 21, seed=2)).any()
    counts = np.bincount(a, minlength=3)
    assert (counts[LABELS["valid"]], counts[LABELS["test"]]) == (30, 21)  # whole groups of 3 that fit
    for g in range(n // 3 + 1):
        assert len(set(a[groups == g].tolist())) == 1  # a page never straddles two splits
    # Without groups: a seeded permutation, exact sizes.
    plain = split_pool(np.full(n, -1), [], 30, 21, seed=1)
    assert np.bincount(plain, minlength=3).tolist() == [n - 51, 30, 21]
    assert (plain != split_pool(np.full(n, -1), [], 30, 21, seed=2)).any()
    with pytest.raises(UserError, match="at least half"):
        split_pool(np.full(10, -1), [], 3, 3, seed=1)


# -- streaming: chunks, late errors, memory-mapped arrays ---------------------------------------


def _corpus(tmp_path: Path, n: int, *, name: str = "big") -> list[str]:
    """n pairs with varied lengths, a duplicate of pair 3 far away and an untranslated pair."""
    rng = np.random.default_rng(0)
    words = "the a house cat sees runs big small red green old new".split()
    src = [" ".join(rng.choice(words, rng.integers(2, 12))) + f" {i}" for i in range(n)]
    tgt = [s.upper() for s in src]
    src[n - 2], tgt[n - 2] = src[3], tgt[3]  # a duplicate, many chunks after the first occurrence
    tgt[n - 5] = src[n - 5]  # untranslated
    return [_lines(tmp_path / f"{name}.en", src), _lines(tmp_path / f"{name}.de", tgt)]


def _dataset_contents(out: Path) -> dict:
    data = load_dataset(out)
    contents = {"manifest": {k: v for k, v in data.manifest.items() if k not in ("created",)}}
    for split in ("train", "valid", "test"):
        part = data.split(split)
        contents[split] = ([x.tolist() for x in part.src], [x.tolist() for x in part.tgt],
                           (out / f"{split}.src").read_text(), (out / f"{split}.origin").read_text())
    return contents


def test_chunk_boundaries_do_not_change_the_dataset(tmp_path, monkeypatch):
    from aiayn.data import prepare

    files = _corpus(tmp_path, 700)
    args = ["--src", files[0], "--tgt", files[1], "--valid-size", "20", "--test-size", "20",
            "--vocab-size", "60", "--max-len", "12"]
    assert main(["prepare", "--out", str(tmp_path / "whole"), *args]) == 0
    monkeypatch.setattr(prepare, "CHUNK_PAIRS", 7)  # many chunks, boundaries everywhere
    assert main(["prepare", "--out", str(tmp_path / "chunked"), *args]) == 0
    whole, chunked = _dataset_contents(tmp_path / "whole"), _dataset_contents(tmp_path / "chunked")
    assert whole == chunked
    m = whole["manifest"]
    # Deduplication across chunks, the identical pair, and the length filter over all chunks.
    assert m["filters"]["duplicates"] == 1 and m["filters"]["identical"] == 1
    assert m["filters"]["too_long"] > 0
    assert m["counts"]["train"] + 40 + sum(m["filters"].values()) == 700
    train = load_dataset(tmp_path / "chunked").split("train")
    assert int(max(train.src_lens.max(), train.tgt_lens.max())) <= 12
    assert whole["train"][2].count(load_dataset(tmp_path / "whole").raw("train", "src")[0]) == 1


def test_a_bad_line_found_late_is_named_and_nothing_is_written(tmp_path, capsys):
    src = [f"sentence {i}" for i in range(30_000)]
    tgt = [f"Satz {i}" for i in range(30_000)]
    en = _lines(tmp_path / "late.en", src)
    de = tmp_path / "late.de"
    de.write_bytes("".join(t + "\n" for t in tgt[:29_000]).encode() + b"Sa\xfftz\n"
                   + "".join(t + "\n" for t in tgt[29_001:]).encode())
    assert main(["prepare", "--out", str(tmp_path / "out"), "--src", en, "--tgt", str(de)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"aiayn: error: {de}:29001: invalid UTF-8 (byte 0xff at column 3)"
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work directory left


def test_splits_are_memory_mapped_and_format_1_is_still_read(tmp_path):
    files = _corpus(tmp_path, 200)
    out = tmp_path / "out"
    assert main(["prepare", "--out", str(out), "--src", files[0], "--tgt", files[1], "--valid-size", "10",
                 "--test-size", "10", "--vocab-size", "60"]) == 0
    data = load_dataset(out)
    train = data.split("train")
    assert isinstance(train.src.ids, np.memmap) and isinstance(train.tgt.offsets, np.memmap)
    assert train.src_lens.dtype == np.int32 and len(train.src_lens) == len(train) == data.manifest["counts"]["train"]
    assert train.src[2:5][1].tolist() == train.src[3].tolist()
    before = {s: ([x.tolist() for x in data.split(s).src], [x.tolist() for x in data.split(s).tgt])
              for s in ("train", "valid", "test")}
    # The same dataset as format 1 wrote it: one .npz per split, read whole.
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "valid", "test"):
        arrays = {f"{side}_{kind}": np.load(out / f"{split}.{side}.{kind}.npy")
                  for side in ("src", "tgt") for kind in ("ids", "offsets")}
        np.savez(out / f"{split}.npz", **arrays)
        for name in arrays:
            (out / f"{split}.{name.replace('_', '.')}.npy").unlink()
    manifest["version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    old = load_dataset(out)
    assert {s: ([x.tolist() for x in old.split(s).src], [x.tolist() for x in old.split(s).tgt])
            for s in ("train", "valid", "test")} == before
    manifest["version"] = 7
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 7, this aiayn reads 1 or 2; re-run aiayn prepare --force"):
        load_dataset(out)


def test_array_writer_writes_npy_files_of_any_length(tmp_path):
    from aiayn.data.dataset import ArrayWriter, Ragged, RaggedWriter

    writer = ArrayWriter(tmp_path / "a.npy", np.int32)
    for piece in (np.arange(5), np.arange(0), np.arange(100_000)):
        writer.append(piece)
    writer.close()
    a = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert a.dtype == np.int32 and a.shape == (100_005,) and a[4] == 4 and a[-1] == 99_999
    ragged = RaggedWriter(tmp_path / "ids.npy", tmp_path / "offsets.npy")
    ragged.append(np.array([1, 2, 3, 4, 5, 6]), np.array([2, 0, 4]))
    ragged.append(np.array([7]), np.array([1]))
    ragged.close()
    r = Ragged(np.load(tmp_path / "ids.npy"), np.load(tmp_path / "offsets.npy"))
    assert [x.tolist() for x in r] == [[1, 2], [], [3, 4, 5, 6], [7]]
    assert r.lengths().tolist() == [2, 0, 4, 1] and r[-1].tolist() == [7]


def test_the_bpe_sample_is_exact_and_seeded_in_blocks(monkeypatch):
    from aiayn.data import prepare

    monkeypatch.setattr(prepare, "HASH_CHUNK", 1000)
    for total, sample in ((10_500, 700), (10_500, 20_000), (999, 10), (1000, 1000)):
        masks = list(prepare._sample_mask(total, sample, seed=3))
        taken = np.concatenate(masks)
        assert len(taken) == total and int(taken.sum()) == min(total, sample)
        assert (taken == np.concatenate(list(prepare._sample_mask(total, sample, seed=3)))).all()
    blocks = [int(m.sum()) for m in prepare._sample_mask(100_000, 10_000, seed=1)]
    assert min(blocks) > 50 and max(blocks) < 150  # about 100 of every block of 1,000: spread over all


def test_bpe_is_trained_on_a_seeded_sample(tmp_path):
    files = _corpus(tmp_path, 400)
    args = ["--src", files[0], "--tgt", files[1], "--valid-size", "10", "--test-size", "10",
            "--vocab-size", "60", "--bpe-sample", "150"]
    assert main(["prepare", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["prepare", "--out", str(tmp_path / "b"), *args]) == 0
    a, b = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    assert a.manifest["vocab"]["trained_on_sentences"] == 150
    def pieces(data):
        return data.tokenizer.pieces(range(data.tokenizer.vocab_size))

    assert pieces(a) == pieces(b)  # the sample is seeded
    assert main(["prepare", "--out", str(tmp_path / "c"), *args[:-1], "5000"]) == 0
    c = load_dataset(tmp_path / "c")
    assert c.manifest["vocab"]["trained_on_sentences"] == 2 * c.manifest["counts"]["train"]
    assert pieces(c) != pieces(a)


def test_training_filters_report_what_they_drop(tmp_path, capsys):
    src = [f"sentence number {i} here" for i in range(40)]
    tgt = [f"Satz Nummer {i} hier" for i in range(40)]
    src[1], tgt[1] = src[0], tgt[0]  # duplicate pair
    tgt[2] = src[2]  # untranslated
    src[3], tgt[3] = "word " * 30, "Wort " * 30  # too long for --max-len 20
    src[4], tgt[4] = "a", "ein sehr langer Satz mit vielen Wörtern"  # length ratio
    paths = [tmp_path / "x.en", tmp_path / "x.de"]
    for path, lines in zip(paths, (src, tgt)):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["prepare", "--out", str(tmp_path / "out"), "--src", str(paths[0]),
                 "--tgt", str(paths[1]), "--valid-size", "2", "--test-size", "2",
                 "--max-len", "20", "--vocab-size", "100", "--seed", "3"]) == 0
    m = load_dataset(tmp_path / "out").manifest
    out = capsys.readouterr().out
    assert m["filters"]["duplicates"] == 1 and m["filters"]["identical"] == 1
    assert "1 duplicates" in out and "longer than 20 subwords" in out
    data = load_dataset(tmp_path / "out")
    held = data.raw("valid", "src") + data.raw("test", "src")
    assert m["counts"]["train"] + len(held) + sum(m["filters"].values()) == 40
    assert m["languages"] == {"src": "en", "tgt": "de"}
    # Filters apply to training pairs only; a held-out pair is kept whole.
    assert m["filters"]["too_long"] + (src[3].strip() in held) == 1
    assert m["filters"]["length_ratio"] + (src[4] in held) == 1
    assert src[3].strip() not in data.raw("train", "src")


# -- your own dev and test sets ------------------------------------------------------------------


def _lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_prepare_with_your_own_valid_and_test_sets(tmp_path, capsys):
    train = [_lines(tmp_path / "train.en", [f"sentence number {i}" for i in range(40)]),
             _lines(tmp_path / "train.de", [f"Satz Nummer {i}" for i in range(40)])]
    dev = [_lines(tmp_path / "dev.en", ["a dev sentence", "sentence number 3", "another one"]),
           _lines(tmp_path / "dev.de", ["ein Dev-Satz", "Satz Nummer 3", "noch einer"])]
    test = [_lines(tmp_path / "test.en", ["a test sentence", "the last one"]),
            _lines(tmp_path / "test.de", ["ein Testsatz", "der letzte"])]
    out = tmp_path / "out"
    base = ["prepare", "--out", str(out), "--src", train[0], "--tgt", train[1], "--vocab-size", "80"]
    both = base + ["--valid-src", dev[0], "--valid-tgt", dev[1], "--test-src", test[0], "--test-tgt", test[1]]
    assert main(both) == 0
    data = load_dataset(out)
    m = data.manifest
    assert data.raw("valid", "src") == ["a dev sentence", "sentence number 3", "another one"]  # whole, in order
    assert data.raw("test", "tgt") == ["ein Testsatz", "der letzte"]
    assert (out / "valid.origin").read_text().split() == ["dev.en:1", "dev.en:2", "dev.en:3"]
    # Nothing is split off the training data; the pair whose source is a dev source is dropped.
    assert m["counts"] == {"train": 39, "valid": 3, "test": 2} and m["filters"]["held_out_source"] == 1
    assert "sentence number 3" not in data.raw("train", "src")
    assert m["split"]["from"] == {"train": "the pool", "valid": "--valid-src dev.en --valid-tgt dev.de",
                                  "test": "--test-src test.en --test-tgt test.de"}
    assert sorted(m["inputs_sha256"]) == ["test.src", "test.tgt", "train.src", "train.tgt", "valid.src", "valid.tgt"]
    assert "valid_size" not in m["settings"] and "test_size" not in m["settings"]
    assert main(both) == 0 and "reusing" in capsys.readouterr().out
    _lines(tmp_path / "dev.de", ["ein Dev-Satz", "Satz Nummer 3", "noch ein Satz"])  # the dev set changed
    assert main(both) == 2 and "different settings or input" in capsys.readouterr().err

    # Only a dev set: the test split is drawn from the training data.
    assert main(base + ["--valid-src", dev[0], "--valid-tgt", dev[1], "--test-size", "5", "--force"]) == 0
    m = load_dataset(out).manifest
    assert m["counts"]["valid"] == 3 and m["counts"]["test"] == 5
    assert m["counts"]["train"] + 5 + m["filters"]["held_out_source"] == 40
    assert m["split"]["from"]["test"] == "the pool" and m["settings"]["test_size"] == 5

    # With a TSV file of training pairs as well.
    tsv = _lines(tmp_path / "train.tsv", [f"sentence number {i}\tSatz Nummer {i}" for i in range(40)])
    assert main(["prepare", "--out", str(tmp_path / "tsv"), "--tsv", tsv, "--vocab-size", "80"] + both[len(base):]) == 0
    assert load_dataset(tmp_path / "tsv").manifest["counts"] == {"train": 39, "valid": 3, "test": 2}


def test_your_own_held_out_sets_are_checked_like_training_files(tmp_path, capsys):
    src = _lines(tmp_path / "train.en", [f"sentence {i}" for i in range(20)])
    tgt = _lines(tmp_path / "train.de", [f"Satz {i}" for i in range(20)])
    dev_en = _lines(tmp_path / "dev.en", ["one", "two", "three"])
    dev_de = _lines(tmp_path / "dev.de", ["eins", "zwei"])
    bad = tmp_path / "test.de"
    bad.write_bytes(b"eins\nzw\xffei\n")
    test_en = _lines(tmp_path / "test.en", ["one", "two"])
    base = ["prepare", "--out", str(tmp_path / "out"), "--src", src, "--tgt", tgt]
    for extra, message in [
        (["--valid-src", dev_en], "--valid-src and --valid-tgt go together"),
        (["--valid-src", dev_en, "--valid-tgt", dev_de], f"{dev_en}:3: line has no counterpart"),
        (["--test-src", test_en, "--test-tgt", str(bad)], f"{bad}:2: invalid UTF-8"),
        (["--test-src", test_en, "--test-tgt", str(tmp_path / "nope.de")], "nope.de: file not found"),
    ]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "c"), "--corpus", "copy", "--valid-src", dev_en,
                 "--valid-tgt", dev_en]) == 2
    assert "go with your own training data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_the_data_package_names_its_functions_even_after_its_modules_are_imported():
    """`from aiayn.data import prepare_dataset` is the function, also once aiayn.data.prepare (the
    module) has been imported: a lazily exported name must not be a submodule's name."""
    import importlib

    import aiayn.data as data

    for name in data.__all__:
        importlib.import_module(f"aiayn.data.{data._WHERE[name]}")
    for name in data.__all__:
        assert not isinstance(getattr(data, name), type(data)), name
    from aiayn.data import prepare_dataset

    assert callable(prepare_dataset)
