"""`make bench-data`: aiayn's data stage at the scale users bring -> benchmarks/DATA.md (and DATA.json).

    python benchmarks/data_scale.py                         100k, 300k, 1M, 3M and 10M pairs (about 20 minutes on 2 cores)
    python benchmarks/data_scale.py --quick                 20k and 60k pairs: a smoke run (about a minute)
    python benchmarks/data_scale.py --baseline 2e69e49      also an older aiayn (a git revision) on the same files

Corpora are synthetic, built here from a real corpus at hand (Multi30k's training set in
../shared/data/multi30k, or --src/--tgt): each pair joins two randomly drawn pairs of lines, the
same two on both sides, so sentences are real text of about 25 words a side, and nearly all
pairs are distinct.

Each measured command runs in a process of its own, one at a time; its wall time and peak
resident memory (ru_maxrss of that process, from wait4) are recorded:

1. ``aiayn prepare --src --tgt --vocab-size 8000`` at every size;
2. ``aiayn train`` on every prepared dataset: a tiny model (configs/copy.yaml) for one update,
   so the time and memory are start-up (reading the dataset, the first epoch's batches, the
   model, one validation), not training;
3. ``aiayn translate`` of 100k lines and ``aiayn evaluate --checkpoint --src --ref`` of them
   (greedy, 8 output subwords a sentence, with the one-update model of step 2 on the smallest
   dataset: the cost measured is the streaming, not the search), and ``aiayn evaluate --hyp
   --ref`` of 100k lines (as hypotheses the target side of another synthetic set, so the
   scorers see text of real lengths).

Each version runs from ``git archive`` of its revision's ``src/`` (HEAD for the current one, so
the figures belong to a commit and the working tree may change meanwhile), with this
environment's packages. With --baseline REV, the same commands run with that revision on the same
files, for a before/after on one machine. This process stays small: the batcher's timing runs in
a process of its own too, because a child's ru_maxrss starts from its parent's resident size
(fork/vfork, then exec).
The growth laws are least-squares lines through the measured points.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# common imports torch: only once every measurement is done (below), since a child's ru_maxrss
# starts from this process's resident size.

MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
FULL_SIZES = [100_000, 300_000, 1_000_000, 3_000_000, 10_000_000]
QUICK_SIZES = [20_000, 60_000]
FULL_BASELINE_SIZES = [100_000, 300_000, 1_000_000]  # the old code needs ~14 GB and 7 minutes at 3M
TRANSLATE_LINES = 100_000


def log(message: str) -> None:
    print(f"bench-data: {message}", file=sys.stderr, flush=True)


def measure(command: list[str], *, env: dict | None = None, log_file: Path | None = None) -> dict:
    """Run ``command`` to its end: wall seconds, peak RSS (MiB) and exit status, with its
    output to ``log_file``. ru_maxrss comes from wait4 on that very process (the aiayn command
    re-executes itself under tcmalloc in the same process, so it is counted)."""
    out = open(log_file, "w") if log_file else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if log_file:
        out.close()
    if proc.returncode != 0:
        tail = log_file.read_text()[-2000:] if log_file else ""
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def read_corpus(src: Path, tgt: Path) -> tuple[list[str], list[str]]:
    s = src.read_text(encoding="utf-8").split("\n")
    t = tgt.read_text(encoding="utf-8").split("\n")
    pairs = [(a.strip(), b.strip()) for a, b in zip(s, t) if a.strip() and b.strip()]
    return [a for a, _ in pairs], [b for _, b in pairs]


def synthesize(src: list[str], tgt: list[str], n: int, directory: Path, seed: int = 1) -> tuple[Path, Path]:
    """n pairs, each two random pairs of the corpus joined (the same two on both sides)."""
    paths = directory / f"{n}.src", directory / f"{n}.tgt"
    if all(p.is_file() for p in paths):
        return paths
    rng = random.Random(seed + n)
    m = len(src)
    with open(paths[0], "w", encoding="utf-8") as fs, open(paths[1], "w", encoding="utf-8") as ft:
        for _ in range(n):
            i, j = rng.randrange(m), rng.randrange(m)
            fs.write(f"{src[i]} {src[j]}\n")
            ft.write(f"{tgt[i]} {tgt[j]}\n")
    return paths


def baseline_tree(rev: str, directory: Path) -> Path:
    """``src/`` of git revision ``rev``, unpacked into ``directory``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    return directory / "src"


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b·x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def run_version(name: str, env: dict, sizes: list[int], corpora: dict[int, tuple[Path, Path]], work: Path,
                translate_src: Path, translate_ref: Path, other_hyp: Path) -> dict:
    aiayn = [sys.executable, "-m", "aiayn"]
    results: dict = {"prepare": {}, "train": {}, "inference": {}}
    lines = sum(1 for _ in open(translate_src, "rb"))
    for n in sizes:
        out = work / f"{name}-{n}"
        log(f"{name}: prepare {n:,} pairs")
        r = measure(aiayn + ["prepare", "--src", str(corpora[n][0]), "--tgt", str(corpora[n][1]), "--out", str(out),
                             "--vocab-size", "8000", "--force"], env=env, log_file=work / f"{name}-prepare-{n}.log")
        r["disk_mib"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)
        results["prepare"][n] = r
        log(f"  {r}")
        log(f"{name}: train start-up on {n:,} pairs")
        run = work / f"{name}-run-{n}"
        results["train"][n] = measure(aiayn + [
            "train", "--config", "copy", "--data", str(out), "--out", str(run), "--force", "train.max_updates=1",
            "train.warmup=1", "train.valid_bleu_sentences=10", "train.precision=fp32"],
            env=env, log_file=work / f"{name}-train-{n}.log")
        log(f"  {results['train'][n]}")
        if n == sizes[-1] and name == "current":
            done = subprocess.run([sys.executable, __file__, "--batcher", str(out)], env=env, check=True,
                                  capture_output=True, text=True)
            results["batcher"] = json.loads(done.stdout)
            log(f"  batcher: {results['batcher']}")
        if n != sizes[0]:  # the smallest's run is the model of step 3
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    # The tiny model of the smallest dataset's start-up run (one update: it writes 8 subwords a
    # sentence, never an early EOS, so every line gets a translation) translates 100k lines.
    data = work / f"{name}-{sizes[0]}"
    checkpoint = work / f"{name}-run-{sizes[0]}" / "last"
    search = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "8", "--precision", "fp32"]
    hyp = work / f"{name}-hyp.txt"
    log(f"{name}: translate {lines:,} lines")
    results["inference"]["translate"] = measure(aiayn + ["translate", "--checkpoint", str(checkpoint), "--input",
                                                         str(translate_src), "--output", str(hyp), "--force", *search],
                                                env=env, log_file=work / f"{name}-translate.log")
    log(f"  {results['inference']['translate']}")
    log(f"{name}: evaluate --hyp --ref of {lines:,} lines")
    results["inference"]["evaluate --hyp --ref"] = measure(
        aiayn + ["evaluate", "--hyp", str(other_hyp), "--ref", str(translate_ref)], env=env,
        log_file=work / f"{name}-score.log")
    log(f"  {results['inference']['evaluate --hyp --ref']}")
    log(f"{name}: evaluate --checkpoint --src --ref of {lines:,} lines")
    results["inference"]["evaluate --checkpoint --src --ref"] = measure(
        aiayn + ["evaluate", "--checkpoint", str(checkpoint), "--src", str(translate_src), "--ref", str(translate_ref),
                 *search], env=env, log_file=work / f"{name}-evaluate.log")
    log(f"  {results['inference']['evaluate --checkpoint --src --ref']}")
    shutil.rmtree(data, ignore_errors=True)
    results["inference_lines"] = lines
    return results


