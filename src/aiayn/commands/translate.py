"""``aiayn translate``, and the search and speed options it shares with ``evaluate`` and ``attention``."""

from __future__ import annotations

import contextlib
import os
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


def alignment_settings(args):
    """The `AlignmentSettings` of the --alignment-* flags (None: the flags' defaults)."""
    from ..alignment import DEFAULT_LAYER, AlignmentSettings

    layer = getattr(args, "alignment_layer", None)
    return AlignmentSettings(layer=DEFAULT_LAYER if layer is None else layer,
                             head=getattr(args, "alignment_head", None),
                             rows=getattr(args, "alignment_rows", None) or AlignmentSettings.rows)


def format_nbest(index: int, hyps) -> list[str]:
    """Moses-style n-best lines: sentence index (0-based), score, log-probability, text; with
    alignments, the Pharaoh links as a fifth column."""
    return [f"{index}\t{h.score:.4f}\t{h.log_prob:.4f}\t{h.text}"
            + (f"\t{h.alignment.pharaoh}" if h.alignment is not None else "") for h in hyps]


def format_lines(index: int, hyps, nbest: int, as_json: bool) -> list[str]:
    """The output lines of one input line: its translation (``TEXT``, or ``TEXT<TAB>ALIGNMENT``
    with alignments), its n-best lines (`format_nbest`), or one JSON object."""
    if as_json:
        import json

        def one(h) -> dict:
            doc = {"text": h.text, "score": round(h.score, 6), "log_prob": round(h.log_prob, 6), "tokens": h.tokens}
            if h.alignment is not None:
                doc["alignment"] = h.alignment.to_dict()
            return doc

        doc = {"index": index, **one(hyps[0])} if nbest == 1 else {"index": index, "nbest": [one(h) for h in hyps]}
        return [json.dumps(doc, ensure_ascii=False)]
    if nbest > 1:
        return format_nbest(index, hyps)
    best = hyps[0]
    return [best.text + (f"\t{best.alignment.pharaoh}" if best.alignment is not None else "")]


def _interactive(translator, nbest: int, out, as_json: bool = False, alignment=None) -> None:
    """Translate each line as it is typed; prompts go to stderr so stdout stays clean."""
    print("aiayn: type a sentence and press Enter; Ctrl-D quits.", file=sys.stderr)
    index = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        hyps = translator.translate_nbest([line.rstrip("\r\n")], nbest=nbest, alignment=alignment)[0]
        print("\n".join(format_lines(index, hyps, nbest, as_json)), file=out, flush=True)
        index += 1


def run(args) -> int:
    """stdin or --input -> stdout or --output, in input order, streamed: the input is read and
    translated in chunks of `aiayn.translator.CHUNK_LINES` lines, and each chunk's translations
    are written (and flushed) as soon as it is done, so memory does not grow with the input and
    standard output receives translations while the rest is still being translated.

    Each input line is validated when it is reached: a bad line (invalid UTF-8, a NUL byte) far
    into the file is a one-line error naming FILE:LINE (exit status 2) after the chunks before it
    were written; on standard output those lines have been printed, and the status says the
    output is incomplete.

    --output is never left looking complete when it is not: the translations go to
    ``OUTPUT.partial`` (flushed after every chunk), which becomes OUTPUT by one rename only when
    every line is translated; an existing OUTPUT (replaced with --force) is untouched until then.
    After a failure (a bad input line, a full disk, an interrupt, a crash) OUTPUT is absent (or
    still the old one) and ``OUTPUT.partial`` holds, in order, the translations of the input's
    first lines, the chunks finished before the failure; the error says how many lines. (Only a
    process killed while writing a chunk can leave a last line cut short.) A failure before the
    first chunk is written leaves no ``OUTPUT.partial``. An ``OUTPUT.partial`` already there is
    replaced only with --force. An --output that is not a regular file (/dev/null, a FIFO) is
    written straight through.
    """
    from itertools import chain, islice

    from ..data.text import count_lines, iter_input_lines

    check_output_path(args.output, args.force)
    interactive = args.input is None and sys.stdin.isatty()
    output = None if interactive or args.output is None else _PartialOutput(args.output, args.force)
    if not interactive:
        lines = iter_input_lines(args.input)
        # Read the head now, before the model is loaded: a missing --input, or a bad first line,
        # fails fast. Progress is shown from 100 lines, as when the whole input was read first:
        # a file is counted (cheap: blocks of bytes); of standard input, up to 100 lines are read ahead.
        head = list(islice(lines, 1 if args.input is not None else 100))
        total = count_lines(args.input) if args.input is not None else None
        progress = (total if total is not None else len(head)) >= 100
        lines = chain(head, lines)
    translator = translator_from_args(args)
    as_json = getattr(args, "json", False)
    alignment = alignment_settings(args) if getattr(args, "alignment", False) else None
    if alignment is not None:
        alignment.check(translator.config.n_decoder_layers, translator.config.n_heads)
    if interactive:
        if args.output is None:
            _interactive(translator, args.nbest, sys.stdout, as_json, alignment)
        else:
            with _writing(args.output), open(args.output, "w", encoding="utf-8") as out:
                _interactive(translator, args.nbest, out, as_json, alignment)
        return 0
    results = translator.translate_stream(lines, nbest=args.nbest, progress=progress, total=total,
                                          alignment=alignment)
    if output is None:
        _write_stream(results, args.nbest, sys.stdout, lambda n: None, as_json)
        return 0
    with output:
        _write_stream(results, args.nbest, output.file, output.done, as_json)
    return 0


