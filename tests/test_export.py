"""The Marian export computes the same function as the aiayn model it came from.

Needs the `bench` extra (transformers; ctranslate2 for the last test); skipped without it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from aiayn.errors import UserError
from aiayn.export import export_marian
from aiayn.model import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

V = 90  # model rows; the subword model below has fewer pieces, the rest are named <unused_N>
PAD, BOS, EOS = 0, 2, 3


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))) for _ in range(200)]
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(d / "text.txt"), model_prefix=str(d / "sp"), vocab_size=50, model_type="bpe",
        pad_id=PAD, unk_id=1, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False, minloglevel=2,
    )
    return d / "sp.model"


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(src_vocab_size=V, d_model=32, d_ff=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    fields.update(overrides)
    return Transformer(TransformerConfig(**fields)).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sources of different lengths (the second padded) and decoder inputs starting with <s>."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (2, 7), generator=g)
    src[:, -1] = EOS
    src[1, 4] = EOS
    src[1, 5:] = PAD
    tgt = torch.randint(4, V, (2, 6), generator=g)
    tgt[:, 0] = BOS
    return src, tgt


def to_marian(src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our ids -> the exported model's: pad and decoder start are the appended id V."""
    mask = src.ne(PAD)
    decoder_in = tgt.clone()
    decoder_in[:, 0] = V
    return src.masked_fill(~mask, V), mask.long(), decoder_in


def our_greedy(model: Transformer, src: torch.Tensor, steps: int) -> torch.Tensor:
    """Plain greedy decoding over the full prefix (no cache): exactly `steps` tokens, </s> barred
    (as min_new_tokens / min_decoding_length do in the peers)."""
    memory, mask = model.encode(src), src.ne(PAD)
    ys = torch.full((src.size(0), 1), BOS)
    for _ in range(steps):
        logits = model.generator(model.decode(ys, memory, mask)[:, -1])
        logits[:, EOS] = float("-inf")
        ys = torch.cat([ys, logits.argmax(-1, keepdim=True)], dim=1)
    return ys[:, 1:]


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_logits_match_marian(tmp_path, spm_file, positions):
    model = tiny_model(positions=positions, max_positions=64)
    with torch.no_grad():  # make every parameter matter: biases and norms are not at their init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_marian(model, tmp_path / "hf", spm_file)
    hf = transformers.MarianMTModel.from_pretrained(str(out)).eval()
    src, tgt = batch()
    ids, attention_mask, decoder_in = to_marian(src, tgt)
    with torch.no_grad():
        ours = model(src, tgt)
        theirs = hf(input_ids=ids, attention_mask=attention_mask, decoder_input_ids=decoder_in).logits
    assert theirs.shape == (2, 6, V + 1)
    torch.testing.assert_close(theirs[..., :V], ours, rtol=1e-4, atol=1e-4)
    assert (theirs[..., V] < -1e30).all()  # the appended pad row is never a candidate

    gen = hf.generate(input_ids=ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                      max_new_tokens=8, min_new_tokens=8)
    assert gen[:, 0].eq(V).all()
    assert torch.equal(gen[:, 1:], our_greedy(model, src, 8))


def test_vocabulary_and_config(tmp_path, spm_file):
    out = export_marian(tiny_model(), tmp_path / "hf", spm_file)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == V + 1 and sorted(vocab.values()) == list(range(V + 1))
    assert vocab["<pad>"] == V and vocab["</s>"] == EOS and vocab["<unk>"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == config["decoder_start_token_id"] == V
    tok = transformers.MarianTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id == V and tok.eos_token_id == EOS


def test_refuses_what_marian_cannot_express(tmp_path, spm_file):
    with pytest.raises(UserError, match="pre-LN"):
        export_marian(tiny_model(norm_first=True), tmp_path / "a", spm_file)
    with pytest.raises(UserError, match="d_k"):
        export_marian(tiny_model(d_k=4), tmp_path / "b", spm_file)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_does_not_overwrite_without_force(tmp_path, spm_file):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("user data")
    for force in (False, True):  # not an export: --force does not replace it either
        with pytest.raises(UserError, match="--force replaces only an aiayn Marian export"):
            export_marian(tiny_model(), tmp_path / "hf", spm_file, force=force)
    assert (tmp_path / "hf" / "keep.txt").read_text() == "user data"
    export_marian(tiny_model(), tmp_path / "hf2", spm_file)
    with pytest.raises(UserError, match="--force"):
        export_marian(tiny_model(), tmp_path / "hf2", spm_file)
    export_marian(tiny_model(), tmp_path / "hf2", spm_file, force=True)


def test_ctranslate2_stock_converter_gives_the_same_greedy_output(tmp_path, spm_file):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    model = tiny_model()
    out = export_marian(model, tmp_path / "hf", spm_file)
    TransformersConverter(str(out)).convert(str(tmp_path / "ct2"))
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", inter_threads=1, intra_threads=1)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    piece = {i: p for p, i in vocab.items()}
    src, _ = batch()
    tokens = [[piece[int(i)] for i in row if int(i) != PAD] for row in src]
    results = translator.translate_batch(tokens, beam_size=1, max_decoding_length=8, min_decoding_length=8)
    expected = our_greedy(model, src, 8)
    for result, row in zip(results, expected):
        assert result.hypotheses[0] == [piece[int(i)] for i in row]
