"""Prepacked weights for CPU inference (oneDNN for fp32 and bf16, fbgemm for int8).

A plain ``nn.Linear`` hands its weight to the BLAS on every call, and the GEMM repacks it into
the blocked layout its micro-kernel reads, every time. At decoding sizes (a handful of rows per
step) that repacking is a large share of the call. oneDNN can reorder a weight into its blocked
layout once (``torch.ops.mkldnn._reorder_linear_weight``) and multiply against it directly
(``torch.ops.mkldnn._linear_pointwise``), optionally with the ReLU fused into the same kernel.
Small products are the exception (`PackedLinear.forward`): there the packed call's fixed cost
dominates and MKL on the plain weight is faster, unless MKL is slow on this CPU: where oneDNN's
packed product is measured clearly faster than MKL's at one row or at a few (`packed_wins`, as
on AMD CPUs, where MKL takes slower code paths), the packed call takes those sizes too. Measured
speed-ups: benchmarks/RESULTS.md and docs/precision.md.

The packed model computes the same function: only the summation order inside each dot product
differs, so logits agree to ~1e-5 and searches agree except at exact near-ties.

The plain weight stays referenced too (single rows use it, see `PackedLinear.forward`), so a
packed model holds its Linear weights twice. Packing is for inference only: the packed weights
are not parameters (training, state_dict and ``.to()`` do not see them). Where oneDNN is
missing (a build without mkldnn, another device) `pack_for_inference` leaves the model as it is.

bf16 (``pack_for_inference(model, dtype=torch.bfloat16)``, or `use_bf16_products` without
packing): the linear layers of the two stacks hold their weights in bf16 (packed, on
AVX512-BF16 or AMX CPUs); each product's input is rounded to bf16, the product accumulates in
fp32 and its result, rounded to bf16, comes back as fp32. Everything between the products stays
fp32: the embeddings and positions, the residual stream, layer norms, attention's softmax and
the search's scores. The pre-softmax projection (`RescoredLogits`) runs in bf16 too, but its
bf16 output rounds every logit to 8 significant bits (steps of 1/16 at a logit of 10), which
moves the beam's decisions; so the search recomputes the few logits it keeps from the fp32
weights (measured: docs/precision.md and docs/experiments.md).

int8 models (`quantize_int8`) get the same treatment with `Int8Linear`: torch's fbgemm int8
kernels on their prepacked weights, called directly (`use_int8_kernels`).
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build, on this CPU, can reorder and multiply oneDNN-packed linear
    weights of ``dtype`` (probed once per dtype; bf16 needs AVX-512 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.ones(3, 2, dtype=dtype), torch.ones(1, 2, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.equal(y, x @ w.T))
    except (RuntimeError, AttributeError) as e:  # op missing or unsupported on this CPU
        log.debug("oneDNN packed linear unavailable: %s", e)
        return False


SMALL_PRODUCT = 1_500_000  # multiply-adds (rows × in × out) up to which MKL's plain product is faster
SMALL_WEIGHT = 65_536  # weight entries up to which MKL is faster at up to 64 rows
# The packed product must take at most this share of MKL's time to take over the products the
# rules give MKL (`packed_wins`): near a tie MKL stays, so the choice does not flip between runs.
PACKED_MARGIN = 0.7
FEW_ROWS = 4  # a beam-4 step of one sentence


@functools.cache
def packed_wins(in_features: int, out_features: int, rows: int, repeats: int = 5, budget_s: float = 0.005) -> bool:
    """Whether oneDNN's packed fp32 product of ``rows`` rows beats MKL's on the plain weight by
    `PACKED_MARGIN`, for a weight of this shape: measured once per shape, row count and process
    (the best of at least ``repeats`` interleaved calls each, after a warm-up, and of more while
    the two have spent under ``budget_s``, up to 100: a product of microseconds is timed often).

    `PackedLinear` asks at 1 and at `FEW_ROWS` rows. Where MKL is fast (Intel CPUs) its rules
    hold; where it is not (AMD CPUs), the packed product takes single rows if it wins there, and
    every product of 2 or more rows if it wins at `FEW_ROWS` (its cost is nearly flat in the
    rows at these sizes, MKL's grows with them)."""
    import time

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    calls = {"mkl": lambda: F.linear(x, w),
             "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")}
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for call in calls.values():
            call()
        spent, done = 0.0, 0
        while done < repeats or (spent < budget_s and done < 100):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                took = time.perf_counter() - start
                best[name], spent = min(best[name], took), spent + took
            done += 1
    return best["onednn"] <= PACKED_MARGIN * best["mkl"]


