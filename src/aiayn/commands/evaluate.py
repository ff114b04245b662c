"""``aiayn evaluate``: --hyp FILE --ref FILE, or --checkpoint DIR --src FILE --ref FILE.

Streamed: the files are counted first (blocks of bytes; different line counts are a one-line
error before any scoring), then read together a chunk at a time and scored by an
`aiayn.evaluate.Scorer`, which keeps only summed statistics; with --checkpoint, --src is
translated chunk by chunk (`Translator.translate_stream`) and each chunk is scored as it is done.
Memory does not grow with the number of lines. Each line is validated when it is reached: a bad
line (invalid UTF-8, a NUL byte) is a one-line error naming FILE:LINE, and nothing is printed.
"""

from __future__ import annotations

import json
import sys
import time
from itertools import islice
from pathlib import Path

from ..errors import UserError
from .translate import translator_from_args


def _count(path: str) -> int:
    """The lines of a file to score (a UserError if it is missing or empty), counted without reading it as text."""
    from ..data.text import count_lines

    p = Path(path)
    if not p.is_file():
        raise UserError("file not found" if not p.exists() else "not a regular file", path=path)
    lines = count_lines(p)
    if not lines:
        raise UserError("the file is empty: nothing to score", path=path)
    return lines


def _chunks(lines, size: int):
    """Consecutive lists of ``size`` items of an iterator (the last one shorter)."""
    while block := list(islice(lines, size)):
        yield block


def run(args) -> int:
    from ..data.text import iter_input_lines
    from ..evaluate import CHUNK_LINES, Scorer, format_report

    if args.hyp is not None and (args.checkpoint is not None or args.src is not None):
        raise UserError("give either --hyp, or --checkpoint with --src, not both")
    if args.hyp is None and (args.checkpoint is None or args.src is None):
        raise UserError("give --hyp FILE, or both --checkpoint DIR and --src FILE")
    n_refs = _count(args.ref)
    given = args.hyp if args.hyp is not None else args.src
    n_given = _count(given)
    if n_given != n_refs:
        raise UserError(f"{n_given} lines, but {args.ref} has {n_refs}", path=given)
    refs = iter_input_lines(args.ref)
    scorer = Scorer()
    info: dict = {}
    if args.hyp is not None:
        for block in _chunks(iter_input_lines(args.hyp), CHUNK_LINES):
            scorer.add(block, list(islice(refs, len(block))))
        info["hyp"] = args.hyp
    else:
        translator = translator_from_args(args)
        stream = translator.translate_stream(iter_input_lines(args.src), progress=n_given >= 100, total=n_given)
        translating = 0.0  # reading and translating --src; the scoring between chunks is not counted
        while True:
            start = time.perf_counter()
            block = next(stream, None)
            translating += time.perf_counter() - start
            if block is None:
                break
            scorer.add([hyps[0].text for hyps in block], list(islice(refs, len(block))))
            del block  # not held while the next chunk is translated
        s = translator.search_config
        info.update(checkpoint=args.checkpoint, src=args.src, beam=s.beam, alpha=s.alpha,
                    max_len_a=s.max_len_a, max_len_b=s.max_len_b, quantize=args.quantize,
                    shortlist=args.shortlist, device=str(translator.device),
                    translate_seconds=round(translating, 3), lowercased_model=translator.tokenizer.lowercases)
    result = {**scorer.result(), "ref": args.ref, **info}
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_report(result))
    sys.stdout.flush()
    return 0
