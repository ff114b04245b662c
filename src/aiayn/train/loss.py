"""Label-smoothed cross-entropy (paper §5.4, "Label Smoothing": ε_ls = 0.1).

How the smoothing mass is spread. For a target token y the training distribution q is

    q(y)  = 1 - ε
    q(k)  = ε / (V - 2)   for every k ∉ {y, pad}
    q(pad) = 0

i.e. the mass ε is shared uniformly by every class except the correct one and padding:
padding is never a token the model should produce, so it gets no probability (the choice of
the Annotated Transformer; tensor2tensor spreads ε/(V-1) over all other classes, pad included).
The loss of one position is the cross-entropy H(q, p) = -Σ_k q(k) log p(k), which splits into

    H(q, p) = (1 - ε) · NLL  +  ε/(V - 2) · Σ_{k ∉ {y, pad}} -log p(k)

where NLL = -log p(y). Positions whose *target* is padding contribute nothing. We report the
smoothed loss H and, separately, the NLL part, whose exp is the perplexity (natural log).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossSums:
    """Sums over the real (non-pad) target tokens of a batch; divide by ``n_tokens`` to average."""

    loss: Tensor  # Σ H(q, p), differentiable
    nll: Tensor  # Σ -log p(y), detached
    n_tokens: int
    n_correct: int  # argmax == target, for token accuracy


def label_smoothed_loss(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> LossSums:
    """Summed label-smoothed cross-entropy of ``logits`` (..., V) against ``target`` (...).

    Computed in fp32 whatever the autocast precision: log-softmax over a large vocabulary in
    fp16/bf16 loses the small probabilities the smoothing term depends on.
    """
    vocab = logits.size(-1)
    if vocab < 3 and epsilon > 0:
        raise ValueError("label smoothing needs a vocabulary of at least 3 classes")
    lprobs = F.log_softmax(logits.float(), dim=-1).reshape(-1, vocab)
    target = target.reshape(-1)
    keep = target.ne(pad_id)
    lprobs, target = lprobs[keep], target[keep]
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = nll
    if epsilon > 0:
        # Σ_{k ∉ {y, pad}} -log p(k) = -(Σ_k log p(k) - log p(y) - log p(pad))
        others = -(lprobs.sum(dim=1) + nll - lprobs[:, pad_id])
        loss = (1.0 - epsilon) * nll + (epsilon / (vocab - 2)) * others
    n_correct = int(lprobs.argmax(dim=1).eq(target).sum()) if target.numel() else 0
    return LossSums(loss=loss.sum(), nll=nll.detach().sum(), n_tokens=int(target.numel()), n_correct=n_correct)
