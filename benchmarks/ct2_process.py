"""CTranslate2 in a process of its own, so that it cannot slow the torch systems down.

Why: imported into the benchmark's process, CTranslate2's OpenMP calls bind to torch's copy of
libgomp (torch loads it into the global symbol scope first). Once CTranslate2 has run with 2 or
more intra-op threads, that runtime manages more threads than there are cores, and libgomp then
stops spinning between parallel regions: every later torch parallel region wakes its workers
with a futex. Measured on a 2-core Xeon (AVX-512), aiayn int8 greedy decoding at batch 1 and 2
threads went from ~260 to ~90 tokens/s for the rest of the process after one CTranslate2 call
(and HF `generate` likewise); ``OMP_WAIT_POLICY=passive`` gives the same ~90 without
CTranslate2. A user runs one of the two, not both in one process, so the benchmark does the
same: CTranslate2 translates here, in a child that never imports torch, with the parent's
environment (the same allocator), and times itself: wall-clock and CPU seconds of
``translate_batch`` alone, like the in-process timing of the torch systems.

Protocol: one JSON object per line on stdin (a request) and stdout (its answer); no pickle.
Run as ``python ct2_process.py CT2_DIR INTRA_THREADS INTER_THREADS``; `CT2Process` is the parent's side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class CT2Process:
    """A child process holding CTranslate2 translators (float32 and int8) of one converted model."""

    def __init__(self, ct2_dir: Path, threads: int, inter_threads: int = 1):
        """``threads``: CTranslate2's intra_threads (the threads of one batch); ``inter_threads``: how
        many batches it translates at once (each on ``threads`` threads)."""
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(ct2_dir), str(threads),
                                      str(inter_threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")

    def translate(self, compute_type: str, tokens: list[list[str]], **options) -> tuple[list[list[str]], float, float]:
        """Best hypotheses (token strings) for ``tokens``, and the wall and CPU seconds it took."""
        self.proc.stdin.write(json.dumps({"compute_type": compute_type, "tokens": tokens, "options": options}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CTranslate2 process ended (exit status {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"CTranslate2: {answer['error']}")
        return answer["hypotheses"], answer["wall"], answer["cpu"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self) -> CT2Process:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(ct2_dir: str, threads: int, inter_threads: int) -> None:
    import time

    import ctranslate2

    translators: dict[str, ctranslate2.Translator] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ct = request["compute_type"]
            if ct not in translators:
                translators[ct] = ctranslate2.Translator(ct2_dir, device="cpu", compute_type=ct,
                                                         inter_threads=inter_threads, intra_threads=threads)
            wall, cpu = time.perf_counter(), time.process_time()
            results = translators[ct].translate_batch(request["tokens"], **request["options"])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            answer = {"hypotheses": [r.hypotheses[0] for r in results], "wall": wall, "cpu": cpu}
        except Exception as e:  # reported to the parent, which raises it
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
