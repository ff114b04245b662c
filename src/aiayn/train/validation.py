"""Validation: the loss on the valid set, and BLEU of fast greedy translations of it.

The loss uses the training criterion (label-smoothed, and its NLL part) with dropout off.
Sentences longer than the model's positions are truncated as `aiayn.translator.Translator` does:
``max_positions - 1`` subwords, plus the EOS (source) or the BOS (target input). Learned
positions end there, and a held-out set is not length-filtered like the training data.
BLEU is sacreBLEU's corpus BLEU of greedy outputs, detokenized by the sentencepiece model,
against the raw valid references — the same text ``aiayn evaluate`` would score, so a best
checkpoint chosen here is chosen on the metric that is reported. A model whose tokenizer
lowercases (``aiayn prepare --lowercase``) writes lowercased text; its BLEU is sacreBLEU's
lowercased BLEU (``-lc``), the figure reported for such a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sacrebleu
import torch

from ..config import SearchConfig
from ..data import PreparedData, TokenBatchSampler
from ..model import Transformer
from ..search import greedy_search
from .step import Criterion, autocast


@dataclass
class ValidResult:
    loss: float
    nll: float
    ppl: float
    accuracy: float  # teacher-forced token accuracy (argmax = target), eos included
    bleu: float | None
    n_sentences: int

    def as_dict(self) -> dict:
        return {"loss": self.loss, "nll": self.nll, "ppl": self.ppl, "accuracy": self.accuracy,
                "bleu": self.bleu, "bleu_sentences": self.n_sentences}


@torch.no_grad()
def validate(model: Transformer, data: PreparedData, *, label_smoothing: float, batch_tokens: int,
             bleu_sentences: int = 0, max_len_a: float = 1.0, max_len_b: int = 50,
             precision: str = "fp32", device: torch.device = torch.device("cpu"),
             split: str = "valid") -> ValidResult:
    was_training = model.training
    model.eval()
    try:
        valid = data.split(split)
        criterion = Criterion(model, label_smoothing)
        limit = model.config.max_positions - 1
        loss_sum = nll_sum = 0.0
        n_tokens = n_correct = 0
        lens = np.minimum(valid.src_lens, limit), np.minimum(valid.tgt_lens, limit)
        for idx in TokenBatchSampler(*lens, batch_tokens, shuffle=False):
            batch = valid.collate(idx, limit).to(device)
            with autocast(precision, device):
                loss, nll, correct = criterion(batch)
            loss_sum += float(loss)
            nll_sum += float(nll)
            n_tokens += batch.n_tgt_tokens
            n_correct += int(correct)
        n_tokens = max(n_tokens, 1)
        n = len(valid) if bleu_sentences == 0 else min(bleu_sentences, len(valid))
        hyps = greedy_translate(model, data, split, n, batch_tokens, max_len_a, max_len_b, precision, device)
        refs = data.raw(split, "tgt")[:n]
        bleu = float(sacrebleu.corpus_bleu(hyps, [refs], lowercase=data.tokenizer.lowercases).score) if n else None
        nll = nll_sum / n_tokens
        return ValidResult(loss=loss_sum / n_tokens, nll=nll, ppl=math.exp(min(nll, 700.0)),
                           accuracy=n_correct / n_tokens, bleu=bleu, n_sentences=n)
    finally:
        model.train(was_training)


def greedy_translate(model: Transformer, data: PreparedData, split: str, n: int, batch_tokens: int,
                     max_len_a: float, max_len_b: int, precision: str, device: torch.device) -> list[str]:
    """Detokenized greedy translations of the first ``n`` sentences of a split, in order.
    Sentences are batched by length (little padding) and put back in their original order."""
    part = data.split(split)
    limit = model.config.max_positions - 1  # truncated as in `validate`
    lens = np.minimum(part.src_lens[:n], limit)
    out: list[str] = [""] * n
    # Source-side budget only: the outputs are not known yet.
    for idx in TokenBatchSampler(lens, lens, batch_tokens, shuffle=False):
        batch = part.collate(idx, limit).to(device)
        with autocast(precision, device):
            hyps = greedy_search(model, batch.src, SearchConfig(beam=1, max_len_a=max_len_a, max_len_b=max_len_b))
        for i, ids in zip(idx, hyps):
            out[i] = data.tokenizer.decode_line(ids)  # the text aiayn translate would print
    return out
