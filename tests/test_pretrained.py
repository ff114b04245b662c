"""Importing Hugging Face Marian models (aiayn.pretrained): the imported model computes what
`transformers` computes, its tokenizer gives MarianTokenizer's ids, and an aiayn export comes back
as it was. The models are built by `transformers` with random weights; the sentencepiece models
are trained here. Needs transformers (the dev extra); skipped without it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from aiayn.checkpoint import load_checkpoint
from aiayn.cli import main
from aiayn.config import SearchConfig
from aiayn.errors import UserError
from aiayn.pretrained import import_marian

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

# Real text, written for this test: the tokenizers are trained on it and must agree on it.
ENGLISH = [
    "A man in a blue shirt is standing on a ladder cleaning windows.",
    "Two young girls are playing with a dog in the park.",
    "The old bridge was closed for repairs last winter.",
    "She asked whether the train to Berlin leaves at 9:15 or at 10:40.",
    "Click OK to save the document, or Cancel to discard your changes.",
    "Children are sitting on the grass and eating ice cream.",
    "A woman with a red umbrella walks past the café.",
    "The weather report says it will rain on Tuesday.",
    "Press Ctrl+S to save; the file is written in UTF-8.",
    "He bought three apples, two pears and a loaf of bread.",
]
GERMAN = [
    "Ein Mann in einem blauen Hemd steht auf einer Leiter und putzt Fenster.",
    "Zwei junge Mädchen spielen im Park mit einem Hund.",
    "Die alte Brücke war letzten Winter wegen Reparaturen gesperrt.",
    "Sie fragte, ob der Zug nach Berlin um 9:15 oder um 10:40 abfährt.",
    "Klicken Sie auf OK, um das Dokument zu speichern, oder auf Abbrechen.",
    "Kinder sitzen auf dem Rasen und essen Eis.",
    "Eine Frau mit einem roten Regenschirm geht am Café vorbei.",
    "Der Wetterbericht sagt, dass es am Dienstag regnen wird.",
    "Drücken Sie Strg+S zum Speichern; die Datei wird in UTF-8 geschrieben.",
    "Er kaufte drei Äpfel, zwei Birnen und ein Brot.",
]


def _train_spm(directory: Path, name: str, lines: list[str], size: int) -> Path:
    import sentencepiece as spm

    text = directory / f"{name}.txt"
    rng = random.Random(len(name))
    text.write_text("\n".join(rng.sample(lines, len(lines)) * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / name), vocab_size=size,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2,
                                   character_coverage=1.0)
    return directory / f"{name}.model"


@pytest.fixture(scope="module")
def marian_tokenizer_files(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """source.spm (English), target.spm (German) and a Marian vocab.json over the pieces of both:
    </s> 0, <unk> 1, the pieces, <pad> last."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("marian-tok")
    src = _train_spm(d, "source", ENGLISH, 120)
    tgt = _train_spm(d, "target", GERMAN, 120)
    pieces: list[str] = []
    for model in (src, tgt):
        sp = spm.SentencePieceProcessor(model_file=str(model))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if not sp.is_control(i) and not sp.is_unknown(i) and piece not in pieces:
                pieces.append(piece)
    names = ["</s>", "<unk>", *pieces, "<pad>"]
    return d, {piece: i for i, piece in enumerate(names)}


