"""A real translation workload: a trained model translating a real test set.

The inference section measures decoder speed on random weights with a fixed output length;
this one measures what a user sees: sentences/s and BLEU of a trained model on held-out text,
where outputs stop at their own EOS and batches mix lengths.

Model: by default a quick one is trained here (the demo's `libreoffice-small` config on the
demo's data, `aiayn.demo.DATA`, for ``train_minutes``); ``--workload-checkpoint DIR`` uses a
trained checkpoint instead, and ``--workload-src/--workload-ref`` another test set.

Systems, all on the same weights and the same source subwords, beam 4, α = 0.6, batches of 64
sentences: aiayn fp32 (`aiayn.translator.Translator` as ``aiayn translate`` runs it, i.e. with
prepacked weights), aiayn int8 (``--quantize int8``) and CTranslate2 float32 and int8 on the
model exported with `aiayn.export` (CTranslate2's length limit is a fixed 256 tokens instead of
aiayn's |x| + 50; neither is reached by these outputs). Systems alternate round by round; each
figure is the median over rounds of wall-clock sentences/s (all torch threads, CTranslate2
``intra_threads`` the same) and, beside it, process CPU seconds. CTranslate2 runs in a child
process (`ct2_process`: in this one it would slow the torch systems down); its wall-clock time
is measured here, around the whole call as for aiayn, and its CPU seconds are the child's.
CTranslate2 is measured twice: on the same threads for each batch (``intra_threads``), and with
one thread per batch and as many batches at once as there are threads (``inter_threads``, its
throughput setting), which is much faster for it on a small model; aiayn likewise with
``workers`` (as ``aiayn translate --workers N``): worker processes on one thread each.

With a vocabulary shortlist (`aiayn.inference.shortlist`: built here from the training data of the model
trained here, or ``--workload-shortlist FILE``), the parallel-batches systems run once more with
it: aiayn with ``shortlist=``, CTranslate2 with the same candidates written as its vocabulary
mapping (``vmap.txt``: the frequent subwords under the empty key, each source subword's
translations and itself under that subword; ``use_vmap=True``). Both then restrict each batch's
outputs to the union of its sentences' candidates.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import peers
from common import Series
from ct2_process import CT2Process

SYSTEMS = ["aiayn fp32", "aiayn int8", "CT2 float32", "CT2 int8", "aiayn fp32, parallel batches",
           "aiayn int8, parallel batches", "CT2 float32, parallel batches", "CT2 int8, parallel batches"]
SHORTLIST = ", shortlist"  # suffix of the systems that run with the vocabulary shortlist
SHORTLIST_SYSTEMS = [f"{s}{SHORTLIST}" for s in SYSTEMS if s.endswith("parallel batches")]


@dataclass
class WorkloadResult:
    model: str  # what was translated with: the checkpoint and how it came about
    sentences: int
    source_subwords: int
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    shortlist: str = ""  # where the shortlist came from, if the shortlist systems ran
    sentences_per_s: dict[str, Series] = field(default_factory=dict)
    cpu_seconds: dict[str, Series] = field(default_factory=dict)
    bleu: dict[str, float] = field(default_factory=dict)
    same_as_fp32: dict[str, float] = field(default_factory=dict)  # share of outputs equal to aiayn fp32's

    def median(self, system: str) -> float:
        return self.sentences_per_s[system].median


def train_quick_model(data_dir: Path, out: Path, minutes: float, log) -> Path:
    """The demo's config on the demo's data for ``minutes`` of training: its last checkpoint."""
    from aiayn.demo import config_path
    from aiayn.train import train

    log(f"workload: training libreoffice-small for {minutes:g} min on {data_dir}")
    result = train(config_path(), data_dir, out, [f"train.max_minutes={minutes}", "train.progress=false",
                                                 "train.valid_every=100000"], force=True)
    log(f"workload: trained {result.step} updates ({result.stop_reason})")
    return result.last_checkpoint


class _CT2:
    """CTranslate2 (one compute type of a shared child process) on the exported checkpoint, fed
    the Translator's own source subwords."""

    def __init__(self, process: CT2Process, hf_dir: Path, compute_type: str, tokenizer, max_src_len: int):
        self.process, self.compute_type = process, compute_type
        self.pieces = peers.ct2_pieces(hf_dir)
        self.index = {p: i for i, p in self.pieces.items()}
        self.tokenizer, self.max_src_len = tokenizer, max_src_len
        self.cpu = 0.0  # the child's CPU seconds of the last call

    def translate(self, lines: list[str], **options) -> list[str]:
        from aiayn.data.text import clean

        ids = self.tokenizer.encode_batch([clean(line) for line in lines])
        rows = [i for i, s in enumerate(ids) if s]
        batch = [[self.pieces[t] for t in ids[i][: self.max_src_len]] + [self.pieces[peers.EOS]] for i in rows]
        hypotheses, _, self.cpu = self.process.translate(self.compute_type, batch, beam_size=4, length_penalty=0.6,
                                                         max_batch_size=64, max_decoding_length=256, **options)
        out = [""] * len(lines)
        for i, tokens in zip(rows, hypotheses):
            out[i] = self.tokenizer.decode_line([self.index[p] for p in tokens])
        return out


