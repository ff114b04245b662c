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
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data import Batch
from ..model import Transformer
from .distributed import DistContext
from .loss import smoothed_cross_entropy
from .products import Linear, mkl_linear

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepContext:
    """What an update needs besides the model, the optimizer and the batches."""

    label_smoothing: float
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


def autocast(precision: str, device: torch.device, enabled: bool = True):
    """bf16/fp16 mixed precision for the forward pass; the loss itself is computed in fp32.
    ``enabled=False`` inside an enabled one: a region without autocast that keeps its cache."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision], enabled=enabled)


class Criterion(nn.Module):
    """The model and its training loss as one module, the unit DistributedDataParallel wraps
    (DDP only sees what happens inside ``forward``). ``forward(batch)`` returns the update's
    sums as 0-dim tensors: (Σ smoothed loss, Σ NLL, Σ correct), over the real target tokens.

    The decoder runs on the padded batch; only its states at real target positions are
    projected to the vocabulary, fused with the loss (`loss.smoothed_cross_entropy`).
    """

    def __init__(self, model: Transformer, label_smoothing: float, linear: Linear = mkl_linear):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.linear = linear  # the loss projection's fp32 product (aiayn.train.products)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        states = self.model.states(batch.src, batch.tgt_in)
        states = states.reshape(-1, states.size(-1)).index_select(0, batch.tgt_index)
        weight, bias = self.model.generator.weight, self.model.generator.bias
        if bias is not None:  # a pretrained model's logits bias: h·Wᵀ + b = [h, 1]·[W, b]ᵀ, exactly
            states = torch.cat([states, states.new_ones(states.size(0), 1)], dim=1)
            weight = torch.cat([weight, bias.to(weight.dtype)[:, None]], dim=1)
        sums = smoothed_cross_entropy(states, weight, batch.tgt_labels,
                                      self.label_smoothing, self.model.config.pad_id, self.linear)
        return sums.loss, sums.nll, sums.n_correct


def train_update(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], lr: float,
                 ctx: StepContext) -> UpdateResult:
    """Accumulate gradients over ``batches`` (this rank's micro-batches) and apply one update at
    learning rate ``lr``. ``model``: a `Criterion`, a DDP-wrapped one, or a bare `Transformer`
    (wrapped here). Every rank must call this with the same number of batches.

    The host waits for the device once per update (for the all-reduced sums and the gradient
    norm that decide whether to apply it), never per micro-batch."""
    if isinstance(model, Transformer):
        model = Criterion(model, ctx.label_smoothing)
    device = ctx.dist.device
    local = [float(sum(b.n_tgt_tokens for b in batches)), float(sum(b.n_src_tokens for b in batches))]
    n_tokens, n_src = (int(v) for v in ctx.dist.all_reduce_sum(local))
    # DDP averages gradients over ranks; W/N turns that average into Σ_ranks grad(loss_sum)/N.
    scale = ctx.dist.world_size / max(n_tokens, 1)
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss, nll, correct
    # One autocast region for the whole update: autocast caches each weight's low-precision copy
    # until its outermost region ends, so the micro-batches of an update share one cast of every
    # weight (the weights only change in the optimizer step, after the region). The backward
    # passes run in a nested region without autocast, as autocast's documentation advises.
    with autocast(ctx.precision, device):
        for i, batch in enumerate(batches):
            batch = batch.to(device, non_blocking=True)
            last = i == len(batches) - 1
            # Only the last micro-batch all-reduces gradients; the others accumulate locally.
            sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
            with sync:
                loss, nll, correct = model(batch)
                scaled = loss * scale
                with autocast(ctx.precision, device, enabled=False):
                    (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
            totals += torch.stack([loss.detach().double(), nll.double(), correct.double()])
    loss_sum, nll_sum, n_correct = ctx.dist.all_reduce_sum(totals)

    params = [p for p in model.parameters() if p.grad is not None]
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)  # true gradients, so the norm and clipping mean what they say
    if ctx.clip_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, ctx.clip_norm, foreach=True))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)) if params else 0.0
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
