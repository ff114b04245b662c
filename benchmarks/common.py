"""Shared pieces of the benchmark suite: timing, the matmul probe, the machine description.

Timing rule (the machine's speed drifts by up to 2x within minutes, and other processes share
its cores): every comparison is made between systems timed in the same process, alternately,
round after round. Each figure is the median over rounds, and a ratio is the median of the
per-round ratios, so a slow minute affects both sides of the ratio alike.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall-clock seconds of one call (perf_counter) and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@dataclass
class Series:
    """Repeated measurements of one quantity (e.g. tokens/s of one system), one per round."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def spread(self) -> str:
        """min–max, to show how noisy the figure was."""
        if not self.values:
            return "–"
        return f"{min(self.values):.4g}–{max(self.values):.4g}"


def paired_ratio(a: Series, b: Series) -> float:
    """Median over rounds of a[i] / b[i]: both were measured in the same round."""
    pairs = [x / y for x, y in zip(a.values, b.values) if y > 0]
    return statistics.median(pairs) if pairs else float("nan")


# ---------------------------------------------------------------------------------------------
# The machine's limit: a matmul probe
# ---------------------------------------------------------------------------------------------


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int, budget_s: float = 10.0) -> float:
    """Median GFLOP/s of an n×n by n×n matmul (2n³ FLOPs) on all of torch's threads.

    The best a dense kernel reaches on this machine and dtype: the denominator of model FLOPs
    utilisation (MFU). Stops early once ``budget_s`` is spent (bf16 without native support is
    ~100x slower than fp32 here).
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernel selection
    rates = []
    spent = 0.0
    for _ in range(repeats):
        seconds, _ = timed(lambda: torch.matmul(a, b))
        rates.append(2 * n**3 / seconds / 1e9)
        spent += seconds
        if spent > budget_s:
            break
    return statistics.median(rates)


def bf16_supported() -> bool:
    """Whether torch may use native bf16 products here (AVX512-BF16 or AMX, not limited by the
    environment): what ``precision: auto`` decides by (`aiayn.precision`). torch runs bf16 matmuls
    either way, emulated when not."""
    from aiayn.precision import native_bf16

    return native_bf16(torch.device("cpu"))


def linear_gflops(rows: int, d_in: int, d_out: int, library: str, repeats: int, budget_s: float = 10.0) -> float:
    """Median GFLOP/s of y = x Wᵀ, x (rows × d_in), W (d_out × d_in), through one library:

        mkl-fp32     F.linear in fp32 (torch hands fp32 products to MKL)
        onednn-fp32  oneDNN's linear on the plain fp32 weight (torch._C._nn.mkldnn_linear's kernel,
                     torch.ops.mkldnn._linear_pointwise), as training would call it: no prepacking
        onednn-bf16  F.linear in bf16 (torch hands bf16 products to oneDNN, AMX tiles where present)
    """
    import torch.nn.functional as F

    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    if library == "mkl-fp32":
        def call():
            return F.linear(x, w)
    elif library == "onednn-fp32":
        def call():
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    elif library == "onednn-bf16":
        xb, wb = x.bfloat16(), w.bfloat16()

        def call():
            return F.linear(xb, wb)
    else:
        raise ValueError(library)
    call()  # warm-up: thread pool, kernel selection, oneDNN's primitive cache
    rates, spent = [], 0.0
    for _ in range(repeats):
        seconds, _ = timed(call)
        rates.append(2 * rows * d_in * d_out / seconds / 1e9)
        spent += seconds
        if spent > budget_s:
            break
    return statistics.median(rates)


# The probes of the machine's limit: (label, rows, d_in, d_out, library). The square product is
# the classic probe; the others are the shapes of a training step (4096 rows: a ~4k-token batch).
PROBES = [("2048 × 2048 × 2048", 2048, 2048, 2048), ("4096 × 512 × 2048", 4096, 512, 2048),
          ("4096 × 2048 × 512", 4096, 2048, 512)]
LIBRARIES = ["mkl-fp32", "onednn-fp32", "onednn-bf16"]


def probe_limits(repeats: int, log=None) -> dict[tuple[str, str], float]:
    """GFLOP/s of every probe shape in every library (bf16 only where native: emulated it takes
    minutes): {(shape label, library): GFLOP/s}. The limit of a precision is its best entry."""
    native = bf16_supported()
    out = {}
    for label, rows, d_in, d_out in PROBES:
        for library in LIBRARIES:
            if library.endswith("bf16") and not native:
                continue
            out[(label, library)] = linear_gflops(rows, d_in, d_out, library, repeats)
        if log is not None:
            log(f"probe {label}: " + ", ".join(f"{lib} {out[(label, lib)]:.0f}" for lib in LIBRARIES
                                               if (label, lib) in out) + " GFLOP/s")
    return out


def best_limit(probes: dict[tuple[str, str], float], precision: str) -> tuple[float, str]:
    """The best probe of a precision ("fp32" or "bf16"): (GFLOP/s, "shape, library")."""
    entries = [(v, f"{shape}, {lib}") for (shape, lib), v in probes.items() if lib.endswith(precision)]
    return max(entries) if entries else (float("nan"), "not measured")


# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # an absent or broken package is reported, not fatal
        return f"unavailable ({type(e).__name__})"


def _allocator() -> str:
    from aiayn.allocator import active

    return active()


def machine_description() -> dict[str, str]:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags]
    from aiayn.precision import cpu_arithmetic, resolve_precision
    info = {
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": _cpu_model(),
        "logical CPUs": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "ISA flags": ", ".join(isa) or "none of avx2/avx512/amx",
        "ISA torch uses": torch.backends.cpu.get_cpu_capability()
        + (f" (ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']})" if os.environ.get("ATEN_CPU_CAPABILITY") else ""),
        "bf16": cpu_arithmetic().describe() + f"; precision auto resolves to {resolve_precision('auto', torch.device('cpu'))}",
        "memory allocator": _allocator(),
        "memory": f"{_mem_total_gib():.1f} GiB",
        "GPU": "none (no GPU is available to this task through the device tool)",
        "OS": platform.platform(),
        "load average at start": load_average(),
        "Python": platform.python_version(),
        "aiayn": f"{_version('aiayn')} (git {_git_commit()})",
        "torch": f"{torch.__version__} (BLAS: {'MKL' if torch.backends.mkl.is_available() else 'other'}, "
        f"oneDNN: {torch.backends.mkldnn.is_available()})",
        "transformers": _version("transformers"),
        "ctranslate2": _version("ctranslate2"),
        "numpy": _version("numpy"),
    }
    return info


# -- report formatting shared by RESULTS.md (report.py, workload.py) and SERVE.md (serve.py) ---------


def fmt(x: float, digits: int = 3) -> str:
    """A figure to ``digits`` significant digits; NaN (not measured) as a dash."""
    return "–" if x != x else f"{x:.{digits}g}"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as the machine table records them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_table(machine: dict[str, str]) -> list[str]:
    """The "Machine and versions" section of a report: a heading and a two-column table."""
    return ["## Machine and versions", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in machine.items()]]
