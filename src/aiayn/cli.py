"""The `aiayn` command: a thin argument parser over the pipeline's stages.

Each subcommand parses its options here and hands them to its command in `aiayn.commands`,
which turns them into typed arguments for the library module that owns the stage:

    prepare   -> aiayn.data               (corpora, subword vocabulary, encoded splits)
    train     -> aiayn.train              (the paper's recipe; torchrun for several processes)
    average   -> aiayn.train.average      (checkpoint averaging)
    plot      -> aiayn.train.plot         (loss and BLEU curves from a run's metrics log)
    translate -> aiayn.translator         (batching, workers; aiayn.search: greedy and beam search)
    evaluate  -> aiayn.evaluate           (sacreBLEU, chrF, paper-comparable BLEU)
    shortlist -> aiayn.inference.shortlist (vocabulary shortlist for faster decoding)
    attention -> aiayn.attention          (attention weights as heatmaps and JSON)
    align     -> aiayn.alignment          (word alignments from the encoder-decoder attention)
    heads     -> aiayn.heads              (what each attention head does, and how much it matters)
    ablate    -> aiayn.ablate             (the paper's Table 3 and the seeds' claims, as training runs)
    export    -> aiayn.export             (Hugging Face Marian layout, for CTranslate2)
    import    -> aiayn.pretrained         (a pretrained Hugging Face Marian model, e.g. OPUS-MT)
    serve     -> aiayn.serve              (HTTP API with dynamic batching, and the attention explorer)
    demo      -> aiayn.demo               (the first run: all of the above on a real corpus)

Nothing here imports torch: ``--help``, ``--version`` and argument errors answer at once, and
a heavy command re-executes itself under a fast allocator (`aiayn.allocator`) before anything
imports torch. Errors a user can fix are raised as `UserError` and printed as one line, exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .config import PRECISIONS, SearchConfig, shipped_configs
from .data.options import PrepareOptions
from .errors import UserError

SEARCH = SearchConfig()  # the paper's settings, shown as the defaults
PREPARE = PrepareOptions(out="")


def _handler(target: str):
    """'module:function' of `aiayn.commands` -> a callable, imported only when the subcommand
    runs (fast --help)."""

    def run(args):
        module, func = target.split(":")
        return getattr(importlib.import_module(f"aiayn.commands.{module}"), func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiayn", description="The Transformer of 'Attention Is All You Need'."
    )
    parser.add_argument("--version", action="version", version=f"aiayn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # -- prepare -------------------------------------------------------------------------------
    p = sub.add_parser("prepare", help="build a dataset directory from parallel text")
    p.add_argument("--out", required=True, help="output dataset directory")
    src = p.add_argument_group("source (choose one)")
    src.add_argument("--src", help="source-side text file, one sentence per line")
    src.add_argument("--tgt", help="target-side text file, line-aligned with --src")
    src.add_argument("--tsv", help="tab-separated file: source<TAB>target per line")
    src.add_argument(
        "--corpus", choices=["libreoffice-help", "multi30k", "copy", "reverse"],
        help="a built-in corpus",
    )
    held = p.add_argument_group(
        "your own held-out sets (with --src/--tgt or --tsv)",
        "line-aligned files, checked like the training files and used whole; a split not given is drawn "
        "from the training data (--valid-size, --test-size)")
    held.add_argument("--valid-src", help="source side of your validation (dev) set")
    held.add_argument("--valid-tgt", help="target side of your validation (dev) set")
    held.add_argument("--test-src", help="source side of your test set")
    held.add_argument("--test-tgt", help="target side of your test set")
    p.add_argument("--lang", default=PREPARE.lang, help="libreoffice-help: target language (default %(default)s)")
    p.add_argument("--path", help="multi30k: directory with train/val/test2016 files")
    p.add_argument("--pair", default=PREPARE.pair, help="multi30k: language pair SRC-TGT (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=PREPARE.vocab_size,
                   help="joint BPE vocabulary size (default %(default)s; smaller for a small corpus)")
    p.add_argument("--lowercase", action="store_true",
                   help="the BPE model lowercases every text it encodes, so the model trained on this data "
                        "reads and writes lowercased text (the Multi30k papers' form, scored by lowercased BLEU)")
    p.add_argument("--tokenizer-from", metavar="CHECKPOINT",
                   help="encode with this checkpoint's tokenizer (to fine-tune it: train --init) instead of "
                        "training a new BPE model; --vocab-size, --bpe-sample and --lowercase do not apply")
    p.add_argument("--bpe-sample", type=int, default=PREPARE.bpe_sample, metavar="N",
                   help="train BPE on at most N sentences of the training text, a seeded uniform sample "
                        "of both sides (default %(default)s); memory of BPE training grows with N")
    p.add_argument("--valid-size", type=int, default=PREPARE.valid_size,
                   help="validation pairs drawn from the training data (default %(default)s)")
    p.add_argument("--test-size", type=int, default=PREPARE.test_size,
                   help="test pairs drawn from the training data (default %(default)s)")
    p.add_argument("--max-len", type=int, default=PREPARE.max_len,
                   help="drop training pairs longer than this many subwords (default %(default)s)")
    p.add_argument("--max-ratio", type=float, default=PREPARE.max_ratio,
                   help="drop training pairs with a larger length ratio (default %(default)s)")
    p.add_argument("--seed", type=int, default=PREPARE.seed, help="seed for splits and synthetic data (default %(default)s)")
    p.add_argument("--train-size", type=int, default=PREPARE.train_size,
                   help="copy/reverse: training pairs to generate (default %(default)s)")
    p.add_argument("--cache-dir", help="where downloaded packages are unpacked (default ~/.cache/aiayn)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_handler("prepare:run"))

    # -- train ---------------------------------------------------------------------------------
    p = sub.add_parser("train", help="train a model with the paper's recipe",
                       description="Train a model with the paper's recipe. For several processes (GPUs, or CPU "
                                   "ranks) run it under torchrun: torchrun --nproc_per_node=N -m aiayn train ...")
    p.add_argument("--config", required=True,
                   help="YAML config file, or the name of a config shipped with aiayn, from any directory: "
                        f"{', '.join(shipped_configs())}")
    p.add_argument("--data", required=True, help="dataset directory written by 'aiayn prepare'")
    p.add_argument("--out", required=True, help="run directory for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (fine-tuning; an imported model too): its model "
                        "config is the run's, the data must be prepared with its tokenizer (prepare "
                        "--tokenizer-from), the optimizer and schedule start fresh")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_updates=1000")
    p.set_defaults(func=_handler("train:train"))

    p = sub.add_parser("average", help="average checkpoints (the paper averages the last 5 or 20)")
    p.add_argument("--out", required=True, help="directory for the averaged checkpoint")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories, or a run directory")
    p.add_argument("--last", type=int, help="with a run directory: average its last K checkpoints")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_handler("train:average"))

    p = sub.add_parser("plot", help="draw loss and BLEU curves of a run as a PNG")
    p.add_argument("run_dir", help="run directory with metrics.jsonl")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=_handler("train:plot"))

    # -- translate / evaluate ------------------------------------------------------------------
    p = sub.add_parser("translate", help="translate text with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--input", help="input file (default: stdin; interactive on a terminal)")
    p.add_argument("--output", help="output file (default: stdout); written as OUTPUT.partial while translating, "
                   "renamed when every line is done (after a failure OUTPUT.partial keeps the finished lines)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file (or OUTPUT.partial)")
    _search_options(p)
    p.add_argument("--nbest", type=int, default=1,
                   help="print the N best per line as INDEX<TAB>SCORE<TAB>LOG_PROB<TAB>TEXT (default %(default)s)")
    p.add_argument("--alignment", action="store_true",
                   help="add each translation's word alignment to its source: TEXT<TAB>ALIGNMENT, the alignment "
                        "as Pharaoh links i-j (source word i, target word j, 0-based); with --nbest, a fifth column")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input line: text, score, log_prob, tokens and, with --alignment, the "
                        "words, links and soft alignment")
    _alignment_options(p.add_argument_group("alignment (with --alignment)"))
    p.set_defaults(func=_handler("translate:run"))

    p = sub.add_parser("evaluate", help="score translations with sacreBLEU and chrF")
    p.add_argument("--checkpoint", help="checkpoint to translate --src with")
    p.add_argument("--src", help="source file (with --checkpoint)")
    p.add_argument("--hyp", help="ready translations (instead of --checkpoint/--src)")
    p.add_argument("--ref", required=True, help="reference translations")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _search_options(p)
    p.set_defaults(func=_handler("evaluate:run"))

    # -- shortlist -----------------------------------------------------------------------------
    p = sub.add_parser("shortlist", help="build a vocabulary shortlist from a dataset (faster decoding)")
    p.add_argument("--data", required=True, help="prepared dataset directory (its training split is read)")
    p.add_argument("--out", required=True, help="output file (JSON)")
    p.add_argument("--frequent", type=int, default=100,
                   help="most frequent target subwords always allowed (default %(default)s)")
    p.add_argument("--per-source", type=int, default=100,
                   help="target subwords allowed per source subword, highest Dice coefficient (default %(default)s)")
    p.add_argument("--max-pairs", type=int, help="read at most this many training pairs (default: all)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_handler("shortlist:run"))

    # -- attention -----------------------------------------------------------------------------
    p = sub.add_parser("attention", help="export attention weights as heatmaps and JSON")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--src", required=True, help="source sentence")
    p.add_argument("--tgt", help="target sentence (default: the model's own translation)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    g = p.add_argument_group("search and speed")
    _search_settings(g)
    _precision_option(g)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.set_defaults(func=_handler("attention:run"))

    # -- align ---------------------------------------------------------------------------------
    p = sub.add_parser("align", help="word alignments of given sentence pairs (Pharaoh i-j lines)",
                       description="Word alignments of given sentence pairs from the model's encoder-decoder "
                                   "attention, teacher-forced: one Pharaoh line per pair (i-j: source word i, "
                                   "target word j, 0-based; words are whitespace-separated).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--src", required=True, help="source file, one sentence per line")
    p.add_argument("--tgt", required=True, help="target file, line-aligned with --src")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per pair: words of each side, the links and the soft alignment")
    g = p.add_argument_group("which attention")
    _alignment_options(g)
    g = p.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=64, help="pairs per batch (default %(default)s)")
    _precision_option(g)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.set_defaults(func=_handler("align:run"))

    # -- heads ---------------------------------------------------------------------------------
    p = sub.add_parser("heads", help="what each attention head does and how much it matters",
                       description="For every layer and head of the three kinds of attention, over a test set: "
                                   "where its weight goes (previous, same, next position, </s>, punctuation), its "
                                   "entropy and confidence, a role; with --ref, how much BLEU and NLL change when "
                                   "it alone is masked, and BLEU as heads are pruned least important first.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--src", required=True, help="source file, one sentence per line")
    p.add_argument("--ref", help="reference translations, line-aligned with --src: teacher-forced statistics, "
                                 "and head importance (BLEU, NLL)")
    p.add_argument("--alignments", metavar="FILE",
                   help="reference word alignments of the --src/--ref pairs (Pharaoh lines, e.g. eflomal's): "
                        "each encoder-decoder head's agreement with them")
    p.add_argument("--out", required=True, help="output directory: heads.json, heads.md, heads.png")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-sentences", type=int, default=500,
                   help="use the first N pairs (default %(default)s; every masked head is a search of them)")
    p.add_argument("--importance", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ref: mask each head alone and prune heads in order (default: on)")
    g = p.add_argument_group("search")
    _search_settings(g)
    _precision_option(g)
    g.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default %(default)s)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.set_defaults(func=_handler("heads:run"))

    # -- ablate --------------------------------------------------------------------------------
    p = sub.add_parser("ablate", help="train the rows of the paper's Table 3 and the seeds' claims",
                       description="Train every row of the paper's Table 3 (and the seeds' claims) as a variation "
                                   "of a base config, with the same budget for each, and write the table "
                                   "(Markdown, JSON, a picture). A killed run continues where it stopped.")
    p.add_argument("--config", required=True, help="the base YAML config, or the name of a shipped config")
    p.add_argument("--data", required=True, help="dataset directory written by 'aiayn prepare'")
    p.add_argument("--out", required=True, help="output directory (one run directory per row and seed)")
    p.add_argument("--rows", default="A,B,C,D,E,claims",
                   help="groups of rows to train: A B C D E (Table 3) and claims (default %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training minutes for every row (default: the config's)")
    budget.add_argument("--updates", type=int, help="training updates for every row (instead of --minutes)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds of every row (default %(default)s; the base row takes at least 3)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the base config")
    p.set_defaults(func=_handler("ablate:run"))

    # -- export --------------------------------------------------------------------------------
    p = sub.add_parser("export", help="export a checkpoint to the Hugging Face Marian layout (for CTranslate2)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="output directory for the Marian model")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_handler("export:run"))

    # -- import --------------------------------------------------------------------------------
    p = sub.add_parser("import", help="import a pretrained Hugging Face Marian model (OPUS-MT) as a checkpoint")
    p.add_argument("--marian", required=True, metavar="DIR",
                   help="a Marian model directory (config.json, model.safetensors or pytorch_model.bin, "
                        "source.spm, target.spm, vocab.json); nothing is downloaded")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint directory")
    p.set_defaults(func=_handler("importing:run"))

    # -- serve ---------------------------------------------------------------------------------
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP: a JSON API and the attention explorer")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; the API has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s; 0 picks a free one)")
    g = p.add_argument_group("search and speed; a request may choose its own beam, alpha and nbest")
    _search_settings(g)
    g.add_argument("--quantize", choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    _precision_option(g)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    g.add_argument("--shortlist", help="vocabulary shortlist file (from aiayn shortlist) for every search")
    p.add_argument("--heads", metavar="FILE",
                   help="heads.json written by 'aiayn heads' for this checkpoint: the explorer shows each head's "
                        "role and opens on the layer that aligns best")
    g = p.add_argument_group("limits and batching")
    g.add_argument("--max-lines", type=int, default=64, help="sentences per request (default %(default)s)")
    g.add_argument("--max-chars", type=int, default=1000, help="characters per sentence (default %(default)s)")
    g.add_argument("--max-beam", type=int, default=8, help="largest beam a request may ask for (default %(default)s)")
    g.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to batch with (default %(default)g ms)")
    g.add_argument("--max-batch-lines", type=int, default=64,
                   help="sentences translated in one batch (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default %(default)s)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every request (default: on)")
    p.set_defaults(func=_handler("serve:run"))

    # -- demo ----------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="the first run: prepare, train, average, evaluate, draw")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.set_defaults(func=_handler("demo:run"))
    return parser


def _recommended(paper) -> str:
    """How the default of a search flag is shown: None (not given) means the checkpoint's setting."""
    return f"(default: the checkpoint's recommended setting, else the paper's {paper:g})"


