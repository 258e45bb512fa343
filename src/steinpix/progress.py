"""Progress bars on a terminal: one over a command's images, one within a large image.

Bars are drawn only when stderr is a terminal and the log shows INFO (``-v WARNING`` silences
both). Otherwise the per-image log lines (``[i/n] ...``) are all there is, so logs in files,
CI and ``docker run`` without ``-t`` stay plain and greppable. Core loops report through
:func:`set_total`, :func:`advance` and :func:`strip`, which do nothing unless a command opened
a bar with :func:`bar`; log lines are printed above the bars while they are shown.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

from steinpix import interrupts

logger = logging.getLogger("steinpix")

# an image gets a bar of its own when it is computed in at least this many strips
STRIP_BAR_MIN = 3

_lock = threading.Lock()
_bars: _Bars | None = None


class _Bars:
    def __init__(self, tqdm: Any, main: Any) -> None:
        self.tqdm = tqdm
        self.main = main
        self.inner: Any = None

    def close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None


def wanted() -> bool:
    """Whether bars are drawn: stderr is a terminal and INFO messages are logged."""
    return sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)


@contextlib.contextmanager
def bar(desc: str, total: int | None = None, unit: str = "image") -> Iterator[None]:
    """Show a bar (count, rate, ETA) over the items of ``desc`` while the block runs.

    Parameters
    ----------
    desc : str
        Label, e.g. ``"run"``.
    total : int, optional
        Number of items, when known; else :func:`set_total` gives it later.
    unit : str
        What an item is.
    """
    global _bars
    if not wanted():
        yield
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logger]), tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True
    ) as main:
        _bars = _Bars(tqdm, main)
        try:
            yield
        finally:
            with _lock:
                _bars.close_inner()
                _bars = None


def set_total(total: int) -> None:
    """Set the number of items of the open bar (if any)."""
    with _lock:
        if _bars is not None:
            _bars.main.total = total
            _bars.main.refresh()


def advance(n: int = 1) -> None:
    """Count ``n`` finished items on the open bar (if any); raise ``KeyboardInterrupt`` for a
    Ctrl-C that Python dropped (:func:`steinpix.interrupts.check`)."""
    interrupts.check()
    with _lock:
        if _bars is not None:
            _bars.close_inner()
            _bars.main.update(n)


def strip(done: int, total: int) -> None:
    """Report ``done`` of ``total`` strips of the image being computed (a second bar, shown
    for images of at least :data:`STRIP_BAR_MIN` strips while a bar is open); raise
    ``KeyboardInterrupt`` for a Ctrl-C that Python dropped."""
    interrupts.check()
    with _lock:
        if _bars is None or total < STRIP_BAR_MIN:
            return
        if _bars.inner is None:
            _bars.inner = _bars.tqdm(
                total=total,
                desc="strips",
                unit="strip",
                leave=False,
                position=1,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        _bars.inner.update(done - _bars.inner.n)
        if done >= total:
            _bars.close_inner()
