"""Which arithmetic to run in: ``precision: auto | fp32 | bf16``, resolved for this machine.

    cpu_arithmetic      what torch and oneDNN report about this CPU (ISA, AVX512-BF16, AMX)
    native_bf16         whether bf16 runs natively on a device (never where it is emulated)
    resolve_precision   "auto" -> "bf16" where native, else "fp32"; a forced "bf16" checked
    for_training        a model as training runs it in a precision on a device (bf16 on CPUs:
                        explicit attention, `use_explicit_attention`)

bf16 keeps fp32's 8-bit exponent and cuts the mantissa to 7 bits, so it needs no loss scaling;
a bf16 matrix product accumulates in fp32. CPUs with AVX512-BF16 (``vdpbf16ps``) or AMX tiles
multiply bf16 matrices natively through oneDNN, several times faster than fp32; a CPU without
them (AVX2 only, e.g. AMD Zen 3) emulates bf16 and is far slower than in fp32. ``auto`` never
picks bf16 there, and a forced ``bf16`` is refused (`resolve_precision`).

Detection reads what this torch build reports (``torch.cpu._is_avx512_bf16_supported``,
``torch.cpu._is_amx_tile_supported``, ``torch.ops.mkldnn._is_mkldnn_bf16_supported``), not the
CPU's name, and honours the environment variables that limit the kernels torch may use:
``ATEN_CPU_CAPABILITY`` below avx512 and ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) below
AVX512_CORE_BF16 mean no native bf16, as on a machine without it.

What "bf16" means where (the recipes are the same, only the arithmetic differs):
- training: autocast to bf16 (`aiayn.train.step`), fp32 master weights and Adam state, the
  loss and its softmax in fp32, checkpoints in fp32;
- translation: the linear products in bf16 on bf16 weights, everything between them fp32; the
  logits a search step keeps recomputed in fp32 (`aiayn.inference.packed.RescoredLogits`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import PRECISIONS
from .errors import UserError

TRAIN_PRECISIONS = PRECISIONS + ("fp16",)  # fp16 (with a GradScaler) for GPUs

# oneDNN's ISA names in increasing order; native bf16 starts at AVX512_CORE_BF16.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512",
                "AVX10_2_512_AMX_2", "DEFAULT", "ALL")


@dataclass(frozen=True)
class CpuArithmetic:
    """What this process may use on the CPU, as torch reports it."""

    isa: str  # ATen's vectorised kernels: "AVX512", "AVX2", "DEFAULT", ... (torch.backends.cpu)
    avx512_bf16: bool  # the CPU has AVX512-BF16 (vdpbf16ps)
    amx: bool  # the CPU has AMX tiles (bf16 and int8 tile products)
    onednn_bf16: bool  # oneDNN reports bf16 support and is not limited below it

    @property
    def native_bf16(self) -> bool:
        return self.onednn_bf16 and (self.avx512_bf16 or self.amx) and self.isa.startswith("AVX512")

    def describe(self) -> str:
        """One line for logs and reports, e.g. "AVX512, AVX512-BF16, AMX"."""
        parts = [self.isa]
        parts += ["AVX512-BF16"] if self.avx512_bf16 else []
        parts += ["AMX"] if self.amx else []
        if (self.avx512_bf16 or self.amx) and not self.native_bf16:
            parts.append("bf16 disabled by the environment")
        return ", ".join(parts) if len(parts) > 1 or self.native_bf16 else f"{self.isa}, no native bf16"


def _onednn_limited_below_bf16() -> bool:
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if not value or value not in _ONEDNN_ISAS:
        return False
    return _ONEDNN_ISAS.index(value) < _ONEDNN_ISAS.index("AVX512_CORE_BF16")


@functools.cache
def cpu_arithmetic() -> CpuArithmetic:
    """This CPU as torch sees it (read once per process)."""
    isa = torch.backends.cpu.get_cpu_capability()
    cpu = getattr(torch, "cpu", None)
    avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return CpuArithmetic(isa=isa, avx512_bf16=avx512_bf16, amx=amx,
                         onednn_bf16=onednn and not _onednn_limited_below_bf16())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (a CUDA GPU of compute capability 8.0 or
    newer; a CPU with AVX512-BF16 or AMX that torch and oneDNN may use)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_arithmetic().native_bf16
    return False


def resolve_precision(requested: str, device: torch.device, *, allowed: tuple[str, ...] = PRECISIONS,
                      setting: str = "precision") -> str:
    """The precision to run in: ``auto`` is bf16 where ``device`` does bf16 natively, else fp32;
    ``fp32`` and ``bf16`` force a choice, but bf16 is refused (a `UserError`) where it would be
    emulated, and fp16 where the device is not a GPU. ``setting`` names the option in errors."""
    if requested not in allowed:
        raise UserError(f"unknown {setting} {requested!r}; known: {', '.join(allowed)}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device):
        where = f"this CPU ({cpu_arithmetic().describe()})" if device.type == "cpu" else f"device {device}"
        raise UserError(f"{setting} bf16: {where} has no native bf16 (emulated, it is many times slower than "
                        f"fp32); use {setting} auto or fp32")
    if requested == "fp16" and device.type != "cuda":
        raise UserError(f"{setting} fp16 needs a CUDA GPU (device {device}); use {setting} auto, fp32 or bf16")
    return requested


def describe_precision(precision: str, requested: str, device: torch.device) -> str:
    """One line for a command's start: "precision bf16 (auto: this CPU has AVX512, AVX512-BF16, AMX)"."""
    where = f"this CPU has {cpu_arithmetic().describe()}" if device.type == "cpu" else f"device {device}"
    how = "auto" if requested == "auto" else "forced"
    return f"precision {precision} ({how}; {where})"


def for_training(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``model`` (changed in place) as training runs it in the resolved ``precision`` on
    ``device``: in bf16 on a CPU its attention takes the explicit formula
    (`use_explicit_attention`); otherwise it is left as it is."""
    if precision == "bf16" and device.type == "cpu":
        use_explicit_attention(model)
    return model


# ideep (PyTorch's oneDNN layer) keeps every product it has prepared, per shape, in an LRU cache
# of 1,024 entries by default. Training's token batches give every batch new shapes, so the
# cache keeps growing with products that are never used again; 128 entries hold one update's.
TRAINING_ONEDNN_CACHE = 128


def limit_onednn_cache(capacity: int = TRAINING_ONEDNN_CACHE) -> None:
    """Bound ideep's cache of prepared oneDNN products (``LRU_CACHE_CAPACITY``) for a training
    process, unless the user set it (`aiayn.train.train` calls it). ideep reads the variable at
    its first product, so a process that multiplied through oneDNN before keeps the default.
    Its effect on peak memory is measured in docs/precision.md."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(capacity))


def use_explicit_attention(model: nn.Module) -> nn.Module:
    """Every attention of ``model`` through the explicit formula (``fused_kernel = False``), changed in
    place. On CPUs torch's fused attention kernel runs bf16 through a path several times slower
    than the explicit products in bf16 with the softmax in fp32 (benchmarks/RESULTS.md); the
    function computed is the same."""
    from .model import MultiHeadAttention

    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.fused_kernel = False
    return model
