"""``aiayn ablate``: the rows of the paper's Table 3 and its claims, trained and tabulated
(`aiayn.ablate`)."""

from __future__ import annotations

import shlex
import sys


def continue_command(args) -> str:
    """The command that continues this ablation where it stopped (the same arguments)."""
    words = ["aiayn", "ablate", "--config", args.config, "--data", args.data, "--out", args.out, "--rows", args.rows]
    if args.minutes is not None:
        words += ["--minutes", f"{args.minutes:g}"]
    if args.updates is not None:
        words += ["--updates", str(args.updates)]
    words += ["--seeds", str(args.seeds), *args.overrides]
    return shlex.join(words)


def run(args) -> int:
    from ..ablate import make_plan, run_ablation
    from ..train import TrainingInterrupted

    plan = make_plan(args.config, args.data, args.out, args.rows, minutes=args.minutes, updates=args.updates,
                     seeds=args.seeds, overrides=args.overrides)
    runs = sum(len(plan.seeds[r.name]) for r in plan.rows if r.same_as is None)
    print(f"aiayn ablate: {len(plan.rows)} rows, {runs} runs of {plan.budget} each, into {plan.out}", file=sys.stderr,
          flush=True)
    try:
        run_ablation(plan, log=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt as e:  # TrainingInterrupted included: the trainer saved what it could
        where = ""
        if isinstance(e, TrainingInterrupted):
            where = f" at update {e.step} of {e.out_dir}" + (f"; saved {e.checkpoint}" if e.checkpoint else "")
        print(f"aiayn ablate: interrupted{where}. Finished runs are kept and a half-trained one resumes exactly.\n"
              f"Continue with:\n  {continue_command(args)}", file=sys.stderr, flush=True)
        raise
    for name in ("table.md", "table.json", "table.png", "claims.png"):
        if (plan.out / name).is_file():
            print(f"  {plan.out / name}")
    return 0
