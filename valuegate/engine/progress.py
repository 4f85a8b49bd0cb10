"""Progress of a long step: done / total, rate and ETA, wherever the step runs.

On a terminal (stderr a TTY, bars wanted) a tqdm bar; otherwise one log line (logger
``valuegate.progress``, level INFO) at most every ``every`` seconds and a last one when the step ends, so a
log file, a CI log and Prefect's UI (``valuegate run`` routes that logger to it) show how far a long step is.
The interval is :data:`DEFAULT_EVERY_S` unless the caller sets it (``Settings.progress_seconds``, through
:func:`use_progress_interval` at each step's entry point, or :func:`progress_every` for a block).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from tqdm.auto import tqdm

__all__ = ["DEFAULT_EVERY_S", "LOGGER", "Progress", "progress_every", "use_progress_interval"]

DEFAULT_EVERY_S = 10.0
LOGGER = "valuegate.progress"
_EVERY: contextvars.ContextVar[float] = contextvars.ContextVar("valuegate_progress_every", default=DEFAULT_EVERY_S)
log = logging.getLogger(LOGGER)
log.setLevel(logging.INFO)  # its lines are INFO: shown wherever a handler listens (no handler: nowhere)


def use_progress_interval(seconds: float) -> None:
    """From now on in this context (thread, task), :class:`Progress` logs a line at most every ``seconds``: what
    each step's entry point calls with ``Settings.progress_seconds``."""
    _EVERY.set(float(seconds))


@contextmanager
def progress_every(seconds: float) -> Iterator[None]:
    """Within the block, :class:`Progress` logs a line at most every ``seconds`` (0: at every update)."""
    token = _EVERY.set(float(seconds))
    try:
        yield
    finally:
        _EVERY.reset(token)


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _is_terminal(stream: IO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


class Progress:
    """``done / total`` of one step, as a bar on a terminal or as log lines otherwise.

    Args:
        total: units of work (samples, rows). desc: the step's name in every line.
        unit: what a unit is. bar: a tqdm bar when stderr is a terminal (False: log lines only).
        every: seconds between log lines (None: the value of :func:`progress_every`, else 10 s).

    A log line reads ``extract: 120/600 samples (20%), 3.1 samples/s, ETA 2m35s``.
    """

    def __init__(self, total: int, desc: str, unit: str = "sample", bar: bool = True,
                 every: float | None = None) -> None:
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, 0
        self.every = _EVERY.get() if every is None else float(every)
        self.t0 = self.t_last = time.perf_counter()
        self.logged = False
        self.bar = (tqdm(total=total, desc=desc, unit=unit, leave=False)
                    if bar and _is_terminal(sys.stderr) else None)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.t_last >= self.every:
            self.t_last = now
            self.logged = True
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The log line of where the step is (done / total, rate, ETA)."""
        elapsed = (time.perf_counter() if now is None else now) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        head = f"{self.desc}: {self.done}/{self.total} {self.unit}s{pct}, {rate:.3g} {self.unit}s/s"
        if self.done >= self.total:
            return f"{head}, done in {_duration(elapsed)}"
        eta = f"ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else "ETA unknown"
        return f"{head}, {eta}"

    def close(self) -> None:
        """End the bar; without a bar, a last line when the step logged any (a long step says it ended)."""
        if self.bar is not None:
            self.bar.close()
        elif self.logged or time.perf_counter() - self.t0 >= self.every:
            log.info(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