def _marian_dir(root: Path, tok: tuple[Path, dict[str, int]], *, activation: str = "swish", bias: bool = True,
                seed: int = 0, safetensors: bool = True, d_model: int = 16) -> Path:
    """A MarianMTModel with random weights (and, with ``bias``, a random final_logits_bias), saved
    with its tokenizer files as an OPUS-MT directory is."""
    files, vocab = tok
    torch.manual_seed(seed)
    v = len(vocab)
    config = transformers.MarianConfig(
        vocab_size=v, decoder_vocab_size=v, d_model=d_model, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        activation_function=activation, max_position_embeddings=64, pad_token_id=v - 1, eos_token_id=0,
        decoder_start_token_id=v - 1, scale_embedding=True, share_encoder_decoder_embeddings=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # beyond the tiny default init, so every term counts
            if "embed_positions" not in name:  # the sinusoids stay
                p.normal_(0.0, 0.3)
        if bias:
            model.final_logits_bias.normal_(0.0, 1.0)
    out = root / f"marian-{activation}-{int(bias)}-{seed}-{int(safetensors)}"
    model.save_pretrained(out)
    if not safetensors:  # the older releases' layout: a pickled state dict of tensors
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "source.spm").write_bytes((files / "source.model").read_bytes())
    (out / "target.spm").write_bytes((files / "target.model").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": False, "model_max_length": 64}))
    return out


def _ours(marian_ids: list[int], order: dict[int, int]) -> list[int]:
    return [order[i] for i in marian_ids]


def _renumbering(ckpt, vocab: dict[str, int]) -> dict[int, int]:
    """Marian id -> aiayn id, by the piece names of the imported tokenizer (Marian's pad is the
    decoder start: aiayn's <s>)."""
    ours = ckpt.tokenizer.vocab
    names = {"</s>": "</s>", "<unk>": "<unk>", "<pad>": "<s>"}
    return {i: ours[names.get(piece, piece)] for piece, i in vocab.items()}


@pytest.mark.parametrize("activation,bias", [("swish", True), ("relu", False), ("gelu", True)])
def test_imported_logits_equal_huggingface(tmp_path, marian_tokenizer_files, activation, bias):
    src_dir = _marian_dir(tmp_path, marian_tokenizer_files, activation=activation, bias=bias)
    hf = transformers.MarianMTModel.from_pretrained(src_dir).eval()
    ck = import_marian(src_dir, tmp_path / "ck")
    ckpt = load_checkpoint(ck)
    cfg = ckpt.model.config
    assert (cfg.activation, cfg.logits_bias, cfg.sinusoid_layout) == (
        "swish" if activation == "swish" else activation, bias, "concatenated")
    vocab = marian_tokenizer_files[1]
    order = _renumbering(ckpt, vocab)
    pad = len(vocab) - 1
    g = torch.Generator().manual_seed(1)
    src = torch.randint(1, pad, (3, 7), generator=g)
    src[:, -1] = 0  # </s>
    tgt = torch.randint(1, pad, (3, 5), generator=g)
    src[2, 4:] = pad  # one padded source (HF: attention_mask)
    src[2, 3] = 0
    with torch.no_grad():
        decoder_in = torch.cat([torch.full((3, 1), pad), tgt], dim=1)
        expected = hf(input_ids=src, attention_mask=src.ne(pad), decoder_input_ids=decoder_in).logits
        ours_src = torch.tensor([_ours(row, order) for row in src.tolist()])
        ours_src[2, 4:] = 0  # aiayn's padding
        ours_in = torch.tensor([_ours(row, order) for row in decoder_in.tolist()])
        got = ckpt.model(ours_src, ours_in)
    perm = torch.tensor([order[i] for i in range(len(vocab))])
    torch.testing.assert_close(got[..., perm], expected, atol=1e-5, rtol=1e-5)


def test_imported_greedy_search_equals_generate(tmp_path, marian_tokenizer_files):
    from aiayn.search import search

    src_dir = _marian_dir(tmp_path, marian_tokenizer_files, seed=3)
    hf = transformers.MarianMTModel.from_pretrained(src_dir).eval()
    ckpt = load_checkpoint(import_marian(src_dir, tmp_path / "ck"))
    vocab = marian_tokenizer_files[1]
    order, pad = _renumbering(ckpt, vocab), len(vocab) - 1
    back = {ours: m for m, ours in order.items()}
    g = torch.Generator().manual_seed(5)
    for length in (4, 9):
        src = torch.randint(1, pad, (2, length), generator=g)
        src[:, -1] = 0
        n = 12
        with torch.no_grad():
            hf_out = hf.generate(input_ids=src, num_beams=1, do_sample=False, max_new_tokens=n,
                                 forced_eos_token_id=None, bad_words_ids=[[pad]], min_new_tokens=0)
        ours_src = torch.tensor([_ours(row, order) for row in src.tolist()])
        hyps = search(ckpt.model, ours_src, SearchConfig(beam=1, max_len_a=0.0, max_len_b=n))
        for row, (best, *_) in zip(hf_out.tolist(), hyps):
            expected = [t for t in row[1:] if t != pad]  # generate's start token and padding
            got = [back[t] for t in best.tokens]
            if expected and expected[-1] == 0:
                expected = expected[:-1]  # </s>: aiayn's tokens leave out the EOS
            assert got == expected


def test_the_tokenizer_gives_marian_tokenizers_ids(tmp_path, marian_tokenizer_files):
    src_dir = _marian_dir(tmp_path, marian_tokenizer_files)
    hf_tok = transformers.MarianTokenizer(source_spm=str(src_dir / "source.spm"),
                                          target_spm=str(src_dir / "target.spm"), vocab=str(src_dir / "vocab.json"))
    ckpt = load_checkpoint(import_marian(src_dir, tmp_path / "ck"))
    tok, vocab = ckpt.tokenizer, marian_tokenizer_files[1]
    back = {ours: m for m, ours in _renumbering(ckpt, vocab).items()}
    for en, de in zip(ENGLISH + ["unseen: Zürich ß ø", ">>deu<< a language token first"], GERMAN + ["Ωμέγα", "x"]):
        assert [back[i] for i in tok.encode(en) + [tok.eos_id]] == hf_tok(en)["input_ids"]
        assert [back[i] for i in tok.encode(de, "tgt") + [tok.eos_id]] == hf_tok(text_target=de)["input_ids"]
        ids = hf_tok(text_target=de)["input_ids"]
        ours = tok.decode([_renumbering(ckpt, vocab)[i] for i in ids])
        if vocab["<unk>"] in ids:  # aiayn shows an unknown piece as sentencepiece does; HF drops it
            assert "⁇" in ours
        else:
            assert ours == hf_tok.decode(ids, skip_special_tokens=True, use_source_tokenizer=False) == de
    batch = tok.encode_batch(ENGLISH)
    assert batch == [tok.encode(s) for s in ENGLISH]


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path, marian_tokenizer_files, monkeypatch):
    src_dir = _marian_dir(tmp_path, marian_tokenizer_files, safetensors=False)
    assert (src_dir / "pytorch_model.bin").is_file() and not (src_dir / "model.safetensors").exists()
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    ckpt = load_checkpoint(import_marian(src_dir, tmp_path / "ck"))
    assert seen == [True]
    hf = transformers.MarianMTModel.from_pretrained(src_dir).eval()
    torch.testing.assert_close(ckpt.model.encoder.layers[1].ffn.w2.weight, hf.model.encoder.layers[1].fc2.weight)


