"""Ctrl-C during training: finish the update in progress, save, say how to continue.

The first SIGINT does not interrupt anything: `StopRequest` notes it, the trainer ends the run
after the update in progress (and the validation or checkpoint due after it, so that the resumed
run repeats the uninterrupted one exactly), writes a checkpoint (rank 0, atomically as every
checkpoint), and raises `TrainingInterrupted`; ``aiayn train`` prints its report, with the exact
``aiayn train ... --resume`` command, and exits with status 130.

A second SIGINT stops at once, as Python's default does (KeyboardInterrupt): nothing more is
saved, since the weights may be half-way through an optimizer step; the newest checkpoint is
intact and the report names it. Under torchrun a worker receives the terminal's SIGINT and the
one the agent forwards at about the same moment, so a second SIGINT counts only
``SECOND_PRESS_AFTER_S`` seconds or more after the first.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

SECOND_PRESS_AFTER_S = 1.0


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C. ``checkpoint``: the newest checkpoint on disk (None if the run has
    none); ``saved``: whether it was written for this interrupt (at update ``step``). ``command``:
    the command that continues the run, filled in by `aiayn.train.train`, which knows the run's
    arguments."""

    def __init__(self, out_dir: Path, step: int, checkpoint: Path | None, saved: bool, world_size: int = 1):
        super().__init__(f"training interrupted at update {step}")
        self.out_dir, self.step, self.checkpoint, self.saved = out_dir, step, checkpoint, saved
        self.world_size = world_size
        self.command: str | None = None

    def report(self) -> str:
        """What ``aiayn train`` prints: what was kept, and the command to continue."""
        if self.saved and self.checkpoint is not None:
            head = f"aiayn train: interrupted at update {self.step}; saved {self.checkpoint}"
        elif self.checkpoint is not None:
            head = (f"aiayn train: interrupted at update {self.step}, not saved (stopped at once); the newest "
                    f"checkpoint is {self.checkpoint}")
        else:
            head = f"aiayn train: interrupted at update {self.step}, before the run's first checkpoint"
        if self.command is None:
            return head
        how = "Continue with" if self.checkpoint is not None else "Nothing to continue from: start again with"
        return f"{head}\n{how}:\n  {self.command}"

    def __str__(self) -> str:
        return self.report()


class StopRequest:
    """While active (``with StopRequest() as request``): SIGINT sets ``request.requested`` instead
    of raising KeyboardInterrupt; a second one raises it. Only installed where Python's default
    SIGINT handler is in place, in the main thread; elsewhere SIGINT keeps its own behaviour.
    ``announce``: say on standard error what happens now (rank 0 only, under torchrun)."""

    def __init__(self, announce: bool = True) -> None:
        self.requested, self.announce = False, announce
        self._first_at = 0.0
        self._previous = None

    def __enter__(self) -> StopRequest:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at = True, now
            if self.announce:
                print("\naiayn train: Ctrl-C: stopping after this update with a checkpoint (Ctrl-C again to stop at "
                      "once, without saving)", file=sys.stderr, flush=True)
        elif now - self._first_at >= SECOND_PRESS_AFTER_S:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
