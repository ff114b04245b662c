"""`make demo` / `aiayn demo`: the whole system on a real corpus, in about a quarter of an hour on a CPU.

1. prepare   LibreOffice's help pages, English→German (Debian packages), a joint 8k BPE vocabulary
2. train     the paper's architecture at smaller dimensions, the paper's recipe, ~10 minutes
3. average   the last checkpoints (done by the trainer at the end of the run, as §6.1 does)
4. evaluate  beam search on the held-out test split with the search the checkpoint records (the
             config's ``search:`` section: beam 4, α 1.3), sacreBLEU with its signature
5. show      example translations next to their references
6. inspect   attention heatmaps of every layer and head for one test sentence

Each stage reuses what a previous run of the demo finished: the prepared data, a finished
training run (an interrupted one is resumed exactly: Ctrl-C saves a checkpoint, and running the
demo again continues from it). Delete ``--workdir`` to start over.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

CONFIG = "libreoffice-small"  # a shipped config, by name; its search: section is the test split's search
# The demo's corpus: `aiayn prepare` options (the benchmarks prepare the same data).
DATA = dict(corpus="libreoffice-help", lang="de", vocab_size=8000)
EXAMPLES = 5


def _say(step: str, text: str) -> None:
    print(f"\n[{step}] {text}", flush=True)


def config_path() -> Path:
    """The demo's config file: a config shipped with aiayn (package data), found by name."""
    from .config import find_config

    return find_config(CONFIG)


def _finished(run: Path) -> bool:
    """True if the run's metrics log ends with its 'end' record and the averaged model exists."""
    log = run / "metrics.jsonl"
    if not log.is_file() or not (run / "averaged").is_dir():
        return False
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return bool(lines) and json.loads(lines[-1]).get("kind") == "end"


def _train_precision(run: Path) -> str | None:
    """The precision the run trained in (its last start record: auto resolved on this machine)."""
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
              if '"kind": "start"' in line]
    return starts[-1].get("precision") if starts else None


def _pick_attention_sentence(sources: list[str]) -> str:
    """A test sentence of 7-12 words: long enough to show an alignment, short enough to read."""
    for line in sources:
        if 7 <= len(line.split()) <= 12 and line.rstrip()[-1:] in ".!?" and "  " not in line:
            return line
    return min(sources, key=lambda s: abs(len(s.split()) - 10))


def go_on(data_dir: Path, model: Path) -> str:
    """The demo's closing advice: commands for the `aiayn` on PATH that work from any directory
    (the demo's own files by absolute path; the config by name, not by a path into a checkout)."""
    data, model = shlex.quote(str(data_dir.resolve())), shlex.quote(str(model.resolve()))
    return f"""Go on:
  translate your own sentences   aiayn translate --checkpoint {model}
  look inside one                aiayn attention --checkpoint {model} --src "Click OK." --out runs/attn
  train longer                   aiayn train --config {CONFIG} --data {data} --out runs/longer train.max_minutes=60
  use your own data              aiayn prepare --src my.en --tgt my.de --out data/mine
                                 aiayn train --config {CONFIG} --data data/mine --out runs/mine
"""


