"""`make bench-serve`: aiayn serve under load on loopback -> benchmarks/SERVE.md (and SERVE.json).

    python benchmarks/serve.py                                  the copy-task model (trained here, ~1 min)
    python benchmarks/serve.py --checkpoint DIR --input FILE    ... and then your model, sentences from FILE

The server is the real command (`aiayn serve --port 0`) in its own process; one client process
runs 16 concurrent clients (aiayn.serve.load) that send 500 requests of one sentence each,
each client sending its next request when the previous one is answered. Two configurations
run alternately, rounds times: dynamic batching as shipped (--batch-wait-ms 5, up to 64 lines a
batch) and no batching (--max-batch-lines 1), so the difference batching makes is measured in
the same conditions. Every answer is checked: on the copy-task model it must be the input
itself (sentences the model copies exactly are chosen first); on other models, a non-empty
translation. Figures: latency p50/p90/p99/max, requests/s, and the latency of /api/health
polled during the load (is the event loop free while batches are translated?).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_description  # noqa: E402

CONFIGS = {
    "dynamic batching (default: wait 5 ms, ≤ 64 lines)": [],
    "no batching (--max-batch-lines 1)": ["--max-batch-lines", "1"],
}


def copy_model(workdir: Path) -> Path:
    """Prepare the copy task and train the tests' tiny model on it (configs/copy.yaml)."""
    from aiayn.cli import main as aiayn

    data, run = workdir / "copy-data", workdir / "copy-run"
    print("bench-serve: training the copy-task model (configs/copy.yaml, about a minute)", file=sys.stderr)
    if aiayn(["prepare", "--corpus", "copy", "--out", str(data)]) != 0:
        raise SystemExit("bench-serve: aiayn prepare failed")
    if aiayn(["train", "--config", str(HERE.parent / "configs" / "copy.yaml"), "--data", str(data), "--out", str(run),
              "train.progress=false"]) != 0:
        raise SystemExit("bench-serve: aiayn train failed")
    return run / "best"


