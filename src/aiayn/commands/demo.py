"""``aiayn demo`` (``make demo``): the whole pipeline on a real corpus."""

from __future__ import annotations


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.workdir, list(args.overrides))
    return 0