def _search_settings(g) -> None:
    """The `SearchConfig` flags; None (not given) means the checkpoint's recommended setting."""
    g.add_argument("--beam", type=int, help=f"beam size; 1 is greedy search {_recommended(SEARCH.beam)}")
    g.add_argument("--alpha", type=float, help="length penalty: rank by log P(Y|X) / ((5+|Y|)/6)^alpha, |Y| incl. "
                                               f"EOS {_recommended(SEARCH.alpha)}")
    g.add_argument("--max-len-a", type=float,
                   help=f"max output length = a*|x| + b subwords: a {_recommended(SEARCH.max_len_a)}")
    g.add_argument("--max-len-b", type=int, help=f"max output length = a*|x| + b: b {_recommended(SEARCH.max_len_b)}")


def _precision_option(g) -> None:
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="arithmetic of the model: auto is bf16 where the CPU or GPU does bf16 natively (AVX512-BF16 "
                        "or AMX; Ampere or newer), else fp32 (default %(default)s)")


def _alignment_options(g) -> None:
    """The `AlignmentSettings` flags (aiayn.alignment)."""
    g.add_argument("--alignment-layer", type=int, default=None, metavar="N",
                   help="decoder layer the alignment is read from: 1 ... N, or -1 for the last, -2 the one below "
                        "(default: -1, chosen by measurement; docs/alignment.md)")
    g.add_argument("--alignment-head", type=int, default=None, metavar="H",
                   help="one head of that layer, 1 ... h (default: the mean of its heads)")
    g.add_argument("--alignment-rows", choices=["predicts", "reads"], default="predicts",
                   help="a target word takes the decoder position that predicts it, or the one that reads it "
                        "(default %(default)s)")


