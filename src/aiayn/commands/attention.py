"""``aiayn attention``: one sentence pair's attention as heatmaps and JSON."""

from __future__ import annotations

from .translate import search_config


def run(args) -> int:
    import dataclasses

    from ..attention import export_attention
    from ..checkpoint import load_checkpoint
    from ..translator import inference_precision, prepare_for_inference, resolve_device

    device = resolve_device(args.device)
    precision = inference_precision(args.precision, device)  # before loading: bf16 where emulated fails fast
    ckpt = load_checkpoint(args.checkpoint)
    # The model as translate runs it (device, precision), so the pictures show that model's attention.
    ckpt = dataclasses.replace(ckpt, model=prepare_for_inference(ckpt.model, device, precision=precision,
                                                                 prepack=False, inplace=True))
    paths = export_attention(ckpt, args.src, args.out, args.tgt, force=args.force, search=search_config(args, ckpt))
    for path in paths:
        print(path)
    return 0
