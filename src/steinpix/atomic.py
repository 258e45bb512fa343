"""Write files under a temporary name and rename them into place, so nothing is half-written;
remove the output folders a failed command created and left empty."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from steinpix import interrupts

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")

# the folders make_folder created in the current removing_new_empty_folders() scope, in order
_created: list[Path] | None = None


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A hidden name next to ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def create_temporary(path: str | os.PathLike) -> Path:
    """Create the (empty) temporary file of ``path`` (:func:`temporary_sibling`) and return it.

    Raises
    ------
    OSError
        When the folder cannot be written (no permission, no such folder, a full disk): an
        ``OSError`` whose ``filename`` is ``path``, not the hidden temporary name that the
        libraries writing it would report (h5py's errors carry no file name at all).
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"cannot write it ({e.strerror or e})", str(path)) from None
    return tmp


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to (created empty, see :func:`create_temporary`); on
    success, rename it to ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        create_temporary(path)
        yield tmp
        interrupts.check()  # a Ctrl-C that Python dropped while the file was written
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed runs (SIGKILL, power loss) left in ``folder``.

    Only files named like :func:`temporary_sibling`'s whose process no longer exists are
    removed, so a run in progress next to this one keeps its files.

    Returns
    -------
    removed : list of Path
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _TEMPORARY.match(entry.name)
            if match and entry.is_file() and not _alive(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def make_folder(folder: str | os.PathLike) -> Path:
    """``Path(folder).mkdir(parents=True, exist_ok=True)``, recording every folder it creates
    (``folder`` and missing parents) for :func:`removing_new_empty_folders`.

    A folder that already existed, or that another process created first, is not recorded.
    """
    folder = Path(folder)
    try:
        os.mkdir(folder)
    except FileNotFoundError:
        if folder.parent == folder:
            raise
        make_folder(folder.parent)
        return make_folder(folder)
    except OSError:
        if not folder.is_dir():
            raise
        return folder
    if _created is not None:
        _created.append(folder.absolute())
    return folder


def forget_new_folders() -> None:
    """Keep the folders created so far even if the command fails: others (a Dask task that
    could not be stopped) may still write into them."""
    if _created is not None:
        _created.clear()


@contextlib.contextmanager
def removing_new_empty_folders() -> Iterator[None]:
    """On any exception (including KeyboardInterrupt), remove the folders that
    :func:`make_folder` created inside this block and that are still empty, deepest first.

    Folders that existed before, and folders holding anything (an output, a hidden temporary
    being written), stay: ``os.rmdir`` only removes an empty folder. Nested blocks leave the
    removal to the outermost one.
    """
    global _created
    if _created is not None:
        yield
        return
    _created = created = []
    try:
        yield
    except BaseException:
        for folder in reversed(created):  # each folder was created after its parents
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        _created = None
