"""``aiayn heads``: what each attention head does, and how much it matters (`aiayn.heads`)."""

from __future__ import annotations

import sys

from .translate import search_config


def run(args) -> int:
    from ..checkpoint import load_checkpoint
    from ..heads import check_output, measure_heads, read_inputs, write_report
    from ..translator import inference_precision, resolve_device

    device = resolve_device(args.device)
    precision = inference_precision(args.precision, device)  # before loading: bf16 where emulated fails fast
    check_output(args.out, args.force)
    inputs = read_inputs(args.src, args.ref, args.alignments, args.max_sentences)
    if args.importance and args.ref is None:
        print("aiayn: head importance (BLEU and NLL with each head masked) needs --ref: skipped", file=sys.stderr)
    ckpt = load_checkpoint(args.checkpoint)
    doc = measure_heads(ckpt, inputs, search=search_config(args, ckpt), precision=precision, device=device,
                        importance=args.importance, batch_size=args.batch_size, progress=True)
    for path in write_report(doc, args.out, force=args.force):
        print(path)
    return 0