def _convert(checkpoint: Path, workdir: Path) -> tuple[Path, Path]:
    """The checkpoint exported to the Marian layout and converted by CTranslate2 (once per workdir)."""
    from aiayn.export import export_checkpoint

    hf_dir, ct2_dir = workdir / "hf", workdir / "ct2"
    if not (hf_dir / "config.json").exists():
        export_checkpoint(checkpoint, hf_dir, force=True)
    if not (ct2_dir / "model.bin").exists():
        peers.convert_ct2(hf_dir, ct2_dir)
    return hf_dir, ct2_dir


def write_vmap(shortlist, pieces: dict[int, str], path: Path) -> None:
    """The shortlist as CTranslate2's vocabulary mapping: ``SOURCE<TAB>CANDIDATES`` per line, the
    always-allowed subwords under the empty source (CTranslate2 adds unk, bos and eos itself)."""
    lines = ["\t" + " ".join(pieces[i] for i in shortlist.frequent)]
    for s, translations in enumerate(shortlist.translations):
        if s in pieces and s > peers.EOS:  # not pad/unk/bos/eos
            lines.append(pieces[s] + "\t" + " ".join(pieces[t] for t in sorted({*translations, s}) if t in pieces))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_workload(data_dir: Path | None, workdir: Path, threads: int, log, *, checkpoint: Path | None = None,
                 src: Path | None = None, ref: Path | None = None, sentences: int = 500, rounds: int = 3,
                 train_minutes: float = 3.0, shortlist: Path | None = None) -> WorkloadResult:
    from aiayn.config import SearchConfig
    from aiayn.evaluate import score
    from aiayn.translator import Translator

    if checkpoint is None:
        checkpoint = train_quick_model(data_dir, workdir / "model", train_minutes, log)
        how = f"libreoffice-small trained here for {train_minutes:g} min on the demo's data"
        if shortlist is None:  # from the same training data, with the defaults of `aiayn shortlist`
            from aiayn.data import load_dataset
            from aiayn.inference.shortlist import Shortlist

            shortlist = workdir / "shortlist.json"
            Shortlist.from_dataset(load_dataset(data_dir)).save(shortlist)
            where = "built here from the model's training data with `aiayn shortlist`'s defaults"
        else:
            where = f"`{shortlist}`"
    else:
        how = "given with --workload-checkpoint"
        where = f"`{shortlist}`" if shortlist else ""
    src = src or data_dir / "test.src"
    ref = ref or data_dir / "test.tgt"
    lines = src.read_text(encoding="utf-8").splitlines()[:sentences]
    refs = ref.read_text(encoding="utf-8").splitlines()[:sentences]

    fp32 = Translator(checkpoint, search=SearchConfig(beam=4, alpha=0.6), device="cpu", batch_size=64)
    int8 = Translator(checkpoint, search=SearchConfig(beam=4, alpha=0.6), device="cpu", batch_size=64, quantize="int8")
    hf_dir, ct2_dir = _convert(checkpoint, workdir / "ct2")
    if shortlist is not None:
        from aiayn.inference.shortlist import Shortlist

        write_vmap(Shortlist.load(shortlist), peers.ct2_pieces(hf_dir), ct2_dir / "vmap.txt")
    processes = [CT2Process(ct2_dir, threads), CT2Process(ct2_dir, 1, inter_threads=threads)]
    ct2 = {}
    for process, suffix in zip(processes, ("", ", parallel batches")):
        for ct in ("float32", "int8"):
            ct2[f"CT2 {ct}{suffix}"] = _CT2(process, hf_dir, ct, fp32.tokenizer, fp32.max_src_len)
    parallel = {f"aiayn {name}, parallel batches": Translator(checkpoint, search=SearchConfig(beam=4, alpha=0.6), device="cpu", batch_size=64, quantize=q, threads=1, workers=threads)
                for name, q in (("fp32", None), ("int8", "int8"))}
    if shortlist is not None:
        parallel.update({f"aiayn {name}, parallel batches{SHORTLIST}": Translator(checkpoint, search=SearchConfig(beam=4, alpha=0.6), device="cpu", batch_size=64, quantize=q, threads=1, workers=threads, shortlist=shortlist) for name, q in (("fp32", None), ("int8", "int8"))})
    run = {"aiayn fp32": fp32.translate, "aiayn int8": int8.translate,
           **{s: c.translate for s, c in ct2.items()}, **{s: t.translate for s, t in parallel.items()},
           **{f"{s}{SHORTLIST}": functools.partial(c.translate, use_vmap=True)
              for s, c in ct2.items() if s.endswith("parallel batches")}}

    subwords = sum(len(s) for s in fp32.tokenizer.encode_batch(lines))
    result = WorkloadResult(f"`{Path(checkpoint).name}` ({how})", len(lines), subwords,
                            systems=SYSTEMS + (SHORTLIST_SYSTEMS if shortlist is not None else []), shortlist=where)
    systems = result.systems
    outputs: dict[str, list[str]] = {}
    for system in systems:
        result.sentences_per_s[system], result.cpu_seconds[system] = Series(), Series()
        outputs[system] = run[system](lines[:128])  # warm-up: thread pools, worker processes, kernels
    for r in range(rounds):
        for system in systems[r % len(systems):] + systems[: r % len(systems)]:
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[system] = run[system](lines)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            result.sentences_per_s[system].add(len(lines) / wall)
            if system in parallel:
                cpu = float("nan")  # the worker processes' CPU time is not visible from here
            child = ct2.get(system.removesuffix(SHORTLIST))  # a CTranslate2 system: its child's CPU time too
            result.cpu_seconds[system].add(cpu + (child.cpu if child is not None else 0.0))
        log(f"workload round {r + 1}/{rounds}: " + ", ".join(
            f"{s} {result.sentences_per_s[s].values[-1]:.1f}" for s in systems) + " sentences/s")
    for process in [*processes, *parallel.values()]:
        process.close()
    for system in systems:
        result.bleu[system] = score(outputs[system], refs)["bleu"]
        result.same_as_fp32[system] = sum(a == b for a, b in zip(outputs[system], outputs["aiayn fp32"])) / len(lines)
    return result


