"""aiayn.precision: what ``auto`` picks for each kind of CPU (mocked), and what a forced choice
is refused; the explicit attention switch computes the same function."""

from __future__ import annotations

import pytest
import torch

from aiayn import precision
from aiayn.errors import UserError
from aiayn.precision import CpuArithmetic, resolve_precision, use_explicit_attention

from helpers import random_ids, small_model

CPU = torch.device("cpu")
ZEN3 = CpuArithmetic(isa="AVX2", avx512_bf16=False, amx=False, onednn_bf16=False)
ZEN5 = CpuArithmetic(isa="AVX512", avx512_bf16=True, amx=False, onednn_bf16=True)
SAPPHIRE_RAPIDS = CpuArithmetic(isa="AVX512", avx512_bf16=True, amx=True, onednn_bf16=True)
SKYLAKE = CpuArithmetic(isa="AVX512", avx512_bf16=False, amx=False, onednn_bf16=True)  # AVX-512, no bf16
# AVX512-BF16 hardware, but ATEN_CPU_CAPABILITY=avx2 limits torch's kernels
LIMITED = CpuArithmetic(isa="AVX2", avx512_bf16=True, amx=True, onednn_bf16=True)


@pytest.fixture
def cpu_is(monkeypatch):
    def set_cpu(arithmetic: CpuArithmetic) -> None:
        monkeypatch.setattr(precision, "cpu_arithmetic", lambda: arithmetic)
    return set_cpu


@pytest.mark.parametrize("cpu, expected", [(ZEN3, "fp32"), (ZEN5, "bf16"), (SAPPHIRE_RAPIDS, "bf16"),
                                           (SKYLAKE, "fp32"), (LIMITED, "fp32")])
def test_auto_is_bf16_only_where_native(cpu_is, cpu, expected):
    cpu_is(cpu)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"


def test_forced_bf16_is_refused_where_emulated(cpu_is):
    cpu_is(ZEN3)
    with pytest.raises(UserError, match="no native bf16.*use precision auto or fp32"):
        resolve_precision("bf16", CPU)
    cpu_is(ZEN5)
    assert resolve_precision("bf16", CPU) == "bf16"


def test_unknown_precision_and_fp16_on_cpu_are_errors(cpu_is):
    cpu_is(SAPPHIRE_RAPIDS)
    with pytest.raises(UserError, match="unknown precision 'bf32'; known: auto, fp32, bf16"):
        resolve_precision("bf32", CPU)
    with pytest.raises(UserError, match="unknown train.precision 'fp16'"):
        resolve_precision("fp16", CPU, setting="train.precision")  # not allowed unless asked for
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU, allowed=precision.TRAIN_PRECISIONS)


def test_the_environment_limits_onednn(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 means no native bf16 through oneDNN."""
    for value, limited in [("AVX2", True), ("avx512_core", True), ("AVX512_CORE_BF16", False),
                           ("AVX512_CORE_AMX", False), ("ALL", False), ("", False)]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        assert precision._onednn_limited_below_bf16() is limited, value


def test_describe_names_the_capabilities():
    assert SAPPHIRE_RAPIDS.describe() == "AVX512, AVX512-BF16, AMX"
    assert ZEN3.describe() == "AVX2, no native bf16"
    assert "disabled by the environment" in LIMITED.describe()


def test_this_machine_is_described_consistently():
    """Whatever this CPU is: auto gives bf16 exactly where native_bf16 says so."""
    arithmetic = precision.cpu_arithmetic()
    assert resolve_precision("auto", CPU) == ("bf16" if arithmetic.native_bf16 else "fp32")


def test_explicit_attention_computes_the_same_function():
    model = small_model()
    src, tgt = random_ids(3, 7), random_ids(3, 5, seed=2)
    src[1, 5:] = model.config.pad_id  # padding: the mask must be applied alike
    with torch.no_grad():
        fused = model(src, tgt)
        explicit = use_explicit_attention(model)(src, tgt)
    assert all(not m.fused_kernel for m in model.modules() if hasattr(m, "fused_kernel"))
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)


def test_training_bounds_onednn_product_cache_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    precision.limit_onednn_cache()
    assert precision.os.environ["LRU_CACHE_CAPACITY"] == str(precision.TRAINING_ONEDNN_CACHE)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    precision.limit_onednn_cache()
    assert precision.os.environ["LRU_CACHE_CAPACITY"] == "7"
