"""Residual dropout (§5.4) for training on the CPU: the same function as ``nn.Dropout``, drawn faster.

`aiayn.model` uses ``nn.Dropout``; the trainer swaps each one for a `FastDropout`
(`use_fast_dropout`). Each element is zeroed with probability p and the others are scaled by
1/(1-p), so the expected value is unchanged. On the CPU the keep-mask is drawn as 16-bit uniform
integers, four from each 64-bit draw of torch's default generator, instead of torch's
per-element Bernoulli draw, which took a large share of a small model's forward pass
(benchmarks/RESULTS.md). An element is dropped when its integer is among the lowest
round(p·2¹⁶), so the rate is round(p·65536)/65536: 0.1 becomes 0.100006. Seeding and exact
resume work as with ``nn.Dropout`` (the same generator). On GPUs torch's own fused kernel runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FastDropout(nn.Module):
    """Dropout with rate ``p`` in training mode; the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._threshold = -(1 << 15) + round(p * (1 << 16))  # int16 values below it are dropped

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
        bits = draws.view(torch.int16)[:n].view(x.shape)
        keep = bits.ge(self._threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Dropout`` replaced, in place, by a `FastDropout` of the same rate."""
    for name, child in model.named_children():
        if type(child) is nn.Dropout:
            setattr(model, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return model
