"""``aiayn align``: word alignments of given sentence pairs, one Pharaoh line per pair."""

from __future__ import annotations

import json
import sys

from ..errors import UserError
from ..files import check_output_path
from .translate import _PartialOutput, alignment_settings


def run(args) -> int:
    """--src/--tgt pairs -> one line per input line on stdout or --output: the Pharaoh links
    (``i-j``, source word i, target word j, 0-based) or, with --json, one object with the words,
    links and soft alignment. A pair blank on both sides, or too long for the model, gives an
    empty line (an empty object with --json), so output line k belongs to input line k."""
    from ..alignment import align_pairs
    from ..checkpoint import load_checkpoint
    from ..data.text import iter_parallel, require_text
    from ..translator import inference_precision, prepare_for_inference, resolve_device

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    check_output_path(args.output, args.force)
    require_text(args.src)  # before loading the model: a missing or empty file fails fast
    require_text(args.tgt)
    device = resolve_device(args.device)
    precision = inference_precision(args.precision, device)
    ckpt = load_checkpoint(args.checkpoint)
    model = prepare_for_inference(ckpt.model, device, precision=precision, inplace=True)
    settings = alignment_settings(args).check(model.config.n_decoder_layers, model.config.n_heads)
    aligned = align_pairs(model, ckpt.tokenizer, iter_parallel(args.src, args.tgt), settings,
                          batch_size=args.batch_size, where=args.src)

    def lines():
        written = 0
        for number, alignment in aligned:
            while written < number - 1:  # pairs blank on both sides
                written += 1
                yield "{}" if args.json else ""
            written += 1
            if alignment is None:
                yield "{}" if args.json else ""
            else:
                yield json.dumps(alignment.to_dict(), ensure_ascii=False) if args.json else alignment.pharaoh

    if args.output is None:
        for line in lines():
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return 0
    with _PartialOutput(args.output, args.force) as out:
        for count, line in enumerate(lines(), start=1):
            out.file.write(line + "\n")
            out.done(count)
    return 0
