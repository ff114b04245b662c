"""Which library multiplies fp32 matrices in training on a CPU: MKL or oneDNN.

PyTorch sends an fp32 ``nn.Linear`` on a CPU to MKL. On AMD CPUs MKL takes slower code paths
than on Intel ones, and oneDNN's fp32 product is faster there (issue 25 measured 138 GFLOP/s
through MKL and 245 through oneDNN for a 4096 × 512 × 2048 product on a 2-core Zen 5); on Intel
CPUs the two are about equal. Which one wins is measured, not guessed from the CPU's name:
`measure_fp32_products` times both on a product of the model's own shape, forward and backward,
and `choose_fp32_products` takes oneDNN only where it is clearly faster (`ONEDNN_MARGIN`).

With oneDNN chosen, every ``nn.Linear`` of the model becomes a `OneDnnLinear` (the same
parameters, the same state_dict) whose forward and backward are three oneDNN products on the
plain fp32 weights (`onednn_linear`):

    y = x Wᵀ + b            forward
    ∂x = ∂y W               backward, the product with Wᵀ's transpose
    ∂W = ∂yᵀ x,  ∂b = Σ ∂y  backward, over all rows

The weights change at every update, so nothing is prepacked (prepacking pays in inference,
`aiayn.inference.packed`): each call hands oneDNN the plain weight. The fused loss's
projection (`aiayn.train.loss`) takes the same ``linear`` function. The function computed is
the same as MKL's; only the summation order inside each dot product differs.

Under bf16 (autocast) every product already runs through oneDNN, so this only concerns fp32.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

log = logging.getLogger(__name__)

FP32_PRODUCTS = ("auto", "mkl", "onednn")
# oneDNN is chosen by "auto" only when a forward and backward product through it takes at most
# this share of MKL's time: a tie keeps PyTorch's default.
ONEDNN_MARGIN = 0.9

Linear = Callable[[Tensor, Tensor], Tensor]  # (x (N, in), w (out, in)) -> x wᵀ (N, out)


def _onednn_mm(x: Tensor, w: Tensor) -> Tensor:
    """x wᵀ through oneDNN, for 2-d fp32 ``x`` (N, in) and ``w`` (out, in), either of them
    possibly a transposed view (oneDNN reads the strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def mkl_linear(x: Tensor, w: Tensor) -> Tensor:
    """x wᵀ through PyTorch's default (MKL on a CPU)."""
    return torch.mm(x, w.t())


class _OneDnnLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.size(-1))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(g2, weight.t()).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_mm(g2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with its forward and backward products through oneDNN
    (fp32 CPU tensors; any other dtype or device takes ``F.linear``)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    return _OneDnnLinearFunction.apply(x, weight, bias)


def onednn_mm_linear(x: Tensor, w: Tensor) -> Tensor:
    """x wᵀ through oneDNN for the fused loss (no autograd: the loss forms its own gradients)."""
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return mkl_linear(x, w)
    return _onednn_mm(x, w)


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` whose training products run through oneDNN (`onednn_linear`); the same
    parameters and state_dict, so checkpoints do not know the difference. Without gradients
    (validation's loss and greedy search) it is a plain ``nn.Linear``: the choice was measured on
    training's products, and a search's few-row products would make oneDNN reorder the weight at
    every step."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return onednn_linear(x, self.weight, self.bias)


def use_linear_library(model: nn.Module, library: str) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (changed in place) multiplies through ``library``:
    "onednn" makes them `OneDnnLinear`, "mkl" plain ``nn.Linear`` again."""
    for module in model.modules():
        if library == "onednn" and type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
        elif library == "mkl" and type(module) is OneDnnLinear:
            module.__class__ = nn.Linear
    return model


@functools.cache
def onednn_fp32_available() -> bool:
    """Whether this torch build multiplies fp32 through oneDNN on this CPU (probed once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3)
        return bool(torch.equal(_onednn_mm(x, w), x @ w.t()))
    except (RuntimeError, AttributeError) as e:  # op missing in this build
        log.debug("oneDNN fp32 linear unavailable: %s", e)
        return False


@dataclass(frozen=True)
class Fp32Products:
    """The library chosen for fp32 products, and why."""

    library: str  # "mkl" or "onednn"
    setting: str  # the configured value: auto, mkl or onednn
    mkl_s: float | None = None  # measured seconds of one forward and backward product (auto only)
    onednn_s: float | None = None

    def describe(self) -> str:
        name = {"mkl": "MKL", "onednn": "oneDNN"}[self.library]
        if self.mkl_s is None or self.onednn_s is None:
            return f"fp32 products through {name} ({self.setting})"
        ratio = self.mkl_s / self.onednn_s
        return f"fp32 products through {name} (auto; oneDNN measured {ratio:.2f}x MKL's speed)"

    def resumed(self, library: str) -> Fp32Products:
        """The choice a resumed run keeps: the library its first session measured (an exact
        resume needs the same summation order in every product)."""
        return Fp32Products(library, self.setting)

    def record(self) -> dict:
        return {"fp32_products": self.library, "fp32_products_setting": self.setting,
                "fp32_products_mkl_s": self.mkl_s, "fp32_products_onednn_s": self.onednn_s}

    @property
    def linear(self) -> Linear:
        """The x wᵀ function for the fused loss's projection."""
        return onednn_mm_linear if self.library == "onednn" else mkl_linear


def measure_fp32_products(rows: int, d_in: int, d_out: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds of one forward and backward ``rows × d_in → d_out`` product (the best of
    ``repeats``, after one warm-up call each), through MKL and through oneDNN."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=gen, requires_grad=True)
    b = torch.zeros(d_out, requires_grad=True)
    grad = torch.randn(rows, d_out, generator=gen)

    def once(fn) -> float:
        start = time.perf_counter()
        fn(x, w, b).backward(grad)
        return time.perf_counter() - start

    best = {F.linear: float("inf"), onednn_linear: float("inf")}
    for fn in best:
        once(fn)
    for _ in range(repeats):  # interleaved, so a slow moment hurts both
        for fn in best:
            best[fn] = min(best[fn], once(fn))
    return best[F.linear], best[onednn_linear]


def choose_fp32_products(setting: str, precision: str, device: torch.device, *, rows: int, d_model: int,
                         d_ff: int) -> Fp32Products | None:
    """The library for fp32 training products: None where the question does not arise (not
    fp32, or not a CPU); MKL where oneDNN cannot multiply fp32; otherwise ``setting``, where
    "auto" measures a product of the model's shape (``rows`` × ``d_model`` → ``d_ff``, the
    first feed-forward layer's) both ways and takes oneDNN only at ``ONEDNN_MARGIN``."""
    if precision != "fp32" or device.type != "cpu":
        return None
    if setting not in FP32_PRODUCTS:
        raise ValueError(f"unknown fp32 products setting {setting!r}; known: {', '.join(FP32_PRODUCTS)}")
    if not onednn_fp32_available():
        if setting == "onednn":
            raise UserError("train.fp32_products onednn: this PyTorch build cannot multiply fp32 through oneDNN "
                            "on this CPU; use auto or mkl")
        return Fp32Products("mkl", setting)
    if setting != "auto":
        return Fp32Products(setting, setting)
    mkl_s, onednn_s = measure_fp32_products(min(rows, 4096), d_model, d_ff)
    library = "onednn" if onednn_s <= ONEDNN_MARGIN * mkl_s else "mkl"
    return Fp32Products(library, setting, mkl_s=mkl_s, onednn_s=onednn_s)
