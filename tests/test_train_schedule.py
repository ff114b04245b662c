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


def test_budget_progress_is_the_larger_fraction_spent_before_the_update():
    from aiayn.train.schedule import budget_progress

    assert budget_progress(1, 100) == 0.0
    assert budget_progress(51, 100) == 0.5
    assert budget_progress(100, 100) == pytest.approx(0.99)  # the last update still has a rate
    assert budget_progress(11, 100, elapsed_s=30.0, max_minutes=1.0) == 0.5  # the clock is ahead
    assert budget_progress(91, 100, elapsed_s=30.0, max_minutes=1.0) == 0.9  # the updates are ahead
    assert budget_progress(11, 100, elapsed_s=30.0) == 0.1  # no wall-clock budget: updates only
    with pytest.raises(ValueError):
        budget_progress(0, 100)


def test_cooldown_factor_is_one_then_falls_linearly_to_zero():
    from aiayn.train.schedule import cooldown_factor

    assert cooldown_factor(0.9, 0.0) == 1.0  # off
    assert cooldown_factor(0.0, 0.25) == 1.0
    assert cooldown_factor(0.75, 0.25) == 1.0  # where the cool-down begins
    assert cooldown_factor(0.875, 0.25) == pytest.approx(0.5)
    assert cooldown_factor(0.99, 0.25) == pytest.approx(0.04)
    assert cooldown_factor(1.0, 0.25) == 0.0
    assert cooldown_factor(1.2, 0.25) == 0.0  # past the budget (a last update after it): never negative
    assert cooldown_factor(0.5, 1.0) == pytest.approx(0.5)  # the whole run: linear from the start
