"""`aiayn attention`: every layer and head of the three kinds, as PNG grids and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from aiayn.attention import attention_maps, export_attention
from aiayn.checkpoint import load_checkpoint
from aiayn.cli import main


def test_attention_export_writes_pictures_and_json(copy_checkpoint, tmp_path):
    ckpt = load_checkpoint(copy_checkpoint)
    cfg = ckpt.model.config
    sentence = "a b c d e f g"
    out = tmp_path / "attn"
    paths = export_attention(ckpt, sentence, out)
    assert sorted(p.name for p in paths) == ["attention.json", "cross.png", "cross_mean.png", "decoder.png", "encoder.png"]
    for path in paths:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "attention.json").read_text())
    n_src, n_tgt = len(doc["src_tokens"]), len(doc["tgt_tokens"])
    assert doc["src_tokens"][-1] == "</s>" and doc["tgt_inputs"][0] == "<s>"
    for kind, (rows, cols) in {"encoder": (n_src, n_src), "decoder": (n_tgt, n_tgt), "cross": (n_tgt, n_src)}.items():
        weights = torch.tensor(doc["weights"][kind])
        assert weights.shape == (cfg.n_encoder_layers if kind == "encoder" else cfg.n_decoder_layers, cfg.n_heads, rows, cols)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-4, rtol=0)
        assert len(doc["rows"][kind]) == rows and len(doc["columns"][kind]) == cols
    # never replaced silently
    with pytest.raises(Exception, match="--force"):
        export_attention(ckpt, sentence, out)
    export_attention(ckpt, sentence, out, force=True)


def test_copy_model_cross_attention_shows_the_alignment(copy_checkpoint, copy_dataset):
    """A model that copies must look, when writing token i, at source token i: in some layer
    the heads' mean cross-attention peaks on the diagonal for nearly every output token."""
    ckpt = load_checkpoint(copy_checkpoint)
    from aiayn.data import load_dataset

    # A valid sentence: the copy fixture checked that beam search copies every one of them.
    sentence = next(s for s in load_dataset(copy_dataset).raw("valid", "src") if 8 <= len(s.split()) <= 12)
    maps = attention_maps(ckpt, sentence)
    assert len(maps.tgt_tokens) == len(maps.src_tokens)  # it copied
    n = len(maps.src_tokens)
    best = max(
        float((layer.mean(0).argmax(-1) == torch.arange(n)).float().mean()) for layer in maps.weights["cross"]
    )
    assert best >= 0.8


def test_attention_command_with_a_given_target(copy_checkpoint, tmp_path, capsys):
    out = tmp_path / "given"
    assert main(["attention", "--checkpoint", str(copy_checkpoint), "--src", "a b c", "--tgt", "a b", "--out", str(out)]) == 0
    doc = json.loads((out / "attention.json").read_text())
    assert len(doc["weights"]["cross"][0][0]) == len(doc["tgt_tokens"])
    assert "attention.json" in capsys.readouterr().out


@pytest.mark.parametrize("side", ["--src", "--tgt"])
def test_a_sentence_longer_than_the_learned_positions_is_one_line(random_checkpoint, tmp_path, capsys, side):
    """random_checkpoint has learned positions for 64 tokens: a longer source or target is a
    user's error (one line, exit 2), not an index error in the embedding."""
    long = " ".join(["the cat sat on the mat"] * 20)
    sentences = ["--src", long] if side == "--src" else ["--src", "a dog", "--tgt", long]
    argv = ["attention", "--checkpoint", str(random_checkpoint), "--out", str(tmp_path / "out"), *sentences]
    assert main(argv) == 2
    err = capsys.readouterr().err
    side_name = "source" if side == "--src" else "target"
    assert len(err.splitlines()) == 1
    assert err.startswith(f"aiayn: error: the {side_name} has ") and err.endswith("subwords; this model reads at most 63\n")
    assert not (tmp_path / "out").exists()
