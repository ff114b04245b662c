"""Validation during training (aiayn.train.validation)."""

from __future__ import annotations

import math

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