def greedy_batches(src, tgt, max_tokens: int, order) -> list[list[int]]:
    """The batcher's loop before it was vectorised (one Python step per pair), for comparison."""
    batches, current, longest = [], [], 0
    for i in order.tolist():
        need = max(longest, int(src[i]) + 1, int(tgt[i]) + 1)
        if current and (len(current) + 1) * need > max_tokens:
            batches.append(current)
            current, need = [], max(int(src[i]) + 1, int(tgt[i]) + 1)
        current.append(i)
        longest = need
    return batches + ([current] if current else [])


def time_batcher(dataset: Path, max_tokens: int = 4096) -> dict:
    """One epoch's batch list of a dataset's training split: aiayn's sampler, and the old loop
    (run in a process of its own: ``python data_scale.py --batcher DATASET``)."""
    import numpy as np

    from aiayn.data import TokenBatchSampler, load_dataset

    train = load_dataset(dataset).split("train")
    start = time.perf_counter()
    sampler = TokenBatchSampler(train.src_lens, train.tgt_lens, max_tokens, seed=1)
    batches = sampler.batches(0)
    new = time.perf_counter() - start
    longest = np.maximum(train.src_lens, train.tgt_lens)
    order = np.lexsort((np.random.default_rng(1).permutation(len(longest)), train.tgt_lens, train.src_lens, longest))
    start = time.perf_counter()
    old = greedy_batches(train.src_lens, train.tgt_lens, max_tokens, order)
    loop = time.perf_counter() - start
    return {"pairs": len(train), "batches": len(batches), "max_tokens": max_tokens, "sampler_s": round(new, 3),
            "loop_s": round(loop, 3), "same_count": len(old) == len(batches)}