def report_lines(w: WorkloadResult, threads: int) -> list[str]:
    lines = [
        "## 5. A real workload: translating a test set", "",
        f"Model: {w.model}. Test set: the first {w.sentences} sentences ({w.source_subwords} source subwords) "
        f"of its test split. Beam 4, α = 0.6, batches of 64 sentences, {threads} threads; systems alternate "
        "round by round (`benchmarks/workload.py`). BLEU: sacreBLEU, detokenized, of this run's outputs.", "",
        "| system | sentences/s (median) | range | CPU s per pass (median) | BLEU | outputs = aiayn fp32's |",
        "|---|---|---|---|---|---|",
    ]
    from common import fmt, paired_ratio

    for s in w.systems:
        lines.append(f"| {s} | {w.median(s):.4g} | {w.sentences_per_s[s].spread()} | {fmt(w.cpu_seconds[s].median, 4)} "
                     f"| {w.bleu[s]:.2f} | {100 * w.same_as_fp32[s]:.0f}% |")
    fp32, ct2 = w.sentences_per_s["aiayn fp32"], w.sentences_per_s["CT2 float32"]

    lines += ["", f"- aiayn fp32 ÷ CT2 float32: **{paired_ratio(fp32, ct2):.3g}×**; aiayn int8 ÷ CT2 int8: "
              f"**{paired_ratio(w.sentences_per_s['aiayn int8'], w.sentences_per_s['CT2 int8']):.3g}×** "
              "(median of per-round ratios of sentences/s)",
              f"- each translating {threads} batches at once on one thread each (aiayn `--workers {threads}`, CTranslate2 "
              f"`inter_threads={threads}, intra_threads=1`): aiayn fp32 ÷ CT2 float32 "
              f"**{paired_ratio(*(w.sentences_per_s[f'{s}, parallel batches'] for s in ('aiayn fp32', 'CT2 float32'))):.3g}×**; "
              f"aiayn int8 ÷ CT2 int8 "
              f"**{paired_ratio(*(w.sentences_per_s[f'{s}, parallel batches'] for s in ('aiayn int8', 'CT2 int8'))):.3g}×**"]
    if SHORTLIST_SYSTEMS[0] in w.systems:
        def ratio(a: str, b: str) -> float:
            return paired_ratio(w.sentences_per_s[f"{a}, parallel batches{SHORTLIST}"],
                                w.sentences_per_s[f"{b}, parallel batches{SHORTLIST}"])

        gain = paired_ratio(w.sentences_per_s[f"aiayn fp32, parallel batches{SHORTLIST}"],
                            w.sentences_per_s["aiayn fp32, parallel batches"])
        lines += [f"- the same with the vocabulary shortlist ({w.shortlist}; aiayn `--shortlist`, CTranslate2 "
                  f"its vocabulary mapping with the same candidates): aiayn fp32 ÷ CT2 float32 **{ratio('aiayn fp32', 'CT2 float32'):.3g}×**; "
                  f"aiayn int8 ÷ CT2 int8 **{ratio('aiayn int8', 'CT2 int8'):.3g}×**; the shortlist makes aiayn fp32 {gain:.3g}× as fast"]
    return lines + [""]
