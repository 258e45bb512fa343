"""Errors that the CLI reports as one line, without a traceback.

Two kinds: :class:`SteinpixError` is a problem with the user's input (a file, an option);
:class:`InternalError` is a bug in steinpix met while reading a file. Readers catch only what
damaged or unreadable input raises (and turn it into a :class:`SteinpixError`); anything else
that escapes a reader is wrapped by :func:`reading` so that the user's file is not blamed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType


class SteinpixError(Exception):
    """A problem with the user's input (a file, an option) that steinpix explains in one line.

    The message names the file and what is wrong with it; the CLI prints it as
    ``Error: <message>`` and exits with :attr:`exit_code`.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InternalError(Exception):
    """A bug in steinpix (not a problem with the user's file), met while reading a file.

    The CLI prints ``Error: <message>`` and exits with 1, or shows the full traceback (this
    exception chained to the original one) with ``-v DEBUG``. Only the message is stored, so
    that it pickles to and from worker processes.
    """

    @classmethod
    def unexpected(cls, error: BaseException) -> InternalError:
        return cls(f"internal error in steinpix: {_message(error)} (please report)")

    @classmethod
    def reading(cls, path: str | os.PathLike, error: BaseException) -> InternalError:
        return cls(
            f"internal error in steinpix while reading {path}: {_message(error)} (please report)"
        )


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def os_error_text(error: OSError) -> str:
    """``<file>: <problem>`` of an ``OSError`` that names its file, else its first line."""
    if error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return first_line(error)


def _message(error: BaseException) -> str:
    """``<type>: <first line>`` of an exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _frame_module(tb: TracebackType) -> str:
    """The module name of a traceback entry's code, for compiled (Cython) frames too."""
    name = tb.tb_frame.f_globals.get("__name__")
    if name:
        return name
    # Cython's frames may have no module globals; their file name is "package/module.pyx"
    path = tb.tb_frame.f_code.co_filename
    return path.rsplit(".", 1)[0].replace("\\", "/").replace("/", ".")


def raised_inside(error: BaseException, *packages: str) -> bool:
    """Whether ``error`` was raised by the code of one of ``packages`` (names such as
    ``"h5py"``): its innermost frame is theirs, or its type is one of theirs."""

    def inside(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in packages)

    if inside(type(error).__module__):
        return True
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return inside(_frame_module(tb))


def read_error(
    path: str | os.PathLike, error: Exception, problem: str, *readers: str
) -> SteinpixError | InternalError:
    """The error to raise for ``error``, caught while ``readers`` (package names such as
    ``"h5py"``) read ``path``.

    An :class:`OSError`, or an error raised inside the readers, is the file's: a
    :class:`SteinpixError` ``"<path>: <problem> (<reason>)"``. Anything else came from
    steinpix's own code: an :class:`InternalError` that does not blame the file. Raise the
    result ``from error``, so that ``-v DEBUG`` shows where it came from.
    """
    if isinstance(error, OSError) or raised_inside(error, *readers):
        return SteinpixError(f"{path}: {problem} ({first_line(error)})")
    return InternalError.reading(path, error)


# Not bugs: the user's input (SteinpixError), the file system (OSError), lack of memory
_NOT_BUGS = (SteinpixError, InternalError, OSError, MemoryError)


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Report any exception other than a :class:`SteinpixError`, :class:`OSError` or
    :class:`MemoryError` raised inside the block as an :class:`InternalError` naming ``path``.

    The readers inside catch what damaged files raise; what still escapes them (an
    ``AttributeError`` from a changed library API, say) is a bug in steinpix, not the file's.
    """
    try:
        yield
    except _NOT_BUGS:
        raise
    except Exception as e:  # everything else is a bug: say so, never blame the file
        raise InternalError.reading(path, e) from e