class PackedLinear(nn.Module):
    """y = x Wᵀ + b (then ReLU when ``activation="relu"``) with W held in oneDNN's blocked
    layout, in fp32 or (``dtype=torch.bfloat16``) bf16; a bf16 product rounds x to bf16,
    accumulates in fp32 and returns y in x's dtype."""

    def __init__(self, linear: nn.Linear, activation: str = "none", dtype: torch.dtype = torch.float32):
        super().__init__()
        if activation not in ("none", "relu"):
            raise ValueError(f"unsupported fused activation {activation!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation, self.dtype = activation, dtype
        with torch.no_grad():
            # Plain attributes, not buffers: the opaque mkldnn tensor must not enter a state_dict.
            self.weight = linear.weight.detach().to(dtype)
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous())
            self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).clone()
        # Where MKL is slow on this CPU (fp32 only: bf16 always takes the packed product)
        fp32 = dtype == torch.float32
        self.packed_single_row = fp32 and packed_wins(self.in_features, self.out_features, 1)
        self.packed_few_rows = fp32 and packed_wins(self.in_features, self.out_features, FEW_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        if self.dtype != torch.float32:
            return self._low_precision(x)
        if self.plain_is_faster(x.numel() // self.in_features):
            # Small products take MKL on the plain weight: oneDNN's packed call has a fixed cost
            # whatever the size, MKL's grows with it, so single rows (matrix-vector products,
            # bound by reading the weight), small products and a small model's weights at up to
            # 64 rows are faster there (the thresholds: benchmarks/RESULTS.md), on CPUs where MKL
            # is fast (`packed_wins` decides the others).
            y = F.linear(x, self.weight, self.bias)
            return F.relu(y) if self.activation == "relu" else y
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, self.activation, [], "")

    def _low_precision(self, x: Tensor) -> Tensor:
        """bf16: oneDNN's packed product for every size (an unpacked bf16 product goes through
        oneDNN as well, and reorders the weight at every call)."""
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed_weight, self.bias, self.activation, [], "")
        return y.to(x.dtype)

    def plain_is_faster(self, rows: int) -> bool:
        if rows == 1:
            return not self.packed_single_row
        if self.packed_few_rows:
            return False
        size = self.weight.numel()
        return rows * size <= SMALL_PRODUCT or (size <= SMALL_WEIGHT and rows <= 64)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{str(self.dtype).removeprefix('torch.')}, activation={self.activation}")


