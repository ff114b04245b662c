"""``aiayn export``: then ``ct2-transformers-converter --model OUT --output_dir CT2_DIR``."""

from __future__ import annotations


def run(args) -> int:
    from ..export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, force=args.force))
    return 0
