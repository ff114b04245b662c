"""The CPU-fast residual dropout of training (aiayn.train.dropout)."""

from __future__ import annotations

import torch
from torch import nn

from aiayn.train.dropout import FastDropout, use_fast_dropout

from helpers import small_model


def test_dropout_rate_scaling_gradient_and_seeding():
    """FastDropout (§5.4): rate p, survivors scaled by 1/(1-p), identity in eval mode, gradient =
    the same mask, reproducible from the seed; every 16-bit lane of the draws is uniform."""
    p = 0.1
    drop = FastDropout(p)
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of 4: the tail is used too
    torch.manual_seed(0)
    y = drop(x)
    kept = y.detach() != 0
    assert abs(1 - kept.float().mean().item() - p) < 3e-3  # ~10 standard deviations
    for lane in range(4):  # the four 16-bit lanes of each 64-bit draw
        assert abs(1 - kept[lane::4].float().mean().item() - p) < 6e-3
    assert torch.allclose(y.detach()[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    y.backward(torch.full_like(x, 2.0))
    assert torch.equal(x.grad, 2.0 * y.detach())  # dropped where y is, scaled the same
    torch.manual_seed(0)
    assert torch.equal(drop(x).detach(), y.detach())
    assert drop.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x


def test_use_fast_dropout_replaces_every_dropout_of_the_model():
    model = small_model(dropout=0.3)
    plain = [m for m in model.modules() if type(m) is nn.Dropout]
    assert plain and all(m.p == 0.3 for m in plain)
    use_fast_dropout(model)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    fast = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(fast) == len(plain) and all(m.p == 0.3 for m in fast)
    src, tgt = torch.randint(4, 40, (2, 5)), torch.randint(4, 40, (2, 4))
    before = small_model(dropout=0.3)(src, tgt)
    torch.testing.assert_close(model.eval()(src, tgt), before)  # the same function in eval mode
