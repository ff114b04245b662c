"""RESULTS.md and the PNG plots, from the figures measured in this run (nothing is copied in)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from attention import LAYERS, AttentionResult  # noqa: E402
from common import LIBRARIES, Series, best_limit, fmt, machine_table, paired_ratio  # noqa: E402
from demo_training import BASELINE_COMMIT, ONEDNN_SUFFIX, DemoTrainingResult  # noqa: E402
from inference import SINGLE_SENTENCES, SYSTEMS, InferenceResult  # noqa: E402
from training import TrainingResult  # noqa: E402

# CTranslate2 at its two thread settings (the same threads as aiayn, and one thread).
BEST_CT2 = {"fp32": ["CT2 float32", "CT2 float32, 1 thread"], "int8": ["CT2 int8", "CT2 int8, 1 thread"]}

TRAIN_PEERS = ["nn.Transformer", "HF Marian"]


def _verdict(value: float, target: float) -> str:
    return f"**{fmt(value)}×** (target ≥ {target:g}×: {'met' if value >= target else 'not met'})"


def write(out: Path, machine: dict, probes: dict[str, Series], bf16_native: bool, demo: DemoTrainingResult | None,
          train: list[TrainingResult], infer: InferenceResult | None, attn: AttentionResult | None, quick: bool,
          workload=None, threads: int = 0, limits: dict | None = None) -> None:
    lines: list[str] = ["# aiayn benchmarks", ""]
    if quick:
        lines += ["> **Smoke run (`--quick`)**: tiny sizes and few repeats; the figures only show that the suite works.", ""]
    lines += [
        "Written by `make bench` (`python benchmarks/run.py`). Every figure below was measured in the one run",
        "that wrote this file: the systems compared alternate round by round (CTranslate2 in a child process,",
        "the others in this one; `benchmarks/ct2_process.py` says why), each figure is",
        "the median over rounds (the min–max range shows the noise), and each ratio is the median of the",
        "per-round ratios. Raw values: `results.json`.",
        "",
    ]
    lines += machine_table(machine)
    lines += ["", "No GPU is available to this task through the device tool, so the suite ran on the CPU only;",
              "there is no separate GPU record.", ""]
    load = machine.get("load average at start", "")
    if load and float(load.split()[0]) > 1.0:
        lines += ["The load average was above 1 when the run started (other work running, or just finished; see",
                  "the load averages): single figures may be noisy, as their min–max ranges show; the ratios pair",
                  "systems measured side by side.", ""]
    lines += _summary(demo, train, infer, threads)

    # 1. matmul --------------------------------------------------------------------------------
    lines += ["## 1. The machine's limit: matmul", ""]
    if probes.get("fp32 (start)") and probes["fp32 (start)"].values:
        lines += [
            "Dense n×n·n×n matmul on all torch threads, 2n³ FLOPs, median GFLOP/s:",
            "",
            "| probe | GFLOP/s (median) | range |",
            "|---|---|---|",
            f"| fp32, n = 2048, start of run | {fmt(probes['fp32 (start)'].median, 4)} | {probes['fp32 (start)'].spread()} |",
        ]
        for r in train:
            lines.append(f"| fp32, n = 2048, during `{r.config}` training | {fmt(r.peak_gflops.median, 4)} | {r.peak_gflops.spread()} |")
            if r.peak_onednn_gflops.values:
                lines.append(f"| fp32 (oneDNN), 4096 × 512 × 2048, during `{r.config}` training | "
                             f"{fmt(r.peak_onednn_gflops.median, 4)} | {r.peak_onednn_gflops.spread()} |")
            if r.peak_bf16_gflops.values:
                lines.append(f"| bf16 (oneDNN), 4096 × 512 × 2048, during `{r.config}` training | "
                             f"{fmt(r.peak_bf16_gflops.median, 4)} | {r.peak_bf16_gflops.spread()} |")
        if probes.get("fp32 (end)") and probes["fp32 (end)"].values:
            lines.append(f"| fp32, n = 2048, end of run | {fmt(probes['fp32 (end)'].median, 4)} | {probes['fp32 (end)'].spread()} |")
        lines += [
            "",
            f"Native bf16 (AVX512-BF16/AMX that torch may use) on this CPU: {'yes' if bf16_native else 'no'}"
            + ("; the bf16 systems below run only where it is (emulated bf16 is far slower than fp32)." if not bf16_native
               else "; the bf16 systems below are what `precision: auto` runs here."),
            "",
        ]
    if limits:
        libraries = [lib for lib in LIBRARIES if any(key[1] == lib for key in limits)]
        shapes = list(dict.fromkeys(shape for shape, _ in limits))
        lines += [
            "Each precision and library (y = x Wᵀ, rows × in × out; `mkl-fp32`: F.linear in fp32, which torch hands",
            "to MKL; `onednn-fp32`: oneDNN's linear on the plain weight, as training would call it;",
            "`onednn-bf16`: F.linear in bf16, which torch hands to oneDNN, on AMX tiles where the CPU has them):",
            "",
            "| product | " + " | ".join(libraries) + " |",
            "|---|" + "---|" * len(libraries),
        ]
        for shape in shapes:
            lines.append(f"| {shape} | " + " | ".join(fmt(limits[(shape, lib)], 4) if (shape, lib) in limits else "–"
                                                      for lib in libraries) + " |")
        for precision in ("fp32", "bf16"):
            value, where = best_limit(limits, precision)
            if value == value:
                lines.append(f"\nBest {precision} probe: {fmt(value, 4)} GFLOP/s ({where}).")
        lines.append("")

    # 2. training -------------------------------------------------------------------------------
    if demo is not None:
        lines += _demo_section(demo)
    if train:
        lines += ["## 2. Training throughput", "",
                  "One step = forward, label-smoothed cross-entropy, backward, Adam, dropout 0.1 on; the same random",
                  "batch for every system. MFU = model FLOPs per second (formula in `benchmarks/training.py`)",
                  "over the best matmul probe of the system's precision measured in the same rounds (fp32: the",
                  "faster of n = 2048 through MKL and 4096 × 512 × 2048 through oneDNN; bf16: 4096 × 512 × 2048",
                  "through oneDNN). HF Marian runs the aiayn weights (exported);",
                  "nn.Transformer has its own initialisation and the same sizes. The bf16 rows (where the CPU has",
                  "native bf16): aiayn as `aiayn train` runs under `precision: auto` (autocast, fp32 master weights,",
                  "explicit attention), HF Marian under the same autocast.", ""]
        for r in train:
            lines += [
                f"### `{r.config}`: {r.sentences} sentences, {r.target_tokens} target tokens per batch "
                f"(padded {r.src_len} source × {r.tgt_len} target positions), {r.flops_per_step / 1e12:.2f} TFLOP per step",
                "",
                "| system | target tokens/s | range | MFU | aiayn ÷ system |",
                "|---|---|---|---|---|",
            ]
            for system, series in r.tokens_per_s.items():
                ratio = "1" if system == "aiayn" else fmt(r.ratio("aiayn", system))
                lines.append(f"| {system} | {fmt(series.median, 4)} | {series.spread()} | {r.mfu(system):.2f} | {ratio} |")
            if "aiayn bf16" in r.tokens_per_s:
                lines += ["", f"- aiayn bf16 vs aiayn fp32: {_verdict(r.ratio('aiayn bf16', 'aiayn'), 2.0)}",
                          f"- aiayn bf16 vs HF Marian bf16: {_verdict(r.ratio('aiayn bf16', 'HF Marian bf16'), 1.5)}",
                          f"- aiayn bf16 MFU: **{r.mfu('aiayn bf16'):.2f}** of the same-run bf16 probe (target ≥ 0.5: "
                          f"{'met' if r.mfu('aiayn bf16') >= 0.5 else 'not met'})"]
            lines += ["", f"- aiayn vs Hugging Face Marian: {_verdict(r.ratio('aiayn', 'HF Marian'), TRAIN_PEER_TARGET)}",
                      f"- aiayn vs nn.Transformer: {_verdict(r.ratio('aiayn', 'nn.Transformer'), TRAIN_PEER_TARGET)}",
                      f"- aiayn MFU: **{r.mfu('aiayn'):.2f}** of the same-run best fp32 probe"
                      + (f" (target ≥ {MFU_TARGET[r.config]}: {'met' if r.mfu('aiayn') >= MFU_TARGET[r.config] else 'not met'})"
                         if r.config in MFU_TARGET else "")]
            if r.fp32_products:
                lines.append(f"- aiayn fp32: {r.fp32_products} (`train.fp32_products: auto`, as `aiayn train` chooses)")
            lines.append("")
        _plot_training(out / "training.png", train)
        lines += ["![training throughput](training.png)", ""]

    # 3. inference ------------------------------------------------------------------------------
    if infer:
        batches = sorted({b for (_, _, b) in infer.tokens_per_s})
        lines += [
            "## 3. Inference", "",
            f"Model `{infer.config}` with random weights, all systems on the same weights (aiayn exported to the",
            "Marian layout; CTranslate2 converts that directory with its stock converter). </s>, <s> and pad are made",
            f"unreachable (`benchmarks/peers.py`), so every system decodes exactly {infer.steps} steps per sentence and",
            "the work is equal; generated tokens are counted from each system's actual output.",
            f"Sources: 20–30 random subwords + </s>; batch 1 is {SINGLE_SENTENCES} sentences per system and round, one search call",
            "each (times summed). Threads: all torch threads; CTranslate2 `intra_threads` the same,",
            "in a process of its own (`benchmarks/ct2_process.py`: in this one it would slow the torch systems down).",
            f"HF attention implementation: `{infer.hf_attention}`. Beam search: 4 beams, length penalty α = 0.6 in",
            "each system's own form. All hypotheses have the same length, yet beam outputs can differ: aiayn's",
            "end with the forced </s>, whose probability counts in the final ranking; the peers' stop at the limit.",
            "",
            "Same function, checked in this run:",
            "",
            f"- teacher-forced logits, aiayn vs HF Marian: max |difference| = {infer.max_logit_diff:.2e}",
            f"- outputs whose first {infer.steps - 1} tokens equal aiayn fp32's (batch of the largest size): "
            + ", ".join(f"{s}: greedy {infer.greedy_agreement[s]:.0%}, beam-4 {infer.beam_agreement[s]:.0%}" for s in SYSTEMS[1:]),
            "- every output had the full length: " + ", ".join(f"{s}: {'yes' if ok else 'NO'}" for s, ok in infer.lengths_ok.items()),
            "",
            "(int8 systems quantise differently — aiayn: torch dynamic per-channel int8 Linear layers;",
            "CTranslate2: its int8 GEMM — so their outputs may differ from fp32 after a near tie.)",
            "",
            "Generated tokens/s (median over rounds; range in results.json):",
            "",
            "| search | batch | " + " | ".join(SYSTEMS) + " |",
            "|---|---|" + "---|" * len(SYSTEMS),
        ]
        for search in ("greedy", "beam4"):
            for b in batches:
                lines.append(f"| {search} | {b} | " + " | ".join(fmt(infer.median(s, search, b), 4) for s in SYSTEMS) + " |")
        lines += ["", "Ratios (aiayn ÷ peer, median of per-round ratios; \"best CT2\": the faster of CTranslate2 on the",
                  "same threads and on one thread, in each round):", "",
                  "| search | batch | aiayn fp32 ÷ HF | aiayn fp32 ÷ CT2 float32 | aiayn int8 ÷ CT2 int8 "
                  "| aiayn fp32 ÷ best CT2 float32 | aiayn int8 ÷ best CT2 int8 | aiayn int8 ÷ aiayn fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        for search in ("greedy", "beam4"):
            for b in batches:
                lines.append(f"| {search} | {b} | {fmt(infer.ratio('aiayn fp32', 'HF generate', search, b))} | "
                             f"{fmt(infer.ratio('aiayn fp32', 'CT2 float32', search, b))} | "
                             f"{fmt(infer.ratio('aiayn int8', 'CT2 int8', search, b))} | "
                             f"{fmt(infer.ratio_best('aiayn fp32', BEST_CT2['fp32'], search, b))} | "
                             f"{fmt(infer.ratio_best('aiayn int8', BEST_CT2['int8'], search, b))} | "
                             f"{fmt(infer.ratio('aiayn int8', 'aiayn fp32', search, b))} |")
        lines.append("")
        for b in batches:
            lines.append(f"- beam-4 at batch {b}, aiayn fp32 vs HF `generate`: {_verdict(infer.ratio('aiayn fp32', 'HF generate', 'beam4', b), 3.0)}")
        if "aiayn bf16" in SYSTEMS:
            lines += ["", "bf16 (`precision: auto` on this CPU: bf16 products, the kept logits rescored in fp32; `aiayn.inference.packed`),",
                      "against aiayn fp32 and against CTranslate2's best CPU setting in each round (float32 or int8, its",
                      f"{threads} or 1 threads; CTranslate2 has no bf16 on CPUs):", ""]
            for b in batches:
                for search, label in (("greedy", "greedy"), ("beam4", "beam-4")):
                    best = infer.ratio_best("aiayn bf16", BEST_CT2["fp32"] + BEST_CT2["int8"], search, b)
                    lines.append(f"- {label}, batch {b}: aiayn bf16 ÷ aiayn fp32 "
                                 f"{fmt(infer.ratio('aiayn bf16', 'aiayn fp32', search, b))}, ÷ best CT2 {fmt(best)}")
        lines.append("")
        _plot_inference(out / "inference.png", infer, batches)
        lines += ["![inference throughput](inference.png)", ""]

    # 4. attention ------------------------------------------------------------------------------
    if attn:
        ns = sorted({p["n"] for p in attn.points})
        lines += [
            "## 4. Cost of one layer as the sequence grows (Table 1, measured)", "",
            f"Width d = {attn.d} (h = {attn.heads} for attention), batch 1, forward pass, one thread. Table 1's per-layer "
            "complexity: self-attention O(n²·d), recurrent O(n·d²), convolutional O(k·n·d²).",
            "Time: median of 3–200 calls (as many as fit in 3 s) after a warm-up, one fresh process per point. Peak memory: the",
            "call's peak resident-set growth (no CPU allocator statistics exist): freed memory is returned to the",
            "OS with `malloc_trim`, the kernel's peak-RSS counter is reset through /proc/self/clear_refs, and",
            "VmHWM − RSS before the call is reported (`benchmarks/attention.py`).", "",
        ]
        by = {(p["layer"], p["n"]): p for p in attn.points}
        for title, key, scale in (("Time per forward pass, ms", "seconds", 1e3), ("Peak memory growth, MiB", "peak_mib", 1.0)):
            lines += [f"{title}:", "", "| n | " + " | ".join(LAYERS) + " |", "|---|" + "---|" * len(LAYERS)]
            for n in ns:
                cells = [fmt(by[(layer, n)][key] * scale, 4) if (layer, n) in by else "–" for layer in LAYERS]
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            lines.append("")
        if attn.skipped:
            lines += ["", "Not measured: " + "; ".join(attn.skipped) + "."]
        lines.append("")
        _plot_attention(out / "attention.png", attn)
        lines += ["![attention cost](attention.png)", ""]

    # 5. a real workload -----------------------------------------------------------------------
    if workload:
        import workload as workload_section

        lines += workload_section.report_lines(workload, threads)

    (out / "RESULTS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# The targets of the training-speed issue.
DEMO_TARGET = 2.0  # demo-size tokens/s, now ÷ before
TRAIN_PEER_TARGET = 1.5  # small and base, aiayn ÷ nn.Transformer and ÷ HF Marian, same allocator
MFU_TARGET = {"small": 0.6, "base": 0.75}


def _demo_names(demo: DemoTrainingResult) -> tuple[str, str]:
    """(before as users ran it, now as users run it): the glibc baseline, the fast-allocator present
    (in bf16 where the CPU has it natively: what precision auto runs there; else the faster of its
    fp32 through MKL and through oneDNN, as ``train.fp32_products: auto`` picks by measuring)."""
    before = next(n for n in demo.tokens_per_s if n.startswith("commit") and n.endswith("glibc malloc"))
    now = [n for n in demo.tokens_per_s if n.startswith("now")]
    bf16 = [n for n in now if n.endswith("bf16")]
    if bf16:
        return before, bf16[0]
    fp32 = [n for n in _demo_fp32_names(demo) if n is not None] or now[-1:]
    return before, max(fp32, key=lambda n: Series(demo.tokens_per_s[n]).median)


def _demo_section(demo: DemoTrainingResult) -> list[str]:
    lines = ["## 2a. Demo-size training: now against the code before the speed work", ""]
    if demo.error or not demo.tokens_per_s:
        return lines + [f"Not measured: {demo.error or 'no worker answered'}.", ""]
    before, now = _demo_names(demo)
    info = next(iter(demo.systems.values()))
    lines += [
        f"The demo's model and recipe (`{demo.config}`, {info['parameters']:,} parameters) on the demo's data",
        f"(`{Path(demo.data).name}`, real length-bucketed batches), {info['threads']} torch threads. The worker processes",
        f"take turns, {demo.updates_per_turn} updates per turn, {demo.rounds} rounds: the code of commit {BASELINE_COMMIT}",
        "(unpacked from git: the last commit before the speed work) and today's code, each under glibc's malloc and",
        f"under the fast allocator aiayn now preloads ({demo.fast_allocator}). Target tokens per wall second (`benchmarks/demo_training.py`).",
        "",
        "| code, allocator | target tokens/s (median) | range | ÷ before (glibc) |",
        "|---|---|---|---|",
    ]
    for name, values in demo.tokens_per_s.items():
        series = Series(values)
        ratio = "1" if name == before else fmt(paired_ratio(series, Series(demo.tokens_per_s[before])))
        lines.append(f"| {name} (allocator: {demo.systems[name]['allocator']}) | {fmt(series.median, 4)} | {series.spread()} | {ratio} |")
    gain = paired_ratio(Series(demo.tokens_per_s[now]), Series(demo.tokens_per_s[before]))
    lines += ["", f"- now vs before, as users run them: {_verdict(gain, DEMO_TARGET)}"]
    fp32_now, onednn_now = _demo_fp32_names(demo)
    if now.endswith("bf16") and fp32_now:
        bf16_gain = paired_ratio(Series(demo.tokens_per_s[now]), Series(demo.tokens_per_s[fp32_now]))
        lines.append(f"- bf16 (precision auto here) vs fp32, today's code: {_verdict(bf16_gain, 2.0)}")
    if fp32_now and onednn_now:
        onednn_gain = paired_ratio(Series(demo.tokens_per_s[onednn_now]), Series(demo.tokens_per_s[fp32_now]))
        lines.append(f"- fp32 through oneDNN vs fp32 through MKL, today's code: **{fmt(onednn_gain)}×** "
                     "(`train.fp32_products: auto` takes oneDNN where a product of the model's shape runs in at most "
                     "0.9 of MKL's time)")
        if now.endswith("bf16"):
            vs = paired_ratio(Series(demo.tokens_per_s[now]), Series(demo.tokens_per_s[onednn_now]))
            lines.append(f"- bf16 vs fp32 through oneDNN, today's code: **{fmt(vs)}×**")
    return lines + [""]


def _demo_fp32_names(demo: DemoTrainingResult) -> tuple[str | None, str | None]:
    """Today's fp32 worker through MKL (PyTorch's default) and through oneDNN, where measured."""
    now = [n for n in demo.tokens_per_s if n.startswith("now")]
    mkl = next((n for n in now if n.endswith(demo.fast_allocator)), None)
    onednn = next((n for n in now if n.endswith(ONEDNN_SUFFIX)), None)
    return mkl, onednn


def _summary(demo: DemoTrainingResult | None, train: list[TrainingResult], infer: InferenceResult | None,
             threads: int) -> list[str]:
    """The issue's targets, each a ratio measured in this run (aiayn ÷ peer; > 1: aiayn faster)."""
    rows = []
    if demo is not None and demo.tokens_per_s:
        before, now = _demo_names(demo)
        gain = paired_ratio(Series(demo.tokens_per_s[now]), Series(demo.tokens_per_s[before]))
        rows.append(f"| demo-size training, target tokens/s | aiayn before ({BASELINE_COMMIT}) | ≥ {DEMO_TARGET:g} | {fmt(gain)} |")
        fp32_now, onednn_now = _demo_fp32_names(demo)
        if now.endswith("bf16") and fp32_now:
            rows.append(f"| demo-size training, bf16, target tokens/s | aiayn fp32 today | ≥ 2 | "
                        f"{fmt(paired_ratio(Series(demo.tokens_per_s[now]), Series(demo.tokens_per_s[fp32_now])))} |")
        if fp32_now and onednn_now:
            rows.append(f"| demo-size training, fp32 through oneDNN, target tokens/s | aiayn fp32 through MKL | – | "
                        f"{fmt(paired_ratio(Series(demo.tokens_per_s[onednn_now]), Series(demo.tokens_per_s[fp32_now])))} |")
    for r in train:
        rows.append(f"| training `{r.config}`, target tokens/s | HF Marian | ≥ {TRAIN_PEER_TARGET:g} | {fmt(r.ratio('aiayn', 'HF Marian'))} |")
        rows.append(f"| training `{r.config}`, target tokens/s | nn.Transformer | ≥ {TRAIN_PEER_TARGET:g} | {fmt(r.ratio('aiayn', 'nn.Transformer'))} |")
        if r.config in MFU_TARGET:
            rows.append(f"| training `{r.config}`, MFU | the best fp32 probe | ≥ {MFU_TARGET[r.config]:g} | {r.mfu('aiayn'):.2f} |")
        if "aiayn bf16" in r.tokens_per_s:
            rows.append(f"| training `{r.config}`, bf16, target tokens/s | aiayn fp32 | ≥ 2 | {fmt(r.ratio('aiayn bf16', 'aiayn'))} |")
            rows.append(f"| training `{r.config}`, bf16, target tokens/s | HF Marian bf16 | ≥ 1.5 | "
                        f"{fmt(r.ratio('aiayn bf16', 'HF Marian bf16'))} |")
            rows.append(f"| training `{r.config}`, bf16, MFU | the bf16 probe | ≥ 0.5 | {r.mfu('aiayn bf16'):.2f} |")
    if infer and "aiayn bf16" in SYSTEMS:
        for b, target in ((64, 2.0), (1, 1.5)):
            if ("aiayn bf16", "beam4", b) in infer.tokens_per_s:
                best = infer.ratio_best("aiayn bf16", BEST_CT2["fp32"] + BEST_CT2["int8"], "beam4", b)
                rows.append(f"| beam-4 decoding, batch {b}, bf16 | CTranslate2's best CPU setting | ≥ {target:g} | {fmt(best)} |")
    if infer:
        for b in sorted({b for (_, _, b) in infer.tokens_per_s}):
            rows.append(f"| beam-4 decoding, batch {b}, fp32 | HF `generate` | ≥ 3 | {fmt(infer.ratio('aiayn fp32', 'HF generate', 'beam4', b))} |")
            for search, name in (("greedy", "greedy"), ("beam4", "beam-4")):
                rows.append(f"| {name} decoding, batch {b}, fp32 | CTranslate2 float32 | ≥ 1 | {fmt(infer.ratio('aiayn fp32', 'CT2 float32', search, b))} |")
                rows.append(f"| {name} decoding, batch {b}, int8 | CTranslate2 int8 | ≥ 1 | {fmt(infer.ratio('aiayn int8', 'CT2 int8', search, b))} |")
                for kind, peer in (("fp32", "float32"), ("int8", "int8")):
                    rows.append(f"| {name} decoding, batch {b}, {kind} | CTranslate2 {peer}, the faster of its "
                                f"{threads} and 1 threads | ≥ 1 | "
                                f"{fmt(infer.ratio_best(f'aiayn {kind}', BEST_CT2[kind], search, b))} |")
    if not rows:
        return []
    return ["## Summary: aiayn ÷ peer", "", "| measure | peer | target | measured |", "|---|---|---|---|", *rows, ""]


