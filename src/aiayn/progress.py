"""Progress on standard error: a tqdm bar on a terminal, plain periodic lines in a log.

A bar redraws itself many times a second; written into a file (``aiayn train ... 2> log``) each
frame becomes text, so a redirected run gets a plain line every ``PLAIN_EVERY_S`` seconds
instead (and one at the end), with the same counts and the same postfix.
"""

from __future__ import annotations

import sys
import time
from typing import Any

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """The subset of tqdm's interface aiayn uses, written as occasional lines."""

    def __init__(self, total: float | None, desc: str, unit: str, initial: float = 0, postfix: Any = None,
                 every_s: float = PLAIN_EVERY_S, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = "" if postfix is None else self._format(postfix)
        self.every_s, self.file = every_s, file or sys.stderr
        self._start = self._last = time.monotonic()
        self._closed = False

    @staticmethod
    def _format(postfix: Any) -> str:
        return ", ".join(f"{k}={v}" for k, v in postfix.items()) if isinstance(postfix, dict) else str(postfix)

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._write()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = self._format({**(ordered_dict or {}), **kwargs})

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def _write(self) -> None:
        self._last = time.monotonic()
        done = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        elapsed = self._last - self._start
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit} ({elapsed:.0f} s){extra}", file=self.file, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(PlainProgress):
    def _write(self) -> None:
        pass


def progress_bar(total: float | None, desc: str, unit: str, *, enabled: bool = True, initial: float = 0,
                 postfix: Any = None, **tqdm_options: Any):
    """A progress display: tqdm on a terminal, `PlainProgress` otherwise, nothing if not ``enabled``."""
    if not enabled:
        return _Silent(total, desc, unit, initial)
    stream = sys.stderr
    if stream is not None and stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, postfix=postfix, file=stream,
                    dynamic_ncols=True, **tqdm_options)
    return PlainProgress(total, desc, unit, initial=initial, postfix=postfix)
