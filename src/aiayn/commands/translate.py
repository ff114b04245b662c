"""``aiayn translate``, and the search and speed options it shares with ``evaluate`` and ``attention``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..errors import UserError
from ..files import check_output_path


def search_config(args, checkpoint):
    """The `SearchConfig` of a command: the flags given, else the checkpoint's recommended settings."""
    return checkpoint.search.replace(beam=getattr(args, "beam", None), alpha=getattr(args, "alpha", None),
                                     max_len_a=getattr(args, "max_len_a", None),
                                     max_len_b=getattr(args, "max_len_b", None)).check()


def translator_from_args(args):
    """A `Translator` from the search and speed options of ``aiayn translate`` / ``evaluate``."""
    from ..checkpoint import load_checkpoint
    from ..translator import Translator, inference_precision, resolve_device

    # Before loading: a wrong --device, or bf16 where it is emulated, fails fast.
    inference_precision(args.precision, resolve_device(args.device, args.quantize), args.quantize)
    if args.workers > 1:  # each worker loads the checkpoint itself: pass the path
        from ..checkpoint import check_checkpoint_dir, read_meta, search_from_meta

        check_checkpoint_dir(args.checkpoint)
        search = search_from_meta(read_meta(args.checkpoint)).replace(
            beam=args.beam, alpha=args.alpha, max_len_a=args.max_len_a, max_len_b=args.max_len_b).check()
        checkpoint = args.checkpoint
    else:
        checkpoint = load_checkpoint(args.checkpoint)
        search = search_config(args, checkpoint)
    return Translator(checkpoint, search=search, device=args.device, quantize=args.quantize,
                      precision=args.precision, prepack=args.prepack,
                      batch_size=args.batch_size, batch_tokens=args.batch_tokens, threads=args.threads,
                      workers=args.workers, shortlist=args.shortlist)


def format_nbest(index: int, hyps) -> list[str]:
    """Moses-style n-best lines: sentence index (0-based), score, log-probability, text."""
    return [f"{index}\t{h.score:.4f}\t{h.log_prob:.4f}\t{h.text}" for h in hyps]


def _interactive(translator, nbest: int, out) -> None:
    """Translate each line as it is typed; prompts go to stderr so stdout stays clean."""
    print("aiayn: type a sentence and press Enter; Ctrl-D quits.", file=sys.stderr)
    index = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        hyps = translator.translate_nbest([line.rstrip("\r\n")], nbest=nbest)[0]
        text = "\n".join(format_nbest(index, hyps)) if nbest > 1 else hyps[0].text
        print(text, file=out, flush=True)
        index += 1


def run(args) -> int:
    """stdin or --input -> stdout or --output, in input order."""
    from ..data.text import read_input_lines

    check_output_path(args.output, args.force)
    interactive = args.input is None and sys.stdin.isatty()
    lines = None if interactive else read_input_lines(args.input)
    translator = translator_from_args(args)
    if interactive:
        if args.output is None:
            _interactive(translator, args.nbest, sys.stdout)
        else:
            with _writing(args.output), open(args.output, "w", encoding="utf-8") as out:
                _interactive(translator, args.nbest, out)
        return 0
    results = translator.translate_nbest(lines, nbest=args.nbest, progress=len(lines) >= 100)
    if args.nbest > 1:
        output = [row for i, hyps in enumerate(results) for row in format_nbest(i, hyps)]
    else:
        output = [hyps[0].text for hyps in results]
    text = "".join(line + "\n" for line in output)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with _writing(args.output):
            Path(args.output).write_text(text, encoding="utf-8")
    return 0


@contextlib.contextmanager
def _writing(path: str):
    """An OSError while writing --output (a full disk, no permission) as a one-line UserError."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write: {e.strerror or e}", path=path) from None
