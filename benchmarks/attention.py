"""The measured form of the paper's Table 1: cost of one layer as the sequence grows.

Per layer of width d (the paper's base d = 512, h = 8), batch 1, forward pass, one thread,
n positions:

    self-attention      O(n²·d)   fused: F.scaled_dot_product_attention, never stores the n×n
                                  probabilities; explicit: softmax(QKᵀ/√d_k)V with them stored
                                  (aiayn's ``need_weights=True`` path)
    recurrent (LSTM)    O(n·d²)   n sequential steps
    convolutional       O(k·n·d²) kernel width k = 3

Each point (layer, n) runs in a fresh subprocess: ``python benchmarks/attention.py LAYER N``.

Time: median over 3 to 200 timed calls after one warm-up call: more calls while they are quick,
stopping after 3 once a per-point budget is spent. Memory: on the CPU there is no allocator accounting like torch.cuda's, so the
point measures the process's peak resident set: after the warm-up it returns freed memory to
the OS (glibc ``malloc_trim``), resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs resets VmHWM to the current RSS), runs one call, and reports
VmHWM − RSS-before: the memory the call itself touched at its peak (its temporaries and its
output), in MiB.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LAYERS = ["self-attention (fused)", "self-attention (explicit)", "recurrent (LSTM)", "convolutional (k=3)"]
LAYER_KEYS = {"fused": LAYERS[0], "explicit": LAYERS[1], "lstm": LAYERS[2], "conv": LAYERS[3]}


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure_point(layer: str, n: int, d: int, heads: int, budget_s: float) -> dict:
    """Run inside the subprocess: time and peak memory of one layer at length n."""
    import torch
    from torch import nn

    from aiayn.model import MultiHeadAttention

    # One thread: Table 1 compares amounts of work, and a single thread measures work without
    # thread-pool synchronisation, which dominates short calls when other processes share the cores.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if layer in ("fused", "explicit"):
        module = MultiHeadAttention(d, heads, d // heads, self_attention=True).eval()
        x = torch.randn(1, n, d)
        need = layer == "explicit"
        call = lambda: module(x, need_weights=need)  # noqa: E731
    elif layer == "lstm":
        module = nn.LSTM(d, d, batch_first=True).eval()
        x = torch.randn(1, n, d)
        call = lambda: module(x)  # noqa: E731
    elif layer == "conv":
        module = nn.Conv1d(d, d, kernel_size=3, padding=1).eval()
        x = torch.randn(1, d, n)
        call = lambda: module(x)  # noqa: E731
    else:
        raise ValueError(layer)

    libc = ctypes.CDLL("libc.so.6")
    with torch.inference_mode():
        call()  # warm-up
        times = []
        spent = 0.0
        for _ in range(200):  # at least 3 calls, more while they are quick (short points are noisy)
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
            spent += times[-1]
            if len(times) >= 3 and spent > budget_s:
                break
        libc.malloc_trim(0)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        out = call()
        peak = _status_kib("VmHWM")
        del out
    return {"layer": LAYER_KEYS[layer], "n": n, "seconds": statistics.median(times), "repeats": len(times),
            "peak_mib": max(peak - before, 0) / 1024}


@dataclass
class AttentionResult:
    d: int
    heads: int
    points: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _glibc_env() -> dict[str, str]:
    """The environment without a preloaded allocator: the peak-memory measure relies on glibc
    (malloc_trim hands freed memory back, so RSS growth is the call's); tcmalloc keeps freed
    memory mapped, and under it the explicit path's 4 GiB at n = 8192 measured as 16 MiB."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["AIAYN_ALLOCATOR"] = "system"
    return env


def run_attention(lengths: list[int], d: int, heads: int, budget_s: float, timeout_s: float,
                  max_explicit_gib: float, log) -> AttentionResult:
    result = AttentionResult(d, heads)
    for n in lengths:
        for key, layer in LAYER_KEYS.items():
            # The explicit path holds a few h·n² fp32 tensors at once (scores, probabilities).
            predicted_gib = 3 * heads * n * n * 4 / 2**30
            if key == "explicit" and predicted_gib > max_explicit_gib:
                result.skipped.append(f"{layer} at n={n}: ~{predicted_gib:.0f} GiB predicted, over the {max_explicit_gib:g} GiB cap")
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), key, str(n), str(d), str(heads), str(budget_s)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_glibc_env())
            except subprocess.TimeoutExpired:
                result.skipped.append(f"{layer} at n={n}: over the {timeout_s:g} s cap")
                continue
            if proc.returncode != 0:
                result.skipped.append(f"{layer} at n={n}: failed ({proc.stderr.strip().splitlines()[-1:]})")
                continue
            point = json.loads(proc.stdout.strip().splitlines()[-1])
            result.points.append(point)
            log(f"attention n={n} {layer}: {point['seconds'] * 1e3:.1f} ms, {point['peak_mib']:.0f} MiB")
    return result


if __name__ == "__main__":
    key, n, d, heads, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    print(json.dumps(measure_point(key, n, d, heads, budget)))