def run_demo(workdir: str | Path = "runs/demo", overrides: list[str] | None = None) -> dict:
    from .attention import export_attention
    from .checkpoint import load_checkpoint
    from .data import PrepareOptions, load_dataset, prepare_dataset
    from .evaluate import format_report, score
    from .train import TrainingInterrupted, train
    from .train.plot import plot_curves, read_metrics
    from .train.state import list_checkpoints
    from .translator import Translator

    work = Path(workdir)
    data_dir, run_dir = work / "data", work / "train"
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the corpus
    _say("1/6", f"Preparing the LibreOffice help corpus, English→German, into {data_dir}")
    t0 = time.perf_counter()
    prepare_dataset(PrepareOptions(out=str(data_dir), **DATA))
    data = load_dataset(data_dir)
    timings["prepare_s"] = time.perf_counter() - t0

    # 2. training (3. averaging happens at its end)
    config = config_path()
    t0 = time.perf_counter()
    if _finished(run_dir) and not overrides:
        _say("2/6", f"Training: reusing the finished run in {run_dir} (delete it to train again)")
    else:
        resume = bool(list_checkpoints(run_dir))
        verb = ("Continuing the finished run" if _finished(run_dir) else "Resuming the interrupted run") if resume else "Training"
        _say("2/6", f"{verb}: {config.name} (the paper's architecture and recipe, smaller), into {run_dir}")
        try:
            train(config, data_dir, run_dir, overrides or [], resume=resume, force=not resume)
        except TrainingInterrupted as e:
            again = shlex.join(["aiayn", "demo", "--workdir", str(work), *(overrides or [])])
            print(f"aiayn demo: training interrupted at update {e.step}"
                  + (f"; saved {e.checkpoint}" if e.saved else "")
                  + f". Run the demo again to continue it:\n  {again}", file=sys.stderr, flush=True)
            raise
    timings["train_s"] = time.perf_counter() - t0
    averaged = run_dir / "averaged" if (run_dir / "averaged").is_dir() else run_dir / "last"
    _say("3/6", f"Using the average of the last checkpoints: {averaged}")

    # 4. evaluation on the held-out test split, with the search the checkpoint records
    t0 = time.perf_counter()
    ckpt = load_checkpoint(averaged)
    search = ckpt.search
    _say("4/6", f"Translating the test split with beam search (beam {search.beam}, α = {search.alpha:g}, max length "
                f"{search.max_len_a:g}·|x|+{search.max_len_b}: the search {CONFIG} recommends)")
    sources, refs = data.raw("test", "src"), data.raw("test", "tgt")
    translator = Translator(ckpt, search=search)  # precision auto, as aiayn translate
    print(f"  in {translator.precision} (precision auto on this machine)", flush=True)
    hyps = translator.translate(sources, progress=True)
    timings["translate_s"] = time.perf_counter() - t0
    hyp_file = work / "test.hyp.de"
    hyp_file.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    result = score(hyps, refs)
    print(format_report(result))

    # 5. examples
    _say("5/6", "Example translations from the test split")
    step = max(1, len(sources) // EXAMPLES)
    for i in range(0, step * EXAMPLES, step):
        print(f"  source     {sources[i]}\n  reference  {refs[i]}\n  aiayn      {hyps[i]}\n")

    # 6. attention
    sentence = _pick_attention_sentence(sources)
    _say("6/6", f"Drawing the attention of every layer and head for: {sentence!r}")
    attention_dir = work / "attention"
    export_attention(ckpt, sentence, attention_dir, force=True)
    curves = plot_curves(read_metrics(run_dir / "metrics.jsonl"), work / "curves.png", title="aiayn demo")

    total = time.perf_counter() - started
    summary = {
        "bleu": round(result["bleu"], 2), "bleu_signature": result["bleu_signature"],
        "brevity_penalty": round(result["brevity_penalty"], 3), "chrf": round(result["chrf"], 2),
        "beam": search.beam, "alpha": search.alpha,
        "train_precision": _train_precision(run_dir), "translate_precision": translator.precision,
        "tokenized_bleu": round(result["tokenized_bleu"], 2), "test_sentences": len(sources),
        "checkpoint": str(averaged), **{k: round(v, 1) for k, v in timings.items()}, "total_s": round(total, 1),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"""
Done in {total / 60:.1f} minutes. sacreBLEU {result['bleu']:.2f} on {len(sources)} held-out sentences.

Where everything is:
  data          {data_dir}  (manifest.json, spm.model, splits)
  run           {run_dir}  (metrics.jsonl, tb/, checkpoints/, best/, averaged/)
  model         {averaged}
  translations  {hyp_file}
  attention     {attention_dir}/  (encoder.png, decoder.png, cross.png, cross_mean.png, attention.json)
  curves        {curves}
  summary       {work / 'summary.json'}

{go_on(data_dir, averaged)}""")
    return summary

