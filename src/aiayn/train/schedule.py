"""The learning-rate schedule of §5.3 ("Optimizer"):

    lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)

It rises linearly for the first ``warmup_steps`` updates and then decays with the inverse
square root of the step; the two branches meet at step = warmup, where the rate peaks at
factor · (d_model · warmup)^-0.5. The paper uses factor 1 and warmup 4000. ``step`` counts
optimizer updates from 1 (not micro-batches: with gradient accumulation the schedule still
moves once per update).
"""

from __future__ import annotations


def inverse_sqrt_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The learning rate of update number ``step`` (1-based)."""
    if step < 1:
        raise ValueError("the schedule counts updates from 1")
    if warmup < 1:
        raise ValueError("warmup must be at least 1 update")
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