def test_import_of_an_aiayn_export_gives_back_the_same_model(tmp_path, random_checkpoint):
    from aiayn.checkpoint import save_checkpoint
    from aiayn.export import export_checkpoint
    from aiayn.model import Transformer, TransformerConfig

    torch.manual_seed(2)
    vocab = load_checkpoint(random_checkpoint).tokenizer.vocab_size
    model = Transformer(TransformerConfig(src_vocab_size=vocab, d_model=32, d_ff=64, n_heads=4, n_encoder_layers=2,
                                          n_decoder_layers=2, max_positions=64))  # the paper's model, small
    saved = save_checkpoint(tmp_path / "orig", model, random_checkpoint / "spm.model", {"step": 0})
    original = load_checkpoint(saved)
    exported = export_checkpoint(saved, tmp_path / "hf")
    back = load_checkpoint(import_marian(exported, tmp_path / "back"))
    assert back.model.config == original.model.config
    assert back.tokenizer.sha256 == original.tokenizer.sha256  # the joint model itself again
    theirs, ours = original.model.state_dict(), back.model.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=name)
    from aiayn.translator import Translator

    lines = ["the cat sat", "a dog ran far away", "on the mat"]
    search = SearchConfig(beam=2, max_len_a=0.0, max_len_b=8)
    expected = Translator(original, search=search, prepack=False).translate(lines)
    assert Translator(back, search=search, prepack=False).translate(lines) == expected
    # Not recognised as an export (its pad renamed): the general path renumbers the vocabulary and
    # carries the folded start embedding (the decoder's position-0 row) into aiayn's <s> row.
    vocab = json.loads((exported / "vocab.json").read_text())
    vocab["<was_pad>"] = vocab.pop("<aiayn_pad>")
    (exported / "vocab.json").write_text(json.dumps(vocab))
    renumbered = load_checkpoint(import_marian(exported, tmp_path / "renumbered"))
    assert renumbered.model.config.src_vocab_size == original.model.config.src_vocab_size + 2  # + pad, + zero row
    torch.testing.assert_close(renumbered.model.src_embed.token.weight[2], original.model.src_embed.token.weight[2],
                               atol=1e-5, rtol=0)
    # Original id k is renumbered id: 0 -> 4 (<was_pad>), 1 -> 1, 2 -> 5 (the old <s>), 3 -> 3, k >= 4 -> k + 2.
    vocab_size = original.model.config.src_vocab_size
    moved = [4, 1, 5, 3] + [k + 2 for k in range(4, vocab_size)]
    src, tgt = torch.tensor([[7, 9, 11, 13, 3]]), torch.tensor([[2, 8, 10, 12]])
    with torch.no_grad():
        want = original.model(src, tgt)
        got = renumbered.model(torch.tensor([[moved[k] for k in src[0].tolist()]]),
                               torch.tensor([[2] + [moved[k] for k in tgt[0, 1:].tolist()]]))
    torch.testing.assert_close(got[..., torch.tensor(moved)], want, atol=1e-5, rtol=1e-5)
    assert vocab_size + 2 == renumbered.tokenizer.vocab_size


