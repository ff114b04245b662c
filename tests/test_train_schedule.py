"""The learning-rate schedule of §5.3 (aiayn.train.schedule)."""

from __future__ import annotations

import pytest

from aiayn.train import inverse_sqrt_lr


def test_schedule_values_at_known_steps():
    # lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), d_model 512, warmup 4000 (§5.3)
    assert inverse_sqrt_lr(1, 512, 4000) == pytest.approx(512**-0.5 * 4000**-1.5, rel=1e-12)
    assert inverse_sqrt_lr(1, 512, 4000) == pytest.approx(1.746928e-07, rel=1e-6)
    assert inverse_sqrt_lr(4000, 512, 4000) == pytest.approx(6.987712e-04, rel=1e-6)  # the peak
    assert inverse_sqrt_lr(16000, 512, 4000) == pytest.approx(6.987712e-04 / 2, rel=1e-6)  # 1/sqrt decay
    assert inverse_sqrt_lr(2000, 512, 4000) == pytest.approx(6.987712e-04 / 2, rel=1e-6)  # linear warmup
    assert inverse_sqrt_lr(100, 256, 50, factor=2.0) == pytest.approx(2 * 256**-0.5 * 100**-0.5)
    peak = max(range(1, 10001), key=lambda s: inverse_sqrt_lr(s, 512, 4000))
    assert peak == 4000
    with pytest.raises(ValueError):
        inverse_sqrt_lr(0, 512, 4000)