def _plot_training(path: Path, train: list[TrainingResult]) -> None:
    fig, axes = plt.subplots(1, len(train), figsize=(5 * len(train), 3.8), squeeze=False)
    for ax, r in zip(axes[0], train):
        systems = list(r.tokens_per_s)
        values = [r.tokens_per_s[s].median for s in systems]
        lows = [v - min(r.tokens_per_s[s].values) for s, v in zip(systems, values)]
        highs = [max(r.tokens_per_s[s].values) - v for s, v in zip(systems, values)]
        palette = {"aiayn": "tab:blue", "nn.Transformer": "tab:gray", "HF Marian": "tab:orange",
                   "aiayn bf16": "tab:purple", "HF Marian bf16": "tab:brown"}
        ax.bar(systems, values, yerr=[lows, highs], color=[palette.get(s, "tab:gray") for s in systems], capsize=4)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        for i, s in enumerate(systems):
            ax.text(i, values[i], f" MFU {r.mfu(s):.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"training, {r.config} (~{r.target_tokens} target tokens/batch)")
        ax.set_ylabel("target tokens/s (median, min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_inference(path: Path, infer: InferenceResult, batches: list[int]) -> None:
    panels = [(s, b) for s in ("greedy", "beam4") for b in batches]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    palette = {"aiayn fp32": "tab:blue", "aiayn bf16": "tab:purple", "aiayn int8": "tab:cyan", "HF generate": "tab:orange"}
    colors = [palette.get(s, "tab:green" if "float32" in s else "tab:olive") for s in SYSTEMS]
    for ax, (search, b) in zip(axes[0], panels):
        values = [infer.median(s, search, b) for s in SYSTEMS]
        ax.bar(range(len(SYSTEMS)), values, color=colors)
        ax.set_xticks(range(len(SYSTEMS)), SYSTEMS, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{search}, batch {b}")
        ax.set_ylabel("generated tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_attention(path: Path, attn: AttentionResult) -> None:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for layer, marker in zip(LAYERS, "osD^"):
        pts = sorted((p["n"], p["seconds"], p["peak_mib"]) for p in attn.points if p["layer"] == layer)
        if not pts:
            continue
        n, t, m = zip(*pts)
        ax_t.plot(n, [x * 1e3 for x in t], marker=marker, label=layer)
        ax_m.plot(n, m, marker=marker, label=layer)
    for ax, label in ((ax_t, "time per forward pass (ms)"), (ax_m, "peak memory growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_t.set_title(f"one layer, d = {attn.d}, batch 1")
    ax_m.set_title("memory (resident-set peak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
