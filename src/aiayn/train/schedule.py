"""The learning-rate schedule of §5.3 ("Optimizer"):

    lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)

It rises linearly for the first ``warmup_steps`` updates and then decays with the inverse
square root of the step; the two branches meet at step = warmup, where the rate peaks at
factor · (d_model · warmup)^-0.5. The paper uses factor 1 and warmup 4000. ``step`` counts
optimizer updates from 1 (not micro-batches: with gradient accumulation the schedule still
moves once per update).

Not in the paper, off by default: a **cool-down** (``train.cooldown``). The inverse square root
never reaches zero, so a run stopped by its budget ends at a sizeable rate (step 16·warmup
still has a quarter of the peak). With ``cooldown = c > 0`` the paper's rate is multiplied by

    min(1, (1 - progress) / c)

so it follows §5.3 until the last fraction c of the budget and then falls linearly to zero at
its end (the "warmup-stable-decay" form: Zhai et al., 2022; Hägele et al., 2024). ``progress``
is the larger of the two budgets' fractions spent before the update: (step - 1) / max_updates
and, under a wall-clock budget, elapsed seconds / (max_minutes · 60). The last update of a run
therefore still has a small positive rate. Other stops (max_epochs, patience, Ctrl-C) do not
enter it.
"""

from __future__ import annotations


def inverse_sqrt_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The learning rate of update number ``step`` (1-based)."""
    if step < 1:
        raise ValueError("the schedule counts updates from 1")
    if warmup < 1:
        raise ValueError("warmup must be at least 1 update")
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def budget_progress(step: int, max_updates: int, elapsed_s: float = 0.0, max_minutes: float = 0.0) -> float:
    """The fraction of the run's budget spent before update ``step`` (1-based): the larger of
    (step - 1) / max_updates and, when max_minutes > 0, elapsed_s / (max_minutes · 60)."""
    if step < 1:
        raise ValueError("the schedule counts updates from 1")
    progress = (step - 1) / max_updates
    if max_minutes > 0:
        progress = max(progress, elapsed_s / (max_minutes * 60.0))
    return progress


def cooldown_factor(progress: float, cooldown: float) -> float:
    """min(1, (1 - progress) / cooldown), clamped at 0; 1 when ``cooldown`` is 0 (off)."""
    if cooldown <= 0:
        return 1.0
    return max(0.0, min(1.0, (1.0 - progress) / cooldown))