def _search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search and speed")
    _search_settings(g)
    g.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default %(default)s)")
    g.add_argument("--batch-tokens", type=int,
                   help="padded source tokens per batch; replaces --batch-size (default: not used)")
    g.add_argument("--quantize", choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: torch's, all cores; 1 per worker with --workers)")
    g.add_argument("--workers", type=int, default=1,
                   help="CPU: worker processes translating different batches at once (default 1; a small model "
                        "on several cores translates faster with --workers set to the cores)")
    _precision_option(g)
    g.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU: oneDNN-packed weights, same outputs, faster (default: on)")
    g.add_argument("--shortlist", help="vocabulary shortlist file (from aiayn shortlist): outputs restricted to "
                                       "each sentence's own candidates; faster, scores normalised over them")


# Subcommands that run the model: they get a fast memory allocator (aiayn.allocator).
HEAVY_COMMANDS = {"train", "translate", "evaluate", "attention", "demo", "serve", "align", "heads", "ablate"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command in HEAVY_COMMANDS:
        # Only for a real command line (not a call from Python): this may replace the
        # process with the same command run under tcmalloc/jemalloc.
        from .allocator import reexec_with_fast_allocator

        reexec_with_fast_allocator()
    try:
        result = args.func(args)
    except UserError as e:
        print(f"aiayn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aiayn: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
