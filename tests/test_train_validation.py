"""Validation during training (aiayn.train.validation)."""

from __future__ import annotations

import math

import pytest
import torch

from aiayn.data import load_dataset
from aiayn.model import Transformer, TransformerConfig


def test_validation_truncates_long_sentences_for_learned_positions(copy_dataset):
    """Copy-task sentences have up to 20 subwords; 12 learned positions hold 11 plus EOS/BOS.
    Validation truncates them as Translator does instead of indexing past the table."""
    from aiayn.train.validation import greedy_translate, validate

    valid = load_dataset(copy_dataset).split("valid")
    assert valid.src_lens.max() > 11
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab_size=45, d_model=32, d_ff=64, n_heads=2, n_encoder_layers=1,
                                          n_decoder_layers=1, positions="learned", max_positions=12))
    result = validate(model, load_dataset(copy_dataset), label_smoothing=0.1, batch_tokens=2000, bleu_sentences=20)
    assert math.isfinite(result.loss) and result.bleu is not None and result.n_sentences == 20
    batch = valid.collate(range(len(valid)), 11)
    assert batch.src.size(1) == batch.tgt_in.size(1) == 12 and batch.src[:, -1].eq(3).any()
    hyps = greedy_translate(model, load_dataset(copy_dataset), "valid", 20, 2000, 1.0, 50, "fp32", torch.device("cpu"))
    assert len(hyps) == 20


def test_a_lowercasing_model_is_validated_by_lowercased_bleu(tmp_path, monkeypatch):
    """Data prepared with --lowercase trains a model that writes lowercase: validation scores it
    with sacreBLEU's lowercased BLEU, so lowercased output of upper-case references is 100."""
    from aiayn.cli import main
    from aiayn.train import validation

    words = "the a house cat sees runs big small red green".split()
    src = [" ".join(words[(i + k) % 10] for k in range(2 + i % 7)) + f" {i}" for i in range(300)]
    (tmp_path / "t.en").write_text("\n".join(src) + "\n")
    (tmp_path / "t.de").write_text("\n".join(s.upper() for s in src) + "\n")
    out = tmp_path / "lc"
    assert main(["prepare", "--src", str(tmp_path / "t.en"), "--tgt", str(tmp_path / "t.de"), "--out", str(out),
                 "--valid-size", "20", "--test-size", "20", "--vocab-size", "120", "--lowercase"]) == 0
    data = load_dataset(out)
    refs = data.raw("valid", "tgt")
    monkeypatch.setattr(validation, "greedy_translate", lambda model, data, split, n, *rest: [r.lower() for r in refs[:n]])
    model = Transformer(TransformerConfig(src_vocab_size=data.tokenizer.vocab_size, d_model=16, d_ff=32, n_heads=2,
                                          n_encoder_layers=1, n_decoder_layers=1))
    result = validation.validate(model, data, label_smoothing=0.1, batch_tokens=2000, bleu_sentences=20)
    assert result.bleu == pytest.approx(100.0)  # cased BLEU would be 0: every reference is upper case
