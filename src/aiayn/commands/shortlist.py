"""``aiayn shortlist --data DIR --out FILE``: build from the training split, report coverage."""

from __future__ import annotations

import sys

from ..errors import UserError
from ..files import check_output_path


def run(args) -> int:
    from ..data import load_dataset
    from ..inference.shortlist import Shortlist, coverage

    check_output_path(args.out, args.force)
    if args.max_pairs is not None and args.max_pairs < 1:
        raise UserError(f"--max-pairs must be at least 1 (got {args.max_pairs})")
    if args.frequent < 0 or args.per_source < 0:
        raise UserError(f"--frequent and --per-source must not be negative (got {args.frequent}, {args.per_source})")
    data = load_dataset(args.data)
    shortlist = Shortlist.from_dataset(data, args.frequent, args.per_source, args.max_pairs)
    shortlist.save(args.out)
    print(f"wrote {args.out}: {shortlist.settings['pairs']} training pairs, {len(shortlist.frequent)} frequent "
          f"subwords, up to {args.per_source} per source subword", file=sys.stderr)
    valid = data.split("valid")
    if len(valid):
        covered, size = coverage(shortlist, valid.src[:1000], valid.tgt[:1000])
        print(f"valid (first {min(len(valid), 1000)} sentences): {size:.0f} candidates per sentence of "
              f"{shortlist.vocab_size}; reference subwords covered: {covered:.2%}", file=sys.stderr)
    return 0