def report(machine: dict, results: dict, sizes: list[int], baseline: str | None, corpus: str) -> str:
    from common import machine_table

    new, old = results["current"], results.get("baseline")
    lines = ["# aiayn's data stage at scale (`make bench-data`)", "",
             "Written by `benchmarks/data_scale.py`; every figure comes from the run described below. "
             f"Corpora: synthetic, each pair two random pairs of {corpus} joined (~25 words a side). "
             "Wall time and peak resident memory (ru_maxrss) of each command in its own process, "
             "one at a time.", "", *machine_table(machine), ""]
    head = "| pairs | prepare wall | prepare peak RSS | dataset on disk | train start-up | train start-up peak RSS |"
    if old:
        head += f" before ({baseline}): prepare wall | before: prepare peak RSS | before: train start-up peak RSS |"
    lines += ["## Preparing and opening a dataset", "", head, "|" + " --- |" * (head.count("|") - 1)]
    for n in sizes:
        p, t = new["prepare"][n], new["train"][n]
        row = (f"| {n:,} | {p['wall_s']:.1f} s | {p['peak_rss_mib']:,.0f} MiB | {p['disk_mib']:,.0f} MiB | "
               f"{t['wall_s']:.1f} s | {t['peak_rss_mib']:,.0f} MiB |")
        if old:
            op, ot = old["prepare"].get(n), old["train"].get(n)
            row += (f" {op['wall_s']:.1f} s | {op['peak_rss_mib']:,.0f} MiB | {ot['peak_rss_mib']:,.0f} MiB |" if op
                    else " not run | not run | not run |")
        lines.append(row)
    xs = [n / 1e6 for n in sizes]
    a_rss, b_rss = fit(xs, [new["prepare"][n]["peak_rss_mib"] for n in sizes])
    a_t, b_t = fit(xs, [new["prepare"][n]["wall_s"] for n in sizes])
    a_tr, b_tr = fit(xs, [new["train"][n]["peak_rss_mib"] for n in sizes])
    lines += ["", "Growth laws (least-squares lines through the rows above, N in millions of pairs):", "",
              f"- prepare time ≈ {a_t:.1f} s + {b_t:.1f} s · N",
              f"- prepare peak RSS ≈ {a_rss:,.0f} MiB + {b_rss:,.0f} MiB · N",
              f"- train start-up peak RSS ≈ {a_tr:,.0f} MiB + {b_tr:,.0f} MiB · N"]
    if old:
        osz = [n for n in sizes if n in old["prepare"]]
        if len(osz) >= 2:
            oa, ob = fit([n / 1e6 for n in osz], [old["prepare"][n]["peak_rss_mib"] for n in osz])
            ota, otb = fit([n / 1e6 for n in osz], [old["prepare"][n]["wall_s"] for n in osz])
            lines += [f"- before ({baseline}): prepare time ≈ {ota:.1f} s + {otb:.1f} s · N; "
                      f"peak RSS ≈ {oa:,.0f} MiB + {ob:,.0f} MiB · N"]
    b = new.get("batcher")
    if b:
        lines += ["", "## The batcher's epoch", "",
                  f"Building one epoch's batches ({b['max_tokens']:,} tokens each) of the largest training split "
                  f"({b['pairs']:,} pairs, {b['batches']:,} batches), in the benchmark's process: "
                  f"`TokenBatchSampler` (sort, then a binary search per batch) {b['sampler_s']:.2f} s, against "
                  f"{b['loop_s']:.2f} s for the per-pair loop it replaced (the cut alone, after the same sort)."]
    lines += ["", f"## Translating and scoring {new['inference_lines']:,} lines", "",
              "A tiny model (configs/copy.yaml, one update) with greedy search and 8 output subwords a "
              "sentence, so the figures are about reading, batching, writing and scoring, not the search; "
              "`evaluate --hyp --ref` scores the target side of another synthetic set against the references.", "",
              "| command | wall | peak RSS |" + (f" before ({baseline}): wall | before: peak RSS |" if old else ""),
              "| --- | --- | --- |" + (" --- | --- |" if old else "")]
    for name, r in new["inference"].items():
        row = f"| aiayn {name} | {r['wall_s']:.1f} s | {r['peak_rss_mib']:,.0f} MiB |"
        if old:
            o = old["inference"][name]
            row += f" {o['wall_s']:.1f} s | {o['peak_rss_mib']:,.0f} MiB |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k and 60k pairs, into a temporary directory")
    parser.add_argument("--sizes", help="comma-separated pair counts (default 100k,300k,1M,3M)")
    parser.add_argument("--src", type=Path, help="source side of the real corpus (default: Multi30k train.en)")
    parser.add_argument("--tgt", type=Path, help="target side of the real corpus (default: Multi30k train.de)")
    parser.add_argument("--baseline", help="a git revision to measure as well (its src/, this environment)")
    parser.add_argument("--baseline-sizes", help="sizes for the baseline (default: up to 1M pairs)")
    parser.add_argument("--work", type=Path, help="working directory for the corpora and datasets (kept)")
    parser.add_argument("--out", type=Path, help="output directory (default benchmarks/, or a temporary one with --quick)")
    parser.add_argument("--batcher", type=Path, help=argparse.SUPPRESS)  # internal: time_batcher in its own process
    args = parser.parse_args(argv)
    if args.batcher:
        print(json.dumps(time_batcher(args.batcher)))
        return 0
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    src = args.src or MULTI30K / "train.en"
    tgt = args.tgt or MULTI30K / "train.de"
    if not (src.is_file() and tgt.is_file()):
        log(f"no real corpus at hand ({src} and {tgt}); give --src and --tgt")
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="aiayn-bench-data-")) if args.quick else HERE)
    work = args.work or Path(tempfile.mkdtemp(prefix="aiayn-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    measured = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    corpus_src, corpus_tgt = read_corpus(src, tgt)
    log(f"{len(corpus_src):,} real pairs from {src} and {tgt}; building {', '.join(f'{n:,}' for n in sizes)}")
    corpora = {n: synthesize(corpus_src, corpus_tgt, n, work) for n in sizes}
    translate_src, translate_ref = synthesize(corpus_src, corpus_tgt, TRANSLATE_LINES if not args.quick else 5_000,
                                              work, seed=7)
    other_hyp = synthesize(corpus_src, corpus_tgt, TRANSLATE_LINES if not args.quick else 5_000, work, seed=11)[1]
    del corpus_src, corpus_tgt
    env = dict(os.environ, PYTHONPATH=str(baseline_tree("HEAD", work / "current")))
    results = {"current": run_version("current", env, sizes, corpora, work, translate_src, translate_ref, other_hyp)}
    if args.baseline:
        base_sizes = ([int(x) for x in args.baseline_sizes.split(",")] if args.baseline_sizes else
                      [n for n in sizes if n in FULL_BASELINE_SIZES] or sizes[:2])
        tree = baseline_tree(args.baseline, work / "baseline")
        old_env = dict(env, PYTHONPATH=str(tree))
        results["baseline"] = run_version("baseline", old_env, base_sizes, corpora, work, translate_src, translate_ref,
                                          other_hyp)
    from common import machine_description

    machine = machine_description()
    machine["load average at start"] = load_at_start
    machine["aiayn"] = f"git {measured} (HEAD when the run started: what every 'current' figure measures)"
    corpus = "Multi30k's training set" if not args.src else f"{src.name}/{tgt.name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "DATA.md").write_text(report(machine, results, sizes, args.baseline, corpus), encoding="utf-8")
    (out / "DATA.json").write_text(json.dumps({"machine": machine, "sizes": sizes, "baseline": args.baseline,
                                               "results": results}, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out / 'DATA.md'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
