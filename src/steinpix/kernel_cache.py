"""numba's on-disk cache of the engine's kernels: when it is stale, and how it loads.

numba decides whether a cached function is still valid from its own source file only (the
file's modification time and size). A kernel that calls compiled functions of other modules
(``fused._classify_rows`` calls the feature and forest code) keeps its stale machine code after
an edit of those modules alone, e.g. after a ``git pull`` into an editable install, and computes
with the old code. :func:`depend_on_sources` makes the cache depend on those files too.

Loading a cached kernel, numba also parses the LLVM bitcode stored beside its machine code and
imports the modules of every function compiled into it, for their globals, though running the
machine code needs neither: :func:`prepare_lazy_loading` leaves both for when something needs
them (a run's start-up saves 0.06-0.08 s).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["depend_on_sources", "loading_lazily", "prepare_lazy_loading"]


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


# --------------------------------------------------------------------------------------------
# Loading lazily

_lazy = threading.local()


class _LazyLinkModule:
    """A code library loaded from numba's cache whose link module is parsed when first used.

    numba caches a kernel as its machine code plus the LLVM bitcode of the whole library (the
    "link module", which other libraries link against when they are compiled), and on loading
    parses that bitcode at once, only to list the symbols it defines: 0.015 s for a small
    kernel, 0.03 s for the fused one. Here it is parsed (and its symbols listed) only when a
    compilation links against the library, or when a symbol is looked up that the machine
    code does not hold.
    """

    @property
    def _shared_module(self):
        module = self.__dict__.get("_link_module")
        if module is None and self.__dict__.get("_link_bitcode") is not None:
            import llvmlite.binding

            module = llvmlite.binding.parse_bitcode(self.__dict__.pop("_link_bitcode"))
            self._codegen._engine._load_defined_symbols(module)
            self.__dict__["_link_module"] = module
        return module

    @_shared_module.setter
    def _shared_module(self, module) -> None:
        self.__dict__["_link_module"] = module

    def get_pointer_to_function(self, name: str) -> int:
        # numba asks its own list of defined symbols first (the execution engine's lookup
        # stopped the process in old LLVMs when a symbol was missing); the machine code
        # loaded from the cache defines the library's functions, so ask the engine, and
        # fall back to numba's way when it does not know the name
        if self.__dict__.get("_link_bitcode") is not None:
            self._ensure_finalized()
            address = self._codegen._engine.get_function_address(name)
            if address:
                return address
            self._shared_module  # noqa: B018 - parses the module and lists its symbols
        return super().get_pointer_to_function(name)


_lazy_classes: dict[type, type] = {}


def _unserialize(codegen, state):
    """``codegen.unserialize_library`` that defers the link module of object code while
    :func:`loading_lazily` is active in this thread (numba's own way otherwise)."""
    name, kind, data = state
    if kind != "object" or not getattr(_lazy, "active", False):
        return type(codegen).unserialize_library(codegen, state)
    object_code, link_bitcode = data
    base = codegen._library_class
    cls = _lazy_classes.get(base)
    if cls is None:
        cls = _lazy_classes[base] = type(f"Lazy{base.__name__}", (_LazyLinkModule, base), {})
    library = cls(codegen, name)  # what codegen.create_library(name) makes, lazily linked
    library.__dict__["_link_bitcode"] = link_bitcode
    library.enable_object_caching()
    library._set_compiled_object(object_code)
    library._finalize_final_module()
    return library


def _rebuild_env(modname, consts, env_name):
    """numba's ``environment._rebuild_env`` (unpickling a cached kernel's environments calls
    it), which imports the environment's module for its globals.

    Within :func:`loading_lazily`, the environments of numba's own modules that are not
    imported yet get only the module's name as their globals: numba reads an environment's
    globals in object mode only, and its implementations of numpy functions that the kernels
    compile in run in nopython mode. That spares importing numba's array implementation
    (``numba.np.arrayobj`` and what it imports: 0.03 s); it is imported as usual when
    something compiles.
    """
    from numba.core import environment

    if (getattr(_lazy, "active", False) and modname.startswith("numba.")
            and modname not in sys.modules):
        env = environment.lookup_environment(env_name)
        if env is None:
            env = environment.Environment({"__name__": modname})
            env.consts[:] = consts
            env.env_name = env_name
            environment.Environment._memo[env_name] = env
        return env
    return (_numba_rebuild_env or environment._rebuild_env)(modname, consts, env_name)


_numba_rebuild_env = None  # numba's own, while loading_lazily has put _rebuild_env there


def prepare_lazy_loading(codegen) -> bool:
    """Let numba load cached kernels without parsing their link modules (see
    :class:`_LazyLinkModule`) and without importing numba's modules for their environments
    (see :func:`_rebuild_env`), within :func:`loading_lazily`. Once per process.

    Parameters
    ----------
    codegen : numba.core.codegen.JITCPUCodegen
        ``cpu_target.target_context.codegen()``.

    Returns
    -------
    bool
        False where numba's internals differ from those of the releases this was written for
        (0.57 to 0.68): loading then stays numba's own.
    """
    global _prepared
    from numba.core import environment

    base = getattr(codegen, "_library_class", None)
    needed = ("enable_object_caching", "_set_compiled_object", "_finalize_final_module",
              "_ensure_finalized", "get_pointer_to_function", "_get_module_for_linking")
    engine = getattr(codegen, "_engine", None)
    if (base is None or not all(hasattr(base, name) for name in needed)
            or not hasattr(engine, "_load_defined_symbols")
            or not hasattr(engine, "get_function_address")
            or not hasattr(type(codegen), "unserialize_library")
            or not hasattr(environment, "_rebuild_env")
            or not hasattr(environment, "lookup_environment")
            or not hasattr(environment.Environment, "_memo")):
        return False
    if "unserialize_library" not in vars(codegen):
        codegen.unserialize_library = functools.partial(_unserialize, codegen)
    _prepared = True
    return True


_prepared = False


@contextlib.contextmanager
def loading_lazily() -> Iterator[None]:
    """Within: kernels loaded from numba's cache in this thread load lazily, once
    :func:`prepare_lazy_loading` was called.

    Call it with numba's compiler lock held (numba's ``Dispatcher.compile`` holds it while it
    loads from the cache): unpickling looks ``_rebuild_env`` up by name in numba's module, so
    it is put there for the time being, while nothing else is compiled, and so pickled.
    """
    global _numba_rebuild_env
    if not _prepared:
        yield
        return
    from numba.core import environment

    before = getattr(_lazy, "active", False)
    original = environment._rebuild_env
    _numba_rebuild_env = original if original is not _rebuild_env else _numba_rebuild_env
    environment._rebuild_env = _rebuild_env
    _lazy.active = True
    try:
        yield
    finally:
        _lazy.active = before
        environment._rebuild_env = original
