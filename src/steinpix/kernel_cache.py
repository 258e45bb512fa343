"""numba's on-disk cache of a kernel that compiles in code from other modules.

numba decides whether a cached function is still valid from its own source file only (the
file's modification time and size). A kernel that calls compiled functions of other modules
(``fused._classify_rows`` calls the feature and forest code) keeps its stale machine code after
an edit of those modules alone, e.g. after a ``git pull`` into an editable install, and computes
with the old code. :func:`depend_on_sources` makes the cache depend on those files too.
"""

from __future__ import annotations

import os

__all__ = ["depend_on_sources"]


def depend_on_sources(kernel, *sources: str | os.PathLike) -> None:
    """Make the cache of ``kernel`` invalid when any of ``sources`` changes, as it is when its
    own file does.

    Parameters
    ----------
    kernel : numba dispatcher
        A function compiled with ``cache=True``.
    sources : path-like
        Source files of the compiled functions it calls.

    Notes
    -----
    numba stores its source stamp, ``(mtime, size)``, in the cache's index and compiles again
    when the stamp it computes differs; here the stamp becomes a tuple of the stamps of all
    files. Without effect where numba's cache internals differ from those of the releases
    this was written for (0.57 to 0.68) or the kernel is not cached.
    """
    cache_file = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
    own = getattr(cache_file, "_source_stamp", None)
    if own is None:
        return
    stamps = [own]
    for path in sources:
        st = os.stat(path)
        stamps.append((st.st_mtime, st.st_size))
    cache_file._source_stamp = tuple(stamps)
