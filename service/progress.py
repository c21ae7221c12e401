"""Progress that reads well in a terminal and in a log.

:func:`progress_bar` is a tqdm bar when its output is a terminal. In a file, a pipe or a pod's
log (no tty) a redrawn bar would write one line per step (a 2000-step training log held 2000
redraws); there it is a :class:`LogProgress` instead: one plain line every ``every_s`` seconds
(default 30, ``$EMRESTORE_PROGRESS_SECONDS``) or every ``every_pct`` percent of the total
(default 10), whichever comes first, and a last line at the end::

    train isotropic: 400/2000 step (20%), 1m12s, 5.6 step/s, ETA 4m48s; loss=0.0213

Both answer the part of tqdm's interface the engine and the commands use: ``update``, ``n`` and
``total`` (settable), ``set_postfix``, ``set_postfix_str``, ``refresh``, ``write``, ``close``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

SECONDS_ENV = "EMRESTORE_PROGRESS_SECONDS"
DEFAULT_EVERY_S = 30.0
DEFAULT_EVERY_PCT = 10.0


def _duration(s: float) -> str:
    s = int(round(max(0.0, s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class LogProgress:
    """Progress as occasional plain lines (see the module docstring)."""

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 file: TextIO | None = None, every_s: float | None = None, every_pct: float = DEFAULT_EVERY_PCT,
                 clock: Callable[[], float] = time.monotonic):
        if every_s is None:
            try:
                every_s = float(os.environ.get(SECONDS_ENV, DEFAULT_EVERY_S))
            except ValueError:
                every_s = DEFAULT_EVERY_S
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file
        self.every_s, self.every_pct = every_s, every_pct
        self._clock = clock
        self._start = self._last_t = clock()
        self._start_n = initial
        self._last_pct = self._pct()
        self._postfix = ""
        self._closed = False
        self._printed_n: int | None = None

    def _out(self) -> TextIO:
        return self.file if self.file is not None else sys.stderr

    def _pct(self) -> float | None:
        return 100.0 * self.n / self.total if self.total else None

    def line(self) -> str:
        elapsed = self._clock() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        pct = self._pct()
        if pct is not None:
            text += f" ({pct:.0f}%)"
        text += f", {_duration(elapsed)}"
        if rate > 0:
            text += f", {rate:.3g} {self.unit}/s"
            if self.total and self.n < self.total:
                text += f", ETA {_duration((self.total - self.n) / rate)}"
        return text + (f"; {self._postfix}" if self._postfix else "")

    def _emit(self) -> None:
        print(self.line(), file=self._out(), flush=True)
        self._last_t = self._clock()
        self._last_pct = self._pct()
        self._printed_n = self.n

    def refresh(self) -> None:
        """Print a line when ``every_s`` seconds or ``every_pct`` percent have passed since the last."""
        if self._closed:
            return
        pct = self._pct()
        if self._clock() - self._last_t >= self.every_s or (
                pct is not None and (self._last_pct is None or pct - self._last_pct >= self.every_pct)):
            self._emit()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        self._postfix = s

    def write(self, s: str, file: TextIO | None = None) -> None:
        print(s, file=file or self._out(), flush=True)

    def close(self) -> None:
        if not self._closed and self._printed_n != self.n:
            self._emit()
        self._closed = True


class _Off:
    """A disabled bar: tracks ``n`` and ``total``, prints nothing."""

    def __init__(self, total=None, initial: int = 0):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        pass

    def refresh(self) -> None:
        pass

    def write(self, s: str, file: TextIO | None = None) -> None:
        print(s, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 disable: bool = False, file: TextIO | None = None, **tqdm_kw):
    """tqdm on a terminal, :class:`LogProgress` elsewhere, nothing when ``disable``.
    ``tqdm_kw`` (e.g. ``bar_format``) are for the terminal bar only."""
    if disable:
        return _Off(total, initial)
    out = file if file is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=out, dynamic_ncols=True, **tqdm_kw)
    return LogProgress(total, desc=desc, unit=unit, initial=initial, file=file)
