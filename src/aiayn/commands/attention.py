"""``aiayn attention``: one sentence pair's attention as heatmaps and JSON."""

from __future__ import annotations

from .translate import search_config


def run(args) -> int:
    from ..attention import export_attention
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    paths = export_attention(ckpt, args.src, args.out, args.tgt, force=args.force, search=search_config(args, ckpt))
    for path in paths:
        print(path)
    return 0
