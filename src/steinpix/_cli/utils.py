"""Shared pieces of the command line: logging, one-line errors, progress."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator

import click

from steinpix.atomic import removing_new_empty_folders
from steinpix.errors import InternalError, SteinpixError, first_line

logger = logging.getLogger("steinpix")

LOG_LEVELS = ["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]

_quick_exit = False
_executable = False  # set by main.cli: this process is the steinpix command


def in_executable() -> None:
    """Tell the command line that it runs as the ``steinpix`` executable (its own process),
    not called from other Python code (e.g. click's test runner)."""
    global _executable
    _executable = True


# glibc's mallopt parameters (malloc.h) and the values set by keep_freed_memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024**2  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1024**3


def keep_freed_memory() -> bool:
    """Let the ``steinpix`` executable reuse the memory it frees rather than hand it back.

    With glibc's default, adaptive thresholds, blocks of a few MiB (a strip's input, its
    probabilities, TIFF rows) are often given back to the kernel when freed and taken anew for
    the next strip. Memory a process touches first costs a page fault and the kernel's zeroing
    of the page; on virtual machines whose host reclaims free memory that is expensive
    (``docs/engine.md``, "Fresh memory"). Fixed thresholds keep blocks up to 32 MiB in the
    process: 7,000 to 8,000 fewer page faults for two 2000 x 2000 images (0.2 s less system
    time in one run, 0.02 s in another), for 10 to 40 MiB more peak memory. Only in the
    executable (in-process callers keep their own settings) and only with glibc.

    Returns
    -------
    bool
        Whether the thresholds were set.
    """
    return _executable and set_malloc_thresholds()


def numpy_without_huge_pages() -> bool:
    """Stop numpy asking for transparent huge pages in the ``steinpix`` executable.

    numpy advises the kernel to back arrays of 4 MiB and more with 2 MiB pages
    (``madvise``). Where the kernel then compacts memory to find them (``defrag`` set to
    ``madvise``, as on this project's machines) and zeroes 2 MiB at a time, that cost more
    system time than it saved: for two 2000 x 2000 images, 0.35 s instead of 0.79 s (median
    of 10 runs each, in turns), with the same user time. Only in the executable.

    Returns
    -------
    bool
        Whether numpy's setting was changed.
    """
    return _executable and set_numpy_huge_pages(False)


def set_numpy_huge_pages(enabled: bool) -> bool:
    """Turn numpy's ``madvise(MADV_HUGEPAGE)`` of large arrays on or off, as the
    ``NUMPY_MADVISE_HUGEPAGE`` environment variable does at numpy's import.

    Returns
    -------
    bool
        False where this numpy has no such switch.
    """
    import numpy as np

    core = getattr(np, "_core", None)  # numpy 2; numpy 1 has numpy.core
    if core is None:
        import numpy.core as core
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(enabled)
    return True


def on_glibc() -> bool:
    """Whether this process's C library is glibc."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # not glibc, or not a POSIX system
        return False
    return bool(libc_version) and libc_version.startswith("glibc")


def set_malloc_thresholds() -> bool:
    """Set glibc's mmap and trim thresholds of this process (see :func:`keep_freed_memory`).

    Returns
    -------
    bool
        False where the C library is not glibc or refused a value.
    """
    if not on_glibc():
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a command imports its modules and loads
    its project.

    Importing numba, numpy and h5py creates about 75,000 objects that live as long as the
    process; while they are created, the collector traverses them again and again (some 150
    collections, 0.04 to 0.08 s of a ``run`` command's start-up) and finds nearly nothing to
    free. In the ``steinpix`` executable they are then moved out of the collector's way for
    good (``gc.freeze``: later collections traverse only the objects made after them);
    elsewhere (in-process callers such as tests, where freezing would keep their garbage
    forever) the collector just resumes.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if _executable:
            gc.freeze()
        gc.enable()


def allow_quick_exit() -> None:
    """Let this command's process end without Python's teardown (see :func:`exit_quickly`)."""
    global _quick_exit
    _quick_exit = True


def exit_quickly(code: object) -> None:
    """End the process now with ``sys.exit(code)``'s status, if the command allowed it.

    Python's teardown of a process that has loaded numba and compiled kernels frees every
    module and object one by one: 0.15 to 0.35 s after the work is done, for nothing, since the
    process ends. This does what matters of a normal exit (the ``atexit`` functions, among them
    ``logging.shutdown``, and flushing stdout and stderr) and then ``os._exit``. It returns,
    leaving the exit to Python, unless the command called :func:`allow_quick_exit`, and also
    when another non-daemon thread is still alive (Python would wait for it), in an
    interactive session (``python -i``) or when stdout cannot be flushed (Python reports it).

    Parameters
    ----------
    code : object
        ``SystemExit.code``: None (0), an int, or a message for stderr (status 1).
    """
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's, since 3.0
    if not _quick_exit or sys.flags.inspect or run_exitfuncs is None:
        return
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # e.g. a closed pipe, no stdout
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        status = status or 120  # what Python exits with when it cannot flush at exit
    os._exit(status)



class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: str) -> str:
    root = logging.getLogger("steinpix")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(getattr(logging, value.upper()))
    # tifffile logs every damaged tag it meets; steinpix reports the file once instead
    logging.getLogger("tifffile").setLevel(
        logging.WARNING if value.upper() == "DEBUG" else logging.CRITICAL
    )
    return value


def verbosity_option(func: Callable) -> Callable:
    """``-v/--verbosity LEVEL`` (default INFO), logging to stderr like steinbock."""
    return click.option(
        "-v",
        "--verbosity",
        "verbosity",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="INFO",
        show_default=True,
        expose_value=False,
        is_eager=True,
        callback=_set_verbosity,
        help="Verbosity of the log on stderr.",
    )(func)


def ilastik_binary_option(help: str) -> Callable:
    """``--ilastik PATH``; the lookup order when it is not given is in :mod:`steinpix.runners`."""
    return click.option(
        "--ilastik",
        "ilastik_binary",
        type=click.STRING,
        default=None,
        show_default="$STEINPIX_ILASTIK, /opt/ilastik/run_ilastik.sh, run_ilastik.sh on PATH",
        help=help,
    )


ilp_option = click.option(
    "--ilp",
    "ilastik_project_file",
    type=click.Path(exists=True, dir_okay=False),
    default="pixel_classifier.ilp",
    show_default=True,
    help="Path to the Ilastik project file",
)


def one_line_errors(func: Callable) -> Callable:
    """Turn errors into ``Error: <message>`` on stderr and a non-zero exit.

    :class:`SteinpixError` (the user's input) exits with its exit code; an :class:`OSError` (a
    folder that cannot be written, a full disk) names its file; anything else is a bug in
    steinpix and says so (``internal error in steinpix ... (please report)``), or shows its
    full traceback with ``-v DEBUG``. A command that fails (or is interrupted) removes the
    folders it created that are still empty (:func:`steinpix.atomic.removing_new_empty_folders`).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with removing_new_empty_folders():
                return func(*args, **kwargs)
        except SteinpixError as e:
            err = click.ClickException(str(e))
            err.exit_code = e.exit_code
            raise err from None
        except OSError as e:  # a folder that cannot be written, a full disk, ...
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except MemoryError as e:
            raise click.ClickException(f"out of memory ({first_line(e)})") from None
        except Exception as e:  # a bug in steinpix: never reported as the user's fault
            if logger.isEnabledFor(logging.DEBUG):
                raise
            if not isinstance(e, InternalError):
                e = InternalError.unexpected(e)
            raise click.ClickException(str(e)) from None

    return wrapper

