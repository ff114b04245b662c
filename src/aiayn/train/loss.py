"""Label-smoothed cross-entropy (paper §5.4, "Label Smoothing": ε_ls = 0.1).

How the smoothing mass is spread. For a target token y the training distribution q is

    q(y)  = 1 - ε
    q(k)  = ε / (V - 2)   for every k ∉ {y, pad}
    q(pad) = 0

i.e. the mass ε is shared uniformly by every class except the correct one and padding:
padding is never a token the model should produce, so it gets no probability (the choice of
the Annotated Transformer; tensor2tensor spreads ε/(V-1) over all other classes, pad included).
The loss of one position is the cross-entropy H(q, p) = -Σ_k q(k) log p(k). With logits z,
log p(k) = z_k - lse, lse = log Σ_k exp z_k, and Σ_k q(k) = 1, it is

    H(q, p) = lse - (1 - ε) · z_y - ε/(V - 2) · (Σ_k z_k - z_y - z_pad)

and its NLL part is -log p(y) = lse - z_y. Positions whose *target* is padding contribute
nothing. We report the smoothed loss H and, separately, the NLL, whose exp is the perplexity.

How it is computed (the cost that matters on a small model). The pre-softmax projection and
the loss are one fused operation, `smoothed_cross_entropy`, over the real (non-pad) target
positions only, a chunk of rows at a time. A chunk's logits z (rows × V) are used for the
loss and immediately turned into the gradient ∂H/∂z = softmax(z) - q in place, which is
multiplied into the gradients of the decoder states and of the projection weights; then the
chunk is dropped. So no (tokens × V) logits, log-softmax or gradient tensor ever exists, no
padding position is projected, and the backward pass only scales the stored gradients by the
incoming factor. The forward pass therefore does the backward pass's matmuls as well (the
same FLOPs as autograd would spend, just earlier), and skips them when no gradient is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .products import Linear, mkl_linear

# Rows per chunk: about this many logits (4M floats = 16 MB), and at least MIN_ROWS rows so
# the three matmuls per chunk stay efficient for large vocabularies.
CHUNK_ELEMENTS = 1 << 22
MIN_ROWS = 256


@dataclass
class LossSums:
    """Sums over the real (non-pad) target tokens; divide by ``n_tokens`` to average.
    All are 0-dim tensors on the model's device (no host synchronisation to produce them)."""

    loss: Tensor  # Σ H(q, p), differentiable
    nll: Tensor  # Σ -log p(y), detached
    n_correct: Tensor  # argmax == target (token accuracy), detached
    n_tokens: int


def _check_vocab(vocab: int, epsilon: float) -> None:
    """ε/(V-2) needs a class besides the target and padding."""
    if vocab < 3 and epsilon > 0:
        raise ValueError("label smoothing needs a vocabulary of at least 3 classes")


def _logit_gradient(p: Tensor, y: Tensor, smooth: float, epsilon: float, pad_id: int) -> Tensor:
    """∂H/∂z = p - q for a chunk, in place of the fp32 probabilities ``p``: p - ε/(V-2)
    everywhere, p at pad, p - (1-ε) at y."""
    if smooth:
        p.sub_(smooth)
        p[:, pad_id] += smooth
    return p.scatter_add_(1, y, torch.full_like(y, smooth - (1.0 - epsilon), dtype=p.dtype))


class _SmoothedCrossEntropy(torch.autograd.Function):
    """(hidden (N, d), weight (V, d), target (N,)) -> (Σ H, Σ NLL, Σ correct); see the module
    docstring. Gradients flow to ``hidden`` and ``weight`` only."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float, pad_id: int,
                needs_grad: bool, linear: Linear):
        n, vocab = hidden.size(0), weight.size(0)
        device_type = hidden.device.type
        # Under autocast the projection runs in the autocast dtype (as nn.Linear would); the
        # softmax, the loss and the gradient accumulators stay fp32.
        mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        w = weight.to(mm_dtype)
        h_all = hidden.to(mm_dtype)
        # fp32 products through the chosen library (aiayn.train.products); bf16 through torch.mm
        mm = linear if mm_dtype == torch.float32 else mkl_linear
        smooth = epsilon / (vocab - 2) if epsilon > 0 else 0.0
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty((n, hidden.size(1)), dtype=torch.float32, device=hidden.device) if needs_grad else None
        # ∂H/∂W accumulates as Wᵀ's (d, V) when the products are low-precision: hᵀg reads both
        # operands in their stored order and adds contiguously (gᵀh, or adding a transposed view,
        # is slower).
        low = mm_dtype != torch.float32
        grad_weight = (torch.zeros(weight.shape[::-1] if low else weight.shape, dtype=torch.float32, device=weight.device)
                       if needs_grad else None)
        rows = max(MIN_ROWS, CHUNK_ELEMENTS // max(vocab, 1))
        with torch.autocast(device_type, enabled=False):
            for start in range(0, n, rows):
                h = h_all[start:start + rows]
                y = target[start:start + rows, None]
                # (rows, V) logits of this chunk, made fp32 once: every reduction and the
                # softmax read the fp32 copy (reducing bf16 with fp32 accumulation, or a softmax
                # with dtype=float32, converts internally on every call; docs/experiments.md).
                z = mm(h, w).float()
                z_y = z.gather(1, y).squeeze(1)
                z_max = z.amax(dim=1)  # (amax is a plain vectorised reduction; max(dim) is 7x slower)
                if smooth:
                    others = z.sum(dim=1) - z_y - z[:, pad_id]
                p = torch.softmax(z, dim=1)
                del z
                # lse = max z - log max p: max p >= 1/V, so its log never underflows.
                lse = z_max - p.amax(dim=1).log()
                nll_rows = lse - z_y
                if smooth:
                    loss += (nll_rows + epsilon * z_y - smooth * others).sum()
                else:
                    loss += nll_rows.sum()
                nll += nll_rows.sum()
                # Correct when the target's logit is the largest (a tie counts as correct, where
                # argmax would pick the first; with continuous logits ties do not happen).
                correct += z_y.ge(z_max).sum()
                if not needs_grad:
                    continue
                # The gradient in fp32, rounded once to the product's dtype.
                g = _logit_gradient(p, y, smooth, epsilon, pad_id).to(mm_dtype)
                grad_hidden[start:start + rows] = mm(g, w.t())
                if low:
                    grad_weight += torch.mm(h.t(), g)
                elif mm is mkl_linear:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += mm(g.t(), h.t())
        if needs_grad:
            if low:
                grad_weight = grad_weight.t().contiguous()
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll, correct)
        return loss, nll, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_hidden * grad_loss).to(h_dtype), (grad_weight * grad_loss).to(w_dtype),
                None, None, None, None, None)


def smoothed_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float,
                           pad_id: int, linear: Linear = mkl_linear) -> LossSums:
    """Label-smoothed cross-entropy of the logits ``hidden @ weight.T`` against ``target``.

    hidden: (N, d) decoder states at the N real target positions (padding already left out);
    weight: (V, d) the pre-softmax projection (tied: the target embedding); target: (N,).
    Equal to projecting and taking `label_smoothed_loss`, without materialising the logits.
    ``linear``: the fp32 product x wᵀ (MKL by default; oneDNN where the trainer measured it
    faster, `aiayn.train.products`).
    """
    vocab = weight.size(0)
    _check_vocab(vocab, epsilon)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, nll, correct = _SmoothedCrossEntropy.apply(hidden, weight, target, float(epsilon), int(pad_id), needs_grad,
                                                  linear)
    return LossSums(loss=loss, nll=nll, n_correct=correct, n_tokens=int(target.numel()))


def label_smoothed_loss(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> LossSums:
    """The same sums from ready logits (..., V) and targets (...) with padding in place, by the
    textbook route (a full log-softmax): the reference `smoothed_cross_entropy` is tested
    against, and a loss for models that only expose logits. Computed in fp32."""
    vocab = logits.size(-1)
    _check_vocab(vocab, epsilon)
    keep = target.reshape(-1).ne(pad_id)
    lprobs = F.log_softmax(logits.float(), dim=-1).reshape(-1, vocab)[keep]
    target = target.reshape(-1)[keep]
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = nll
    if epsilon > 0:
        # Σ_{k ∉ {y, pad}} -log p(k) = -(Σ_k log p(k) - log p(y) - log p(pad))
        others = -(lprobs.sum(dim=1) + nll - lprobs[:, pad_id])
        loss = (1.0 - epsilon) * nll + (epsilon / (vocab - 2)) * others
    return LossSums(loss=loss.sum(), nll=nll.detach().sum(), n_correct=lprobs.argmax(dim=1).eq(target).sum(),
                    n_tokens=int(target.numel()))
