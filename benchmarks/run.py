"""`make bench`: measure aiayn against its peers on this machine, write RESULTS.md and plots.

    python benchmarks/run.py            the full suite (about 20 minutes on 2 cores)
    python benchmarks/run.py --quick    a smoke run with tiny sizes (about 2 minutes)

Sections: (1) the machine's matmul limit, (2) training throughput and MFU, (3) greedy and
beam-4 decoding speed, (4) the cost of one layer as the sequence grows (Table 1, measured),
(5) a real workload: a trained model translating a test set (sentences/s and BLEU).
Every figure comes from this one run: systems alternate round by round in one process, the
figures are medians over rounds, and comparisons are medians of per-round ratios (common.py).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if __name__ == "__main__":
    # Every system measured here runs under the same fast allocator (tcmalloc/jemalloc) that
    # the aiayn command uses, so ratios measure code, not malloc (aiayn.allocator).
    from aiayn.allocator import reexec_with_fast_allocator

    reexec_with_fast_allocator()

import torch  # noqa: E402

from common import Series, bf16_supported, load_average, machine_description, matmul_gflops, probe_limits  # noqa: E402

# Sizes of the full suite and of --quick. Training batches hold about 4k target tokens
# (136 sentences of 26-34 subwords + </s>), the paper's 25k-token batches scaled to 2 cores.
FULL = dict(demo=(5, 20), train=[("small", 136, 26, 34, 5), ("base", 136, 26, 34, 3)], infer="base",
            batches=[1, 64], steps=24, infer_rounds=5, lengths=[128, 256, 512, 1024, 2048, 4096, 8192],
            probe_repeats=10, workload=(500, 3, 3.0))
QUICK = dict(demo=(2, 3), train=[("tiny", 16, 6, 10, 2)], infer="tiny", batches=[1, 8], steps=8, infer_rounds=2,
             lengths=[128, 256, 512], probe_repeats=3, workload=(64, 1, 0.3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke run")
    parser.add_argument("--out", help="output directory (default: benchmarks/, or a temporary one with --quick)")
    parser.add_argument("--sections", default="probe,demo,training,inference,attention,workload",
                        help="comma-separated subset of probe,demo,training,inference,attention,workload")
    parser.add_argument("--workload-checkpoint", help="workload section: a trained checkpoint (default: train a "
                        "quick one on the demo's data)")
    parser.add_argument("--workload-src", help="workload section: source test file (default: the demo data's test.src)")
    parser.add_argument("--workload-ref", help="workload section: reference file (default: the demo data's test.tgt)")
    parser.add_argument("--workload-sentences", type=int, help="workload section: sentences translated per pass")
    parser.add_argument("--workload-minutes", type=float, help="workload section: training minutes of the quick model")
    parser.add_argument("--workload-shortlist", help="workload section: a vocabulary shortlist for the model (aiayn "
                                                     "shortlist; default: built here for the quick model, none otherwise)")
    parser.add_argument("--data", help="demo section: the demo's prepared dataset (default: prepare it into "
                        "~/.cache/aiayn/bench/lo-en-de, fetching the LibreOffice help packages once)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="aiayn-bench-quick-")) if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    threads = torch.get_num_threads()
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    machine = machine_description()
    log("machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()))
    results: dict = {"machine": machine, "quick": args.quick, "sizes": sizes}

    probes = {"fp32 (start)": Series()}
    limits: dict = {}
    if "probe" in sections:
        for _ in range(3):
            probes["fp32 (start)"].add(matmul_gflops(2048, torch.float32, repeats=sizes["probe_repeats"]))
        log(f"matmul fp32 {probes['fp32 (start)'].median:.1f} GFLOP/s")
        # Each precision and library (bf16 only where native: emulated, it would take minutes).
        limits = probe_limits(sizes["probe_repeats"], log)

    demo_result = None
    if "demo" in sections:
        import demo_training  # noqa: E402

        data_dir = _demo_data(args.data, log)
        if data_dir is not None:
            rounds, updates = sizes["demo"]
            from aiayn.demo import config_path

            demo_result = demo_training.run_demo_training(data_dir, config_path(), rounds, updates, log)

    import attention  # noqa: E402
    import inference  # noqa: E402
    import report  # noqa: E402
    import training  # noqa: E402  (imports aiayn, transformers)

    train_results, infer_result, attn_result, workload_result = [], None, None, None
    with tempfile.TemporaryDirectory(prefix="aiayn-bench-") as tmp:
        work = Path(tmp)
        if "training" in sections:
            for name, sentences, lo, hi, rounds in sizes["train"]:
                train_results.append(training.run_training(name, sentences, lo, hi, rounds, work, log))
        if "inference" in sections:
            infer_result = inference.run_inference(sizes["infer"], sizes["batches"], sizes["steps"],
                                                   sizes["infer_rounds"], work, threads, log)
        if "workload" in sections:
            workload_result = _workload(args, sizes, work, threads, log)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the models' memory back before the n² points
    if "attention" in sections:
        attn_result = attention.run_attention(sizes["lengths"], d=512, heads=8, budget_s=3.0, timeout_s=240.0,
                                              max_explicit_gib=8.0, log=log)
    if "probe" in sections:
        probes["fp32 (end)"] = Series()
        for _ in range(3):
            probes["fp32 (end)"].add(matmul_gflops(2048, torch.float32, repeats=sizes["probe_repeats"]))
    machine["load average at end"] = load_average()
    machine["suite wall time"] = f"{(time.time() - started) / 60:.1f} min"

    results.update(probes={k: v.values for k, v in probes.items()},
                   limits={f"{shape}, {lib}": v for (shape, lib), v in limits.items()},
                   demo_training=_plain(demo_result) if demo_result else None,
                   training=[_plain(r) for r in train_results],
                   inference=_plain(infer_result) if infer_result else None,
                   attention=_plain(attn_result) if attn_result else None,
                   workload=_plain(workload_result) if workload_result else None)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    report.write(out, machine, probes, bf16_supported(), demo_result, train_results, infer_result, attn_result,
                 args.quick, workload_result, threads, limits)
    log(f"wrote {out / 'RESULTS.md'}")
    return 0


def _workload(args, sizes: dict, work: Path, threads: int, log):
    """Section 5: a trained model translating a real test set (benchmarks/workload.py)."""
    import workload  # noqa: E402

    sentences, rounds, minutes = sizes["workload"]
    data_dir = None
    if not (args.workload_checkpoint and args.workload_src and args.workload_ref):
        data_dir = _demo_data(args.data, log)
        if data_dir is None:
            return None
    return workload.run_workload(
        data_dir, work / "workload", threads, log,
        checkpoint=Path(args.workload_checkpoint) if args.workload_checkpoint else None,
        src=Path(args.workload_src) if args.workload_src else None,
        ref=Path(args.workload_ref) if args.workload_ref else None,
        sentences=args.workload_sentences or sentences, rounds=rounds, train_minutes=args.workload_minutes or minutes,
        shortlist=Path(args.workload_shortlist) if args.workload_shortlist else None)


def _demo_data(path: str | None, log) -> Path | None:
    """The demo's dataset: --data, or prepared once into ~/.cache/aiayn/bench (None if impossible)."""
    if path:
        return Path(path)
    from aiayn.data import PrepareOptions, prepare_dataset
    from aiayn.demo import DATA
    from aiayn.errors import UserError

    out = Path.home() / ".cache" / "aiayn" / "bench" / f"lo-en-de-{DATA['vocab_size']}"
    try:
        prepare_dataset(PrepareOptions(out=str(out), **DATA))
    except UserError as e:
        log(f"demo section skipped: cannot prepare the demo's data ({e})")
        return None
    return out


def _plain(obj):
    """Dataclass -> JSON-able dict (Series -> their values; tuple keys -> strings)."""
    def convert(x):
        if isinstance(x, Series):
            return x.values
        if dataclasses.is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, dict):
            return {(" / ".join(map(str, k)) if isinstance(k, tuple) else k): convert(v) for k, v in x.items()}
        if isinstance(x, list):
            return [convert(v) for v in x]
        return x

    return convert(obj)


if __name__ == "__main__":
    sys.exit(main())