class Bf16Linear(nn.Module):
    """y = x Wᵀ + b (then ReLU when ``activation="relu"``) with W in bf16, without packing (a GPU,
    or a CPU build without oneDNN): x rounded to bf16, the product accumulated in fp32, y
    returned in x's dtype. `PackedLinear` with ``dtype=torch.bfloat16`` computes the same."""

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "relu"):
            raise ValueError(f"unsupported fused activation {activation!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = activation
        with torch.no_grad():
            self.weight = linear.weight.detach().to(torch.bfloat16)
            self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight, self.bias)
        return (F.relu(y) if self.activation == "relu" else y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16, activation={self.activation}"


class RescoredLogits(nn.Module):
    """The pre-softmax projection of a bf16 search: all V logits from a bf16 product, and the
    few a search step keeps recomputed exactly in fp32 (`rescore`).

    A bf16 product rounds each logit to 8 significant bits (steps of 1/16 at a logit of 10), and
    with every logit rounded the beam's decisions move (module docstring). But a step only keeps
    the best 2K tokens of each row: `aiayn.search` takes the best 2K + ``RESCORE_EXTRA`` of the
    rounded logits, recomputes those from the fp32 weight rows (a product of (2K + extra) × d per
    row instead of V × d), and writes them back before it normalises. The kept tokens then have
    their fp32 logits, and Z = Σ exp(logit) differs from fp32's only in the rounded tail, whose
    mass is small. The V × d product, half of a `base` decoder step, runs in bf16.
    """

    def __init__(self, linear: nn.Linear, packed: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach()  # fp32, for `rescore` (shared, not copied)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.fast = PackedLinear(linear, dtype=torch.bfloat16) if packed else Bf16Linear(linear)

    def forward(self, x: Tensor) -> Tensor:
        """Every logit from the bf16 product (returned in x's dtype, rounded to bf16's precision)."""
        return self.fast(x)

    def rescore(self, x: Tensor, ids: Tensor) -> Tensor:
        """The fp32 logits of tokens ``ids`` (N, m) for the rows of ``x`` (N, d): (N, m)."""
        w = self.weight.index_select(0, ids.reshape(-1)).view(*ids.shape, self.in_features)
        z = torch.bmm(w, x.reshape(-1, self.in_features, 1).to(w.dtype)).squeeze(-1)
        return z if self.bias is None else z + self.bias[ids]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 rescored in fp32"


class Int8Linear(nn.Module):
    """y = x Wᵀ + b (then ReLU when ``activation="relu"``) with W int8, one scale per output
    channel, and x quantised per call (dynamic quantisation): torch's fbgemm kernels, called
    directly on the weight ``torch.ao.quantization.quantize_dynamic`` packed.

    Why not keep torch.ao's own module: its ``forward`` checks the weight's dtype and version
    through nested module attributes, passes keywords and converts the result's dtype on every
    call, a few µs of Python per product, and a base-size decoder step makes 37 products. Here
    the FFN's ReLU also runs inside the first product (``quantized::linear_relu_dynamic``)
    instead of as an operation of its own. The kernels and weights are the same, so the outputs
    are identical (tests/test_inference.py). Weights have one scale per output channel, as
    `quantize_int8` makes them.
    """

    def __init__(self, qlinear: nn.Module, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "relu"):
            raise ValueError(f"unsupported fused activation {activation!r}")
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.activation = activation
        self.packed = qlinear._packed_params._packed_params  # fbgemm's prepacked int8 weight and bias
        self._product = torch.ops.quantized.linear_relu_dynamic if activation == "relu" else torch.ops.quantized.linear_dynamic
        self._int8_weight: Tensor | None = None  # unpacked on first use by `weight_rows`
        self.bias = torch.ops.quantized.linear_unpack(self.packed)[1]  # fp32 (a shortlist takes its rows), or None

    def forward(self, x: Tensor) -> Tensor:
        # reduce_range=True: activations in 7 bits, as torch.ao's module quantises them for fbgemm
        # (its 8-bit multiply-adds can saturate with a full 8-bit range).
        return self._product(x, self.packed, True)

    def weight_rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of W dequantised to fp32, (len(ids), in_features): w = (q - zero point) · scale
        of each row's channel, what ``dequantize()`` of the whole weight gives for those rows.
        The int8 weight is unpacked once and kept (as many bytes as the packed one)."""
        if self._int8_weight is None:
            self._int8_weight = torch.ops.quantized.linear_unpack(self.packed)[0]
        w = self._int8_weight
        q = w.int_repr().index_select(0, ids).float()
        scale = w.q_per_channel_scales().index_select(0, ids).float()[:, None]
        zero = w.q_per_channel_zero_points().index_select(0, ids).float()[:, None]
        return (q - zero) * scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, activation={self.activation}"


class PackedFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (§3.3) with the ReLU fused into the first product.
    ``linear``: `PackedLinear` (fp32 or bf16, oneDNN), `Bf16Linear` or `Int8Linear` (int8, fbgemm).
    Another activation (a pretrained model's swish or gelu: `aiayn.model.ACTIVATIONS`) is
    applied between the two products instead."""

    def __init__(self, ffn: nn.Module, linear=PackedLinear):
        super().__init__()
        from ..model import ACTIVATIONS

        activation = getattr(ffn, "activation", "relu")
        self.w1 = linear(ffn.w1, activation="relu" if activation == "relu" else "none")
        self.w2 = linear(ffn.w2)
        self.between = None if activation == "relu" else ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        return self.w2(h if self.between is None else self.between(h))


def _packable(model: nn.Module) -> bool:
    """fp32 weights on the CPU, and plain nn.Linear layers (not an int8-quantised model)."""
    params = list(model.parameters())
    plain = any(type(m) is nn.Linear for m in model.modules())
    return plain and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def product_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's linear products run in: bf16 after `pack_for_inference` with bf16 or
    `use_bf16_products`, else its weights' dtype."""
    for m in model.modules():
        if isinstance(m, Bf16Linear):
            return torch.bfloat16
        if isinstance(m, PackedLinear):
            return m.dtype
    return next(model.parameters()).dtype


def use_bf16_products(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced by a `Bf16Linear` (ReLU fused into the FFN's
    first): bf16 products without oneDNN packing, on any device. Without ``inplace`` the model is
    copied first. Returned in eval mode."""
    if not inplace:
        model = copy.deepcopy(model)
    generator = getattr(model, "generator", None)
    _replace_linears(model, lambda m: type(m) is nn.Linear and m is not generator, Bf16Linear)
    if type(generator) is nn.Linear:
        model.generator = RescoredLogits(generator, packed=False)
    return model.eval()


def pack_for_inference(model: nn.Module, inplace: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``model`` with every ``nn.Linear`` (the tied output projection included) replaced by a
    `PackedLinear` holding its weight in ``dtype`` (fp32, or bf16 for bf16 products), and each
    feed-forward block by a `PackedFeedForward` (ReLU fused).

    Returns ``model`` itself, unchanged, where packing is impossible: oneDNN unavailable (for
    ``dtype``: `onednn_available`), or
    weights not fp32 or bf16 on the CPU (e.g. a model already quantised to int8, whose Linear
    layers are no longer ``nn.Linear``). Without ``inplace`` the model is copied first, so the caller's
    model keeps training as before. The packed model is for inference: it is put in eval mode.
    """
    if not onednn_available(dtype) or not _packable(model) or is_packed(model):
        return model
    if not inplace:
        model = copy.deepcopy(model)
    # exactly nn.Linear: not a quantised or other subclass; in bf16 the logits are rescored (module docstring)
    generator = getattr(model, "generator", None)
    _replace_linears(model, lambda m: type(m) is nn.Linear and (dtype == torch.float32 or m is not generator),
                     functools.partial(PackedLinear, dtype=dtype))
    if dtype != torch.float32 and type(generator) is nn.Linear:
        model.generator = RescoredLogits(generator)
    return model.eval()


def use_int8_kernels(model: nn.Module) -> nn.Module:
    """``model`` (quantised by ``torch.ao.quantization.quantize_dynamic``, changed in place) with
    each dynamic int8 Linear replaced by an `Int8Linear` on the same packed weight, and each
    feed-forward block by a `PackedFeedForward` of two (ReLU fused)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    _replace_linears(model, lambda m: type(m) is DynamicLinear, Int8Linear)
    return model


def _replace_linears(model: nn.Module, is_linear, linear) -> None:
    """Replace, in place, every module for which ``is_linear`` holds by ``linear(module)``, and
    every feed-forward block whose two products are such modules by a `PackedFeedForward`."""
    from ..model import PositionwiseFeedForward

    for name, child in model.named_children():
        if isinstance(child, PositionwiseFeedForward) and is_linear(child.w1) and is_linear(child.w2):
            setattr(model, name, PackedFeedForward(child, linear))
        elif is_linear(child):
            setattr(model, name, linear(child))
        else:
            _replace_linears(child, is_linear, linear)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every nn.Linear dynamically quantised to int8 (CPU only).

    Weights are stored as int8 with one scale per output channel; activations are quantised
    on the fly per batch. Embeddings stay fp32 (with tied embeddings the output projection
    gets its own int8 copy). The quantised layers then run as `Int8Linear`: torch's fbgemm
    kernels on the same packed weights, without the per-call Python of torch.ao's module.
    torch 2.13 still ships ``torch.ao.quantization.quantize_dynamic`` and its fbgemm/x86
    kernels, but warns that the module is deprecated in favour of torchao (not a dependency
    here); the conversion runs with exactly those warnings silenced. The quantised model itself
    runs without warnings. Raises ValueError for a packed model or one with bf16 products
    (`use_bf16_products`), RuntimeError where this torch
    has no ``torch.ao.quantization``.
    """
    if is_packed(model) or product_dtype(model) != torch.float32:
        raise ValueError("quantize_int8 needs the plain fp32 model, not one packed by pack_for_inference "
                         "or given bf16 products")
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # a future torch without torch.ao.quantization
        raise RuntimeError(f"int8 needs torch.ao.quantization, absent from torch {torch.__version__} ({e})") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
        quantized = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
    return use_int8_kernels(quantized)