def _write_stream(results, nbest: int, out, done, as_json: bool = False) -> None:
    """Each chunk of ``results`` (`Translator.translate_stream`) written to ``out`` and flushed as
    it completes; ``done(n)`` after each, with the input lines written so far."""
    index = 0
    for block in results:
        rows = [row for i, hyps in enumerate(block, start=index) for row in format_lines(i, hyps, nbest, as_json)]
        out.write("".join(row + "\n" for row in rows))
        out.flush()
        index += len(block)
        done(index)
        del block, rows  # not held while the next chunk is translated


class _PartialOutput:
    """``with _PartialOutput(path, force) as out:`` write to ``out.file``; calling
    ``out.done(n)`` after each flushed chunk (n input lines written so far). The lines go to
    ``PATH.partial``, renamed to PATH when the block ends without an error. On an error they stay
    in ``PATH.partial`` (removed if nothing was written yet), and the error says so: a `UserError`
    (a bad input line, an OSError while writing) gains the count of lines kept in the partial
    file; anything else (a crash, an interrupt) is followed by a line on stderr saying where
    they are. A path that exists and is not a regular file (a device, a FIFO) is written straight
    through. The checks happen when this is made, before any work."""

    def __init__(self, path: str, force: bool):
        self.path = Path(path)
        self.direct = self.path.exists() and not self.path.is_file()  # /dev/null, /dev/full, a FIFO
        if self.path.is_symlink() and not self.direct:
            self.path = Path(os.path.realpath(self.path))  # the link's target is replaced, not the link
        self.partial = self.path.with_name(self.path.name + ".partial")
        if not self.direct and (self.partial.exists() or self.partial.is_symlink()):
            if not self.partial.is_file() or self.partial.is_symlink():
                raise UserError("exists and is not a regular file; move it away (aiayn writes its output there "
                                "while translating)", path=self.partial)
            if not force:
                raise UserError("already exists (left by a translation that did not finish?); pass --force to "
                                "overwrite it", path=self.partial)
        self.file, self.lines = None, 0

    def done(self, lines: int) -> None:
        self.lines = lines

    def __enter__(self) -> _PartialOutput:
        with _writing(self.path if self.direct else self.partial):
            self.file = open(self.path if self.direct else self.partial, "w", encoding="utf-8")
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            try:
                self.file.flush()
                if not self.direct:
                    os.fsync(self.file.fileno())
                self.file.close()
                if not self.direct:
                    os.replace(self.partial, self.path)
                return False
            except OSError as e:
                kind, error = OSError, e
        with contextlib.suppress(OSError):
            self.file.close()  # may fail again on a full disk: what was flushed is kept
        if self.direct:
            if issubclass(kind, OSError):
                raise UserError(f"cannot write: {error.strerror or error}", path=self.path) from None
            return False
        if self.lines == 0:
            with contextlib.suppress(OSError):
                self.partial.unlink()
            kept = f"nothing was written to {self.path}"
        else:
            kept = (f"the translations of the first {self.lines} lines are in {self.partial}; "
                    f"{self.path} was not written")
        if issubclass(kind, OSError):
            raise UserError(f"cannot write: {error.strerror or error}; {kept}", path=self.partial) from None
        if issubclass(kind, UserError):
            raise _with_note(error, kept) from None
        print(f"aiayn: translation stopped: {kept}", file=sys.stderr)
        return False


def _with_note(error: UserError, note: str) -> UserError:
    """``error`` with ``note`` appended to its one line, keeping its path and line."""
    new = UserError(f"{error}; {note}")
    new.path, new.line = error.path, error.line
    return new


@contextlib.contextmanager
def _writing(path):
    """An OSError while writing --output (a full disk, no permission) as a one-line UserError."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write: {e.strerror or e}", path=path) from None
