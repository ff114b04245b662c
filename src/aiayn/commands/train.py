"""``aiayn train``, ``aiayn average`` and ``aiayn plot``."""

from __future__ import annotations

import os
from pathlib import Path


def train(args) -> int:
    from ..train import train as run_training

    result = run_training(args.config, args.data, args.out, args.overrides, resume=args.resume, force=args.force)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    bleu = f", best valid BLEU {result.best_bleu:.2f}" if result.best_bleu is not None else ""
    print(f"aiayn train: stopped at update {result.step} ({result.stop_reason}){bleu}; "
          f"checkpoints in {Path(args.out) / 'checkpoints'}")
    return 0


def average(args) -> int:
    from ..train.average import average_checkpoints, resolve_inputs

    paths = resolve_inputs(args.checkpoints, args.last)
    out = average_checkpoints(paths, Path(args.out), force=args.force)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {out}")
    return 0


def plot(args) -> int:
    from ..train.plot import METRICS_FILE, plot_curves, read_metrics

    run = Path(args.run_dir)
    out = Path(args.out) if args.out else run / "curves.png"
    plot_curves(read_metrics(run / METRICS_FILE), out, title=run.resolve().name)
    print(f"wrote {out}")
    return 0
