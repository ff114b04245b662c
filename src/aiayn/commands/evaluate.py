"""``aiayn evaluate``: --hyp FILE --ref FILE, or --checkpoint DIR --src FILE --ref FILE."""

from __future__ import annotations

import json
import sys
import time

from ..errors import UserError
from .translate import translator_from_args


def _read(path: str) -> list[str]:
    from ..data.text import read_input_lines

    lines = read_input_lines(path)
    if not lines:
        raise UserError("the file is empty: nothing to score", path=path)
    return lines


def run(args) -> int:
    from ..evaluate import format_report, score

    if args.hyp is not None and (args.checkpoint is not None or args.src is not None):
        raise UserError("give either --hyp, or --checkpoint with --src, not both")
    if args.hyp is None and (args.checkpoint is None or args.src is None):
        raise UserError("give --hyp FILE, or both --checkpoint DIR and --src FILE")
    refs = _read(args.ref)
    info: dict = {}
    if args.hyp is not None:
        hyps = _read(args.hyp)
        if len(hyps) != len(refs):
            raise UserError(f"{len(hyps)} lines, but {args.ref} has {len(refs)}", path=args.hyp)
        info["hyp"] = args.hyp
    else:
        src = _read(args.src)
        if len(src) != len(refs):
            raise UserError(f"{len(src)} lines, but {args.ref} has {len(refs)}", path=args.src)
        translator = translator_from_args(args)
        start = time.perf_counter()
        hyps = translator.translate(src, progress=len(src) >= 100)
        s = translator.search_config
        info.update(checkpoint=args.checkpoint, src=args.src, beam=s.beam, alpha=s.alpha,
                    max_len_a=s.max_len_a, max_len_b=s.max_len_b, quantize=args.quantize,
                    shortlist=args.shortlist, device=str(translator.device),
                    translate_seconds=round(time.perf_counter() - start, 3))
    result = {**score(hyps, refs), "ref": args.ref, **info}
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_report(result))
    sys.stdout.flush()
    return 0
