"""``aiayn train``, ``aiayn average`` and ``aiayn plot``."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def train(args) -> int:
    """Train; print how the run ended, the model to use and the next commands (TrainResult.next_steps).
    Ctrl-C: print what was saved and the command that continues the run, then let the CLI exit
    with status 130."""
    from ..train import TrainingInterrupted
    from ..train import train as run_training

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    try:
        result = run_training(args.config, args.data, args.out, args.overrides, resume=args.resume, force=args.force,
                              init=args.init)
    except TrainingInterrupted as e:
        if main_rank:
            print(e.report(), file=sys.stderr, flush=True)
        raise
    if main_rank:
        print(result.next_steps())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker(0)
    return 0


def _exit_worker(status: int) -> None:
    """End a torchrun worker whose run is complete (everything written, the process group left)
    without running C++ static destructors: at that point a 2-core machine saw a gloo worker
    abort ("terminate called without an active exception", no Python frame left), which made
    torchrun report a finished run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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
