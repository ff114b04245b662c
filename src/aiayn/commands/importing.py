"""``aiayn import --marian DIR --out CK``: a pretrained Marian (OPUS-MT) model as a checkpoint."""

from __future__ import annotations


def run(args) -> int:
    from ..pretrained import import_marian

    print(import_marian(args.marian, args.out, force=args.force))
    return 0
