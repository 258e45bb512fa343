"""Ctrl-C that Python would lose.

Python raises ``KeyboardInterrupt`` at the next bytecode its main thread runs after SIGINT.
When that bytecode belongs to a weakref callback or a ``__del__`` method, the exception cannot
propagate: Python prints ``Exception ignored in: ...`` with a traceback, drops it, and the
command carries on as if nothing had happened (and may exit 0). h5py runs such callbacks after
each of its calls, so a Ctrl-C that arrives while an HDF5 file is written (most of
``prepare``'s and ``fix``'s time) was lost about every other time.

The ``steinpix`` executable installs :func:`install`: every SIGINT is recorded, and
:func:`check` raises ``KeyboardInterrupt`` again at the next safe point (an output about to be
renamed into place, an image or strip done); the lost exception's message is not printed.
"""

from __future__ import annotations

import signal
import sys
import threading

_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _unraisable(args) -> None:
    if isinstance(args.exc_value, KeyboardInterrupt) and _interrupted.is_set():
        return  # a Ctrl-C dropped by Python: check() raises it again
    sys.__unraisablehook__(args)


def install() -> bool:
    """Record every SIGINT (see the module's description), if Python's own handler is the
    current one: an ignored SIGINT (a background job) stays ignored.

    Returns
    -------
    bool
        Whether the handler was installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable
    return True


def interrupted() -> bool:
    """Whether SIGINT has arrived since :func:`install`."""
    return _interrupted.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` in the main thread when SIGINT has arrived (whether or not
    Python lost the first one); elsewhere do nothing."""
    if _interrupted.is_set() and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt
