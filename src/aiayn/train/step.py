"""One optimizer update: forward and backward over the micro-batches, then one Adam step.

Normalisation. The loss of an update is the label-smoothed cross-entropy *summed* over every
real target token of the update — all ``update_freq`` micro-batches on all ranks — divided by
the number N of those tokens. So each micro-batch contributes ``loss_sum / N`` and gradient
accumulation over k micro-batches gives exactly the gradient of one batch k times the size.

Under DistributedDataParallel the gradients are *averaged* over the W ranks, i.e. multiplied
by 1/W. N is therefore all-reduced before the forward pass and every rank scales its loss by
W / N: the average of W such gradients is Σ_ranks ∇loss_sum / N, the same as one process
holding all the batches.

Non-finite values never reach the weights: if the (all-reduced) loss or the global gradient
norm is inf/NaN, the update is skipped — no optimizer step, no schedule step — and counted
by the caller. With fp16 a GradScaler scales the loss up so small gradients do not underflow;
its own overflow skips lower the scale and are reported separately, as they are expected.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from ..data import Batch
from .distributed import DistContext
from .loss import label_smoothed_loss

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepContext:
    label_smoothing: float
    pad_id: int
    clip_norm: float = 0.0  # 0: no clipping
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    dist: DistContext = field(default_factory=DistContext)


@dataclass
class UpdateResult:
    loss_sum: float  # label-smoothed loss, summed over the update's target tokens (all ranks)
    nll_sum: float
    n_tokens: int  # real target tokens of the update (all ranks)
    n_src_tokens: int
    n_correct: int
    grad_norm: float  # global L2 norm before clipping
    skipped: bool  # True: nothing was applied
    overflow: bool = False  # fp16: the GradScaler found inf gradients (an expected skip)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_tokens, 1)

    @property
    def nll(self) -> float:
        return self.nll_sum / max(self.n_tokens, 1)


def autocast(precision: str, device: torch.device):
    """bf16/fp16 mixed precision for the forward pass; the loss itself is computed in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def train_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], lr: float,
                 ctx: StepContext) -> UpdateResult:
    """Accumulate gradients over ``batches`` (this rank's micro-batches) and apply one update at
    learning rate ``lr``. Every rank must call this with the same number of batches."""
    device = ctx.dist.device
    local = [float(sum(b.n_tgt_tokens for b in batches)), float(sum(b.n_src_tokens for b in batches))]
    n_tokens, n_src = (int(v) for v in ctx.dist.all_reduce_sum(local))
    # DDP averages gradients over ranks; W/N turns that average into Σ_ranks grad(loss_sum)/N.
    scale = ctx.dist.world_size / max(n_tokens, 1)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = nll_sum = 0.0
    n_correct = 0
    for i, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)
        last = i == len(batches) - 1
        # Only the last micro-batch all-reduces gradients; the others accumulate locally.
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with autocast(ctx.precision, device):
                logits = model(batch.src, batch.tgt_in)
            sums = label_smoothed_loss(logits, batch.tgt_out, ctx.label_smoothing, ctx.pad_id)
            loss = sums.loss * scale
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        loss_sum += float(sums.loss.detach())
        nll_sum += float(sums.nll)
        n_correct += sums.n_correct
    loss_sum, nll_sum, n_correct = ctx.dist.all_reduce_sum([loss_sum, nll_sum, float(n_correct)])

    params = [p for p in model.parameters() if p.grad is not None]
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)  # true gradients, so the norm and clipping mean what they say
    if ctx.clip_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, ctx.clip_norm))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
    # Gradients are identical on every rank after DDP's all-reduce and the loss is all-reduced,
    # so every rank takes the same decision.
    loss_ok, grads_ok = math.isfinite(loss_sum), math.isfinite(grad_norm)
    result = UpdateResult(loss_sum, nll_sum, n_tokens, n_src, int(n_correct), grad_norm, skipped=False)
    if not (loss_ok and grads_ok):
        result.skipped = True
        result.overflow = ctx.scaler is not None and loss_ok  # the scaler's scale was too high
        if ctx.scaler is not None:
            ctx.scaler.update()  # lowers the scale after an overflow
        optimizer.zero_grad(set_to_none=True)
        return result
    for group in optimizer.param_groups:
        group["lr"] = lr
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()
    return result