def test_an_imported_model_exports_and_imports_again(tmp_path, marian_tokenizer_files):
    from aiayn.export import export_checkpoint

    first = load_checkpoint(import_marian(_marian_dir(tmp_path, marian_tokenizer_files), tmp_path / "a"))
    again = load_checkpoint(import_marian(export_checkpoint(tmp_path / "a", tmp_path / "hf"), tmp_path / "b"))
    assert again.model.config == first.model.config and again.tokenizer.vocab == first.tokenizer.vocab
    src = torch.tensor([[first.tokenizer.vocab[p] for p in first.tokenizer.pieces(range(5, 12))] + [3]])
    with torch.no_grad():
        tgt = torch.tensor([[2, 6, 7, 8]])
        torch.testing.assert_close(again.model(src, tgt), first.model(src, tgt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value,words", [
    ("normalize_before", True, "post-LN"),
    ("scale_embedding", False, "√d_model"),
    ("activation_function", "tanh", "supported"),
    ("decoder_ffn_dim", 64, "one d_ff"),
    ("model_type", "bart", "only Marian"),
])
def test_unsupported_settings_are_one_line_errors(tmp_path, marian_tokenizer_files, capsys, field, value, words):
    src_dir = _marian_dir(tmp_path, marian_tokenizer_files)
    config = json.loads((src_dir / "config.json").read_text())
    config[field] = value
    (src_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' own output while saving
    assert main(["import", "--marian", str(src_dir), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aiayn: error: {src_dir / 'config.json'}: field {field!r}") and words in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ck").exists()


def test_the_imported_checkpoint_translates_from_the_command_line(tmp_path, marian_tokenizer_files, capsys):
    src_dir = _marian_dir(tmp_path, marian_tokenizer_files)
    assert main(["import", "--marian", str(src_dir), "--out", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    text = tmp_path / "in.en"
    text.write_text("\n".join(ENGLISH[:3]) + "\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(tmp_path / "ck"), "--input", str(text), "--beam", "2",
                 "--max-len-a", "0", "--max-len-b", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(UserError, match="Marian model directory"):
        import_marian(tmp_path / "nope", tmp_path / "x")


def test_an_imported_model_fine_tunes_on_data_prepared_with_its_tokenizer(tmp_path, marian_tokenizer_files, capsys):
    """The Marian pair runs through prepare (--tokenizer-from), training (--init) and translation."""
    from aiayn.data import load_dataset

    ck = import_marian(_marian_dir(tmp_path, marian_tokenizer_files), tmp_path / "ck")
    rng = random.Random(0)
    pairs = [(f"{e} {rng.randint(0, 999)}", f"{g} {rng.randint(0, 999)}") for _ in range(12)
             for e, g in zip(ENGLISH, GERMAN)]
    (tmp_path / "ft.en").write_text("".join(e + "\n" for e, _ in pairs), encoding="utf-8")
    (tmp_path / "ft.de").write_text("".join(g + "\n" for _, g in pairs), encoding="utf-8")
    data = tmp_path / "data"
    assert main(["prepare", "--src", str(tmp_path / "ft.en"), "--tgt", str(tmp_path / "ft.de"), "--tokenizer-from",
                 str(ck), "--out", str(data), "--valid-size", "10", "--test-size", "10"]) == 0
    dataset = load_dataset(data)
    tok = load_checkpoint(ck).tokenizer
    assert dataset.tokenizer.sha256 == tok.sha256 and (data / "source.spm").is_file()
    first = dataset.raw("train", "tgt")[0]
    assert dataset.split("train").tgt[0].tolist() == tok.encode(first, "tgt")  # the target side's model
    assert main(["train", "--config", "finetune", "--init", str(ck), "--data", str(data), "--out", str(tmp_path / "ft"),
                 "train.max_updates=2", "train.max_minutes=0", "train.progress=false", "train.precision=fp32",
                 "train.valid_bleu_sentences=4"]) == 0
    tuned = load_checkpoint(tmp_path / "ft" / "last")
    assert tuned.model.config.logits_bias and tuned.tokenizer.sha256 == tok.sha256
    torch.testing.assert_close(tuned.model.generator.bias, load_checkpoint(ck).model.generator.bias)  # fixed


@pytest.fixture(scope="module")
def separate_vocabularies(marian_tokenizer_files) -> tuple[Path, dict[str, int], dict[str, int]]:
    """Marian's separate vocabularies: vocab.json over source.spm's pieces, target_vocab.json over
    target.spm's ("</s>" 0, "<unk>" 1, "<pad>" 2 in both, as the pad id is one for both sides)."""
    import sentencepiece as spm

    files = marian_tokenizer_files[0]

    def vocab(model: Path) -> dict[str, int]:
        sp = spm.SentencePieceProcessor(model_file=str(model))
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
        return {piece: i for i, piece in enumerate(["</s>", "<unk>", "<pad>", *pieces])}

    return files, vocab(files / "source.model"), vocab(files / "target.model")


@pytest.mark.parametrize("tied", [True, False])
def test_separate_vocabularies_and_untied_output_layers(tmp_path, separate_vocabularies, tied):
    files, src_vocab, tgt_vocab = separate_vocabularies
    assert len(src_vocab) != len(tgt_vocab)
    torch.manual_seed(4)
    config = transformers.MarianConfig(
        vocab_size=len(src_vocab), decoder_vocab_size=len(tgt_vocab), share_encoder_decoder_embeddings=False,
        tie_word_embeddings=tied, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, activation_function="swish",
        max_position_embeddings=64, pad_token_id=2, eos_token_id=0, decoder_start_token_id=2, scale_embedding=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.normal_(0.0, 0.3)
        model.final_logits_bias.normal_()
    src_dir = tmp_path / "marian"
    model.save_pretrained(src_dir)
    (src_dir / "vocab.json").write_text(json.dumps(src_vocab, ensure_ascii=False), encoding="utf-8")
    (src_dir / "target_vocab.json").write_text(json.dumps(tgt_vocab, ensure_ascii=False), encoding="utf-8")
    (src_dir / "source.spm").write_bytes((files / "source.model").read_bytes())
    (src_dir / "target.spm").write_bytes((files / "target.model").read_bytes())
    (src_dir / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": True}))
    hf = transformers.MarianMTModel.from_pretrained(src_dir).eval()
    ckpt = load_checkpoint(import_marian(src_dir, tmp_path / "ck"))
    cfg, tok = ckpt.model.config, ckpt.tokenizer
    assert (cfg.src_vocab_size, cfg.tgt_vocab_size) == (len(src_vocab) + 1, len(tgt_vocab) + 1)
    assert cfg.tie_embeddings == ("decoder" if tied else "none")

    names = {"</s>": "</s>", "<unk>": "<unk>", "<pad>": "<s>"}
    src_order = {i: tok.vocab[names.get(p, p)] for p, i in src_vocab.items() if p != "<pad>"}
    tgt_order = {i: tok.target_vocab[names.get(p, p)] for p, i in tgt_vocab.items()}
    hf_tok = transformers.MarianTokenizer(source_spm=str(src_dir / "source.spm"), target_spm=str(src_dir / "target.spm"),
                                          vocab=str(src_dir / "vocab.json"),
                                          target_vocab_file=str(src_dir / "target_vocab.json"), separate_vocabs=True)
    for en, de in zip(ENGLISH, GERMAN):
        assert [src_order[i] for i in hf_tok(en)["input_ids"]] == tok.encode(en) + [tok.eos_id]
        assert [tgt_order[i] for i in hf_tok(text_target=de)["input_ids"]] == tok.encode(de, "tgt") + [tok.eos_id]
    src_ids, tgt_ids = hf_tok(ENGLISH[:2], padding=True, return_tensors="pt"), hf_tok(text_target=GERMAN[:2])["input_ids"]
    length = min(map(len, tgt_ids))
    decoder_in = torch.tensor([[2] + row[: length - 1] for row in tgt_ids])
    with torch.no_grad():
        expected = hf(**src_ids, decoder_input_ids=decoder_in).logits
        ours_src = torch.tensor([[src_order[i] if m else 0 for i, m in zip(row, mask)]
                                 for row, mask in zip(src_ids["input_ids"].tolist(), src_ids["attention_mask"].tolist())])
        ours_in = torch.tensor([[tgt_order[i] for i in row] for row in decoder_in.tolist()])
        got = ckpt.model(ours_src, ours_in)
    perm = torch.tensor([tgt_order[i] for i in range(len(tgt_vocab))])
    torch.testing.assert_close(got[..., perm], expected, atol=1e-5, rtol=1e-5)
    assert tok.decode(tok.encode(GERMAN[0], "tgt")) == GERMAN[0]
    if tied:  # and through prepare, fine-tuning and translation, with both maps
        pairs = [(f"{e} {k}", f"{g} {k}") for k in range(12) for e, g in zip(ENGLISH, GERMAN)]
        (tmp_path / "ft.en").write_text("".join(e + "\n" for e, _ in pairs), encoding="utf-8")
        (tmp_path / "ft.de").write_text("".join(g + "\n" for _, g in pairs), encoding="utf-8")
        data = tmp_path / "data"
        assert main(["prepare", "--src", str(tmp_path / "ft.en"), "--tgt", str(tmp_path / "ft.de"), "--tokenizer-from",
                     str(tmp_path / "ck"), "--out", str(data), "--valid-size", "10", "--test-size", "10"]) == 0
        assert (data / "target_vocab.json").is_file()
        assert main(["train", "--config", "finetune", "--init", str(tmp_path / "ck"), "--data", str(data), "--out",
                     str(tmp_path / "ft"), "train.max_updates=1", "train.max_minutes=0", "train.progress=false",
                     "train.precision=fp32", "train.valid_bleu_sentences=4"]) == 0
        tuned = load_checkpoint(tmp_path / "ft" / "last")
        assert (tuned.model.config.src_vocab_size, tuned.model.config.tgt_vocab_size) == (
            cfg.src_vocab_size, cfg.tgt_vocab_size)
        text = tmp_path / "in.en"
        text.write_text(ENGLISH[0] + "\n", encoding="utf-8")
        assert main(["translate", "--checkpoint", str(tmp_path / "ft" / "last"), "--input", str(text),
                     "--beam", "2", "--max-len-a", "0", "--max-len-b", "5"]) == 0