def copy_sentences(checkpoint: Path, n: int, seed: int) -> list[str]:
    """Sequences of 3-12 symbols that the copy model copies exactly (so answers are checkable)."""
    from aiayn.config import SearchConfig
    from aiayn.data.corpora import SYNTHETIC_SYMBOLS
    from aiayn.translator import Translator

    rng = random.Random(seed)
    candidates = [" ".join(rng.choice(SYNTHETIC_SYMBOLS) for _ in range(rng.randint(3, 12))) for _ in range(n + n // 3)]
    good = [c for c, t in zip(candidates, Translator(checkpoint, search=SearchConfig(beam=4)).translate(candidates)) if c == t]
    if len(good) < n:
        raise SystemExit(f"bench-serve: the copy model copied only {len(good)} of {len(candidates)} sequences")
    return good[:n]


class Server:
    """`aiayn serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, checkpoint: Path, extra: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aiayn", "serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--no-access-log", "--log-level", "warning", *extra],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        line = ""
        while "serving" not in line:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench-serve: the server did not start: {line}{self.process.stderr.read()}")
            line = self.process.stderr.readline()
        self.url = line.split(" on ")[1].split("/ ")[0]
        import httpx2

        for _ in range(300):  # listening already; wait until the application has started
            try:
                if httpx2.get(self.url + "/api/health", timeout=5).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("bench-serve: the server never became healthy")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def one_run(checkpoint: Path, extra: list[str], bodies: list[dict], expected: list[str] | None, clients: int) -> dict:
    import httpx2

    from aiayn.serve.load import send_all

    server = Server(checkpoint, extra)
    try:
        # Warm-up (first calls into torch, connections), then the counters before the measured run.
        asyncio.run(send_all(server.url, bodies[:clients], clients=clients, probe_every=None))
        before = httpx2.get(server.url + "/api/health", timeout=10).json()
        result = asyncio.run(asyncio.wait_for(send_all(server.url, bodies, clients=clients), timeout=1200))
        after = httpx2.get(server.url + "/api/health", timeout=10).json()
    finally:
        server.stop()
    wrong = 0
    for i, reply in enumerate(result.replies):
        got = reply.body["translations"][0] if reply.status == 200 else None
        if got is None or (expected is not None and got != expected[i]) or (expected is None and not got.strip()):
            wrong += 1
    summary = result.summary()
    batches = after["batches"] - before["batches"]
    summary.update(wrong=wrong, batches=batches, mean_batch=(after["lines"] - before["lines"]) / max(1, batches))
    return summary


def describe(checkpoint: Path) -> str:
    """'checkpoint `NAME` (en→de, d_model 128, 2+2 layers, 4 heads, 8000 subwords, step 737)'."""
    from aiayn.checkpoint import load_checkpoint
    from aiayn.serve.engine import Engine

    info = Engine(load_checkpoint(checkpoint)).info()
    langs = f"{info['languages']['src']}→{info['languages']['tgt']}, " if info["languages"] else ""
    return (f"checkpoint `{info['checkpoint']}` ({langs}d_model {info['model']['d_model']}, {info['layers']['encoder']}+"
            f"{info['layers']['decoder']} layers, {info['heads']} heads, {info['vocab_size']} subwords, step {info['step']})")


@dataclass
class Workload:
    """One model and the requests sent to it."""

    title: str
    checkpoint: Path
    sentences: list[str]
    expected: list[str] | None  # the exact answers, or None: any non-empty translation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="also measure this checkpoint (after the copy-task model)")
    parser.add_argument("--input", help="with --checkpoint: sentences to send, one per line")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration, alternating")
    parser.add_argument("--out", default=str(HERE / "SERVE.md"))
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran)")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) != bool(args.input):
        parser.error("--checkpoint and --input go together")

    machine = machine_description()
    results: list[tuple[Workload, dict[str, list[dict]]]] = []
    with tempfile.TemporaryDirectory(prefix="aiayn-bench-serve-") as tmp:
        copy = copy_model(Path(tmp))
        sentences = copy_sentences(copy, args.requests, seed=1)
        workloads = [Workload("the copy-task model of the tests (configs/copy.yaml: d_model 64, 2+2 layers, 4 heads, "
                              "45 subwords); random sequences of 3-12 symbols that it copies exactly",
                              copy, sentences, sentences)]
        if args.checkpoint:
            # The server's default limit is 1000 characters a sentence: longer lines would be refused.
            pool = [line.strip() for line in Path(args.input).read_text(encoding="utf-8").splitlines()
                    if line.strip() and len(line) <= 1000]
            workloads.append(Workload(f"{describe(Path(args.checkpoint))}; the first {args.requests} "
                                      f"sentences of `{Path(args.input).name}`", Path(args.checkpoint),
                                      [pool[i % len(pool)] for i in range(args.requests)], None))
        for work in workloads:
            bodies = [{"text": s} for s in work.sentences]
            runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
            for round_ in range(args.rounds):
                for name, extra in CONFIGS.items():
                    print(f"bench-serve: {work.checkpoint.name}, round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr)
                    runs[name].append(one_run(work.checkpoint, extra, bodies, work.expected, args.clients))
                    print("bench-serve:   " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                          for k, v in runs[name][-1].items()}), file=sys.stderr)
            results.append((work, runs))
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_report(Path(args.out), machine, results, args, argv if argv is not None else sys.argv[1:])
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"machine": machine, "results": [{"model": w.title, "runs": r} for w, r in results]}, indent=1) + "\n")
    print(f"bench-serve: wrote {args.out}", file=sys.stderr)
    failed = sum(r["wrong"] + r["requests"] - r["ok"] for _, runs in results for rs in runs.values() for r in rs)
    return 1 if failed else 0


def write_report(out: Path, machine: dict, results, args, argv: list[str]) -> None:
    import fastapi
    import httpx2
    import uvicorn

    machine = {k: v for k, v in machine.items() if k not in ("transformers", "ctranslate2")}
    machine.update(fastapi=fastapi.__version__, uvicorn=uvicorn.__version__, httpx2=httpx2.__version__)
    cores = os.cpu_count() or 1
    busy = max(float(machine["load average at start"].split()[0]), float(machine["load average at end"].split()[0]))
    command = shlex.join(["python", "benchmarks/serve.py", *argv])
    lines = [
        "# aiayn serve under load",
        "",
        f"Written by `make bench-serve` (`python benchmarks/serve.py`); this file by ``{command}``.",
        "The real `aiayn serve` runs in its own process on 127.0.0.1; one client process runs",
        f"{args.clients} concurrent clients that send {args.requests} translation requests of one sentence each (beam 4),",
        "each client sending its next request when its previous one is answered. Two server configurations",
        f"alternate, {args.rounds} rounds each: every figure is the median over rounds (min–max in brackets).",
        "Every answer was checked: on the copy-task model it must be exactly the input; on a translation",
        "model, a non-empty translation.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        "",
    ]
    if busy > 0.5 * cores or args.note:
        lines += [f"**The machine was shared with other work during this run** (load average up to {busy:.2f} on "
                  f"{cores} logical CPUs, this benchmark's server and clients included). {args.note}".rstrip(), ""]

    def med(rs, key, digits=0):
        values = [r[key] for r in rs]
        fmt = f"{{:.{digits}f}}"
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"

    for work, runs in results:
        words = statistics.mean(len(s.split()) for s in work.sentences)
        lines += [
            f"## {'Copy-task model' if work.expected is not None else f'Translation model `{work.checkpoint.name}`'}",
            "",
            f"Model: {work.title}; {words:.1f} words per sentence on average.",
            "",
            "| server | answered correctly | p50 ms | p90 ms | p99 ms | max ms | requests/s | sentences per batch (mean) | /api/health p99 ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rs in runs.items():
            correct = sum(r["ok"] - r["wrong"] for r in rs)
            total = sum(r["requests"] for r in rs)
            lines.append(f"| {name} | {correct}/{total} | {med(rs, 'p50_ms')} | {med(rs, 'p90_ms')} | {med(rs, 'p99_ms')} | "
                         f"{med(rs, 'max_ms')} | {med(rs, 'requests_per_s', 1)} | {med(rs, 'mean_batch', 1)} | "
                         f"{med(rs, 'health_p99_ms')} |")
        first, second = runs.values()
        speedup = statistics.median(a["requests_per_s"] / b["requests_per_s"] for a, b in zip(first, second))
        lines += ["", f"Dynamic batching answers **{speedup:.1f}×** the requests per second of one-by-one translation "
                      "(median of the per-round ratios).", ""]
    lines += [
        "Latency is per request, from sending it to reading the whole answer, so it includes the time spent",
        "queued behind the other clients' requests. `/api/health` was polled every 50 ms during the load: its",
        "latency stays low because translation runs in a worker thread, never on the event loop.",
        "",
    ]
    out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
