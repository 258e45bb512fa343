"""The built-in engine: ilastik 1.3.3's pixel classification of one image, without ilastik.

``predict_file`` reads a steinbock ``img`` HDF5 file, computes the project's features in
horizontal strips (each with enough rows of context that it equals a whole-image computation),
classifies every pixel with the project's random forests and writes the probabilities as the
uint16 TIFF ilastik exports (spec ``ilastik-1.3.3-prediction.md`` §4).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numba
import numpy as np
import tifffile

from steinpix import features, interrupts, progress, workers
from steinpix.atomic import atomic_output, create_temporary
from steinpix.errors import SteinpixError
from steinpix.exports import EXPORTS, export_uint16
from steinpix.features import FeatureSelection, feature_names
from steinpix.forest import Classifier, load_classifier
from steinpix.fused import classify_strips
from steinpix.images import IMG_DATASET
from steinpix.kernel_cache import loading_lazily, prepare_lazy_loading
from steinpix.lzw import lzw_encode
from steinpix.outputs import is_finished, output_path

__all__ = [
    "MIN_STRIP_HALOS",
    "STRIP_BYTES",
    "STRIP_PIXELS",
    "check_compatible",
    "export_uint16",
    "init_numba",
    "is_finished",
    "iter_strips",
    "load_project",
    "load_selection",
    "output_path",
    "PendingFile",
    "predict_file",
    "predict_image",
    "read_image",
    "set_threads",
    "start_file",
    "strip_rows",
    "write_probabilities",
]

# Working memory of one strip (input, presmoothed planes, probabilities). predict_file streams
# the image in and the TIFF out, so with the Python/numba runtime (~250 MiB) a run stays below
# 1 GiB for any image size. Only images so wide that a strip of one row plus its halo exceeds
# the budget (over ~28,000 pixels with 4 channels and 5 scales) need more.
STRIP_BYTES = 512 * 1024**2
# Output pixels per strip at most: smaller strips let reading and TIFF encoding overlap with
# the computation, and need less memory, which costs page faults and the kernel's zeroing the
# first time a process touches it (measured: 0.4-0.6 s less system time for the first 2000 x
# 2000 image than with 1,000,000). The halo rows they add are only presmoothed, which costs
# little, as long as a strip is not much thinner than its halo: see MIN_STRIP_HALOS.
STRIP_PIXELS = 500_000
# Default strips are at least this many halos tall, however wide the image.
MIN_STRIP_HALOS = 2
# Uncompressed size of one TIFF strip of the output.
TIFF_STRIP_BYTES = 256 * 1024
# TIFF strips at most waiting to be encoded, per file (32 MiB of rows with the above; a
# 2000 x 2000 image with 3 classes has 92).
MAX_ENCODING = 128


def kernels_cached() -> bool:
    """Whether numba's on-disk cache holds the compiled feature kernels (if not, the first
    image compiles them, which takes about half a minute). True when it cannot tell."""
    from steinpix import fused

    try:  # the fused row kernel: the largest one, compiled last
        return Path(fused._classify_rows._cache._cache_file._index_path).exists()
    except AttributeError:  # numba internals moved: no hint rather than a wrong one
        return True


def init_numba() -> None:
    """Get numba ready to run the engine's kernels from its on-disk cache, quickly.

    Before numba loads a cached kernel it prepares its whole CPU target: it imports and
    registers the typing and lowering of everything it can compile (about 0.25 s, the largest
    part of a ``run`` command's start-up), and it initialises the numba extensions of every
    installed package (reading the entry points of all of them: 0.01 to 0.04 s here, more in
    large environments), though machine code loaded from the cache needs only numba's runtime.
    This starts the runtime and lets the engine's kernels load without the rest. A cache miss
    (the first run after installation, or another CPU) still compiles as usual: the extensions
    are initialised then, and numba's compiler prepares the whole target itself. Once per
    process; later calls do nothing. Where numba's internals differ from those of the releases
    this was written for (0.57 to 0.68), it prepares the whole target as numba would.
    """
    global _numba_ready
    with _numba_lock:
        if _numba_ready:
            return
        from numba.core.registry import cpu_target

        context = cpu_target.target_context
        kernels = [kernel for kernel in _kernels()
                   if hasattr(getattr(kernel, "_cache", None), "_load_overload")
                   and hasattr(kernel, "_compilation_chain_init_hook")]
        try:
            from numba.core.runtime import rtsys
        except ImportError:
            kernels = []
        if not kernels:
            context.refresh()
        else:
            from numba.core.compiler_lock import global_compiler_lock

            with global_compiler_lock:  # as numba initialises its runtime
                rtsys.initialize(context)
            prepare_lazy_loading(context.codegen())
            for kernel in kernels:
                kernel._cache.load_overload = functools.partial(_load_cached, kernel._cache)
                kernel._compilation_chain_init_hook = _no_extensions_yet
        _numba_ready = True


_numba_lock = threading.Lock()
_numba_ready = False


def _kernels() -> list:
    """The engine's compiled functions: those of every steinpix module loaded (the engine
    imports all of its own)."""
    import sys

    from numba.core.dispatcher import Dispatcher

    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "steinpix" or name.startswith("steinpix."))]
    kernels = {
        id(value): value
        for module in modules
        for value in list(vars(module).values())
        if isinstance(value, Dispatcher)
    }
    return list(kernels.values())


def _no_extensions_yet() -> None:
    """A kernel's first call: numba's extensions are initialised only if it must compile."""


def _load_cached(cache, signature, target_context):
    """numba's ``Cache.load_overload`` without its refresh of the whole target: the kernel's
    machine code from the cache (lazily: :func:`steinpix.kernel_cache.prepare_lazy_loading`),
    or None, after initialising numba's extensions (numba then compiles, preparing the target
    itself)."""
    with loading_lazily():
        result = cache._load_overload(signature, target_context)
    if result is None:
        from numba.core import entrypoints

        entrypoints.init_all()
    return result


def set_threads(n: int | None) -> int:
    """Set the number of threads numba uses (features and forest).

    Parameters
    ----------
    n : int or None
        Threads to use; None means all cores numba sees. Values above that are capped.

    Returns
    -------
    int
        The number of threads now in use.
    """
    available = numba.config.NUMBA_NUM_THREADS
    if n is not None and n < 1:
        raise ValueError(f"the number of threads must be at least 1, got {n}")
    n = available if n is None else min(n, available)
    numba.set_num_threads(n)
    return n


@contextlib.contextmanager
def _open_image(path: str | os.PathLike) -> Iterator[h5py.Dataset]:
    """The ``img`` dataset of a steinbock HDF5 image, checked to be 3-D."""
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise SteinpixError(f"{path}: no such image file") from exc
    except OSError as exc:
        raise SteinpixError(f"{path}: not an HDF5 image ({exc})") from exc
    with h5:
        dataset = h5.get(IMG_DATASET)
        if not isinstance(dataset, h5py.Dataset):
            raise SteinpixError(f"{path}: no '{IMG_DATASET}' dataset (not a steinbock image)")
        if dataset.ndim != 3:
            raise SteinpixError(
                f"{path}: the '{IMG_DATASET}' dataset has shape {dataset.shape}, "
                "expected channels x height x width"
            )
        yield dataset


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a steinbock image: the ``img`` dataset of an HDF5 file.

    Parameters
    ----------
    path : path-like
        HDF5 file written by ``steinbock classify ilastik prepare`` (or steinpix).

    Returns
    -------
    (C, Y, X) ndarray
        The image in the dtype it is stored in (ilastik converts it to float32 itself).

    Raises
    ------
    SteinpixError
        If the file is not HDF5, has no ``img`` dataset, or the dataset is not 3-D.
    """
    with _open_image(path) as dataset:
        return dataset[()]


def load_selection(ilp_path: str | os.PathLike) -> FeatureSelection:
    """Read the feature selection of an ilastik project.

    Parameters
    ----------
    ilp_path : path-like

    Returns
    -------
    FeatureSelection
    """
    path = Path(ilp_path)
    try:
        with h5py.File(path, "r") as h5:
            if "FeatureSelections" not in h5:
                raise SteinpixError(f"{path}: the project has no feature selection")
            return FeatureSelection.from_h5(h5["FeatureSelections"], str(path))
    except OSError as exc:
        raise SteinpixError(f"{path}: not an ilastik project ({exc})") from exc


def _expected_channels(classifier: Classifier, selection: FeatureSelection) -> int | None:
    """The channel count the classifier was trained on, if the selection explains it."""
    per_channel = selection.n_features(1)
    if per_channel and classifier.n_features % per_channel == 0:
        return classifier.n_features // per_channel
    return None


def check_compatible(img_shape: tuple[int, ...], classifier: Classifier,
                     selection: FeatureSelection, source: str = "image") -> None:
    """Raise a SteinpixError if the image cannot be classified with this project.

    Parameters
    ----------
    img_shape : tuple of int
        (C, Y, X).
    classifier, selection
        The project's classifier and feature selection.
    source : str
        Image name for messages.
    """
    n_channels, height, width = img_shape
    expected = _expected_channels(classifier, selection)
    names = feature_names(selection, n_channels)
    if classifier.feature_names is not None:
        matches = names == list(classifier.feature_names)
    else:
        matches = len(names) == classifier.n_features
    if not matches:
        if expected is not None and expected != n_channels:
            raise SteinpixError(
                f"{source}: the image has {n_channels} channels, but the classifier in "
                f"{classifier.path} expects {expected} channels"
            )
        raise SteinpixError(
            f"{source}: the features of this image ({len(names)} columns) do not match the "
            f"{classifier.n_features} columns the classifier in {classifier.path} was trained on"
        )
    smallest = selection.min_size()
    if height < smallest or width < smallest:
        raise SteinpixError(
            f"{source}: the image is {height} x {width} pixels, smaller than the {smallest} x "
            f"{smallest} that the project's largest feature scale needs"
        )


def strip_rows(height: int, width: int, n_channels: int, selection: FeatureSelection,
               n_outputs: int, max_bytes: int | None = None, in_flight: int = 1) -> int:
    """Output rows per strip so that the strips' working memory stays within ``max_bytes``.

    Parameters
    ----------
    height, width, n_channels : int
        Image size.
    selection : FeatureSelection
    n_outputs : int
        Output channels.
    max_bytes : int, optional
        Memory budget of the strips; default :data:`STRIP_BYTES`.
    in_flight : int
        Strips whose input and presmoothed planes are held at once: 2 when the next strip is
        presmoothed while this one's rows are computed (:func:`steinpix.fused.classify_strips`).

    Returns
    -------
    int
        At least 1, at most ``height``. A strip's input (its rows and halo) is always at least
        ``min_size`` rows when the image is, so even very wide images fit the budget.
    """
    n_features = selection.n_features(n_channels)
    n_scales = len(selection.selected_scales())
    # per output row pixel: the float32 probabilities and their uint16 export; per pixel of a
    # strip with its halo: its float32 input and its presmoothed planes, and one temporary plane
    # per thread (one set, shared by the strips in flight: only one is presmoothed at a time).
    # The next strip's input is read beside them. The features of one row per thread are
    # computed and classified in the cache.
    per_row_pixel = 6 * n_outputs
    per_halo_pixel = 4 * (in_flight * n_channels * (n_scales + 1)
                          + numba.config.NUMBA_NUM_THREADS)
    # per thread: one row of features and the ring buffers of x-filtered rows of every
    # (channel, scale)
    ring_rows = features.ring_rows(selection, n_channels)
    per_thread = 4 * width * (n_features + n_channels * n_scales * features.N_RINGS * ring_rows)
    per_thread *= numba.config.NUMBA_NUM_THREADS
    budget = (STRIP_BYTES if max_bytes is None else max_bytes) - per_thread
    rows = (budget // width - 2 * selection.halo() * per_halo_pixel) // (
        per_row_pixel + per_halo_pixel
    )
    return int(min(height, max(rows, 1)))


def _strip_height(shape: tuple[int, int, int], classifier: Classifier,
                  selection: FeatureSelection, max_pixels_per_strip: int | None,
                  strip_bytes: int | None = None) -> tuple[int, bool]:
    """Output rows per strip, and whether the next strip may be presmoothed while this one's
    rows are computed: only when that does not make the strips thinner."""
    n_channels, height, width = shape
    if max_pixels_per_strip is None:
        max_rows = max(STRIP_PIXELS // width, MIN_STRIP_HALOS * selection.halo())
    else:
        max_rows = max_pixels_per_strip // width

    def height_for(in_flight: int) -> int:
        rows = strip_rows(height, width, n_channels, selection, classifier.n_outputs,
                          strip_bytes, in_flight)
        rows = min(max(min(rows, max_rows), 1), height)
        # Same number of strips, but of even height (no thin last strip with a full halo).
        n_strips = -(-height // rows)
        return -(-height // n_strips)

    rows = height_for(1)
    return rows, height_for(2) == rows


def iter_strips(img, classifier: Classifier, selection: FeatureSelection, profile: str = "133",
                max_pixels_per_strip: int | None = None,
                source: str = "image", strip_bytes: int | None = None,
                on_strip: Callable[[np.ndarray], None] | None = None) -> Iterator[np.ndarray]:
    """Exported probabilities of an image, one horizontal strip after the other.

    Each strip's features are computed from the strip plus ``selection.halo()`` rows of context
    above and below (clipped at the image border), which makes them equal to a whole-image
    computation. Full-width strips are required for that: fastfilters' SIMD/scalar split of a
    row depends on the row's length (spec §6.1), so images are never cut in x.

    Parameters
    ----------
    img : (C, Y, X) ndarray or h5py.Dataset
        The image; only the rows a strip needs are read (``img[:, a:b]``).
    classifier, selection, profile, max_pixels_per_strip, source
        As for :func:`predict_image`.
    strip_bytes : int, optional
        Working-memory budget of one strip (default :data:`STRIP_BYTES`).
    on_strip : callable, optional
        Called with each strip's float32 probabilities, (rows, X, n_outputs), before they are
        exported: the other exports (:mod:`steinpix.exports`) come from the same computation.
        The array is reused for the next strip, so it must not be kept.

    Yields
    ------
    (rows, X, n_outputs) ndarray of uint16
        Consecutive strips, top to bottom.
    """
    if len(img.shape) != 3:
        raise SteinpixError(f"{source}: expected a channels x height x width image, "
                            f"got shape {img.shape}")
    check_compatible(img.shape, classifier, selection, source)
    _, height, width = img.shape
    rows, overlap = _strip_height(img.shape, classifier, selection, max_pixels_per_strip,
                                  strip_bytes)
    halo, n_out = selection.halo(), classifier.n_outputs
    # Buffer for the largest strip, reused (as a view of its first elements) by every strip.
    prob_buf = np.empty(rows * width * n_out, dtype=np.float32)
    starts = list(range(0, height, rows))

    def read(y0: int) -> np.ndarray:
        return np.asarray(img[:, max(0, y0 - halo):min(height, y0 + rows + halo)])

    def inputs(reader: ThreadPoolExecutor) -> Iterator[tuple[np.ndarray, tuple[int, int],
                                                             np.ndarray]]:
        # the next strip is read in the background (h5py releases the GIL) while this one
        # computes
        pending = reader.submit(read, starts[0])
        for i, y0 in enumerate(starts):
            strip = pending.result()
            if i + 1 < len(starts):
                pending = reader.submit(read, starts[i + 1])
            y1 = min(height, y0 + rows)
            a = max(0, y0 - halo)
            out = prob_buf[:(y1 - y0) * width * n_out].reshape(y1 - y0, width, n_out)
            yield strip, (y0 - a, y1 - a), out
            del strip

    with ThreadPoolExecutor(1) as reader:
        strips = classify_strips(inputs(reader), selection, classifier, profile, overlap)
        for i, probs in enumerate(strips):
            # Here the strip's float32 probabilities exist: extra exports are computed from them.
            if on_strip is not None:
                on_strip(probs)
            progress.strip(i + 1, len(starts))
            # in place: probs is the strip buffer, refilled by the next strip
            yield export_uint16(probs, overwrite_input=True)


def predict_image(img: np.ndarray, classifier: Classifier, selection: FeatureSelection,
                  profile: str = "133", max_pixels_per_strip: int | None = None,
                  source: str = "image") -> np.ndarray:
    """Probabilities of one image as ilastik 1.3.3 exports them.

    Features are computed in horizontal full-width strips, each with ``selection.halo()`` rows
    of context above and below (clipped at the image border), so every strip's rows equal a
    whole-image computation (see :func:`iter_strips`).

    Parameters
    ----------
    img : (C, Y, X) ndarray
        The image (any real dtype; converted to float32 as ilastik does).
    classifier : Classifier
        From :func:`steinpix.forest.load_classifier`.
    selection : FeatureSelection
        The project's feature selection.
    profile : {"133", "14x"}
        Arithmetic profile of the feature filters (ilastik 1.3.3post3 or 1.4.x).
    max_pixels_per_strip : int, optional
        Output pixels per strip (rounded down to whole rows, at least one row); default
        :data:`STRIP_PIXELS`, but at least :data:`MIN_STRIP_HALOS` halos of rows. Strips are
        also kept within :data:`STRIP_BYTES`.
    source : str
        Image name used in error messages.

    Returns
    -------
    (Y, X, n_outputs) ndarray of uint16
        ``n_outputs`` = number of label names in the project.

    Raises
    ------
    SteinpixError
        If the image's channel count or size does not fit the project.
    """
    result = None
    y0 = 0
    for strip in iter_strips(img, classifier, selection, profile, max_pixels_per_strip, source):
        if result is None:
            result = np.empty((img.shape[1], *strip.shape[1:]), dtype=np.uint16)
        result[y0:y0 + strip.shape[0]] = strip
        y0 += strip.shape[0]
    return result


def _row_chunks(strips: Iterable[np.ndarray], rows_per_strip: int) -> Iterator[np.ndarray]:
    """Blocks of ``rows_per_strip`` rows (the last may be shorter) from arrays of any height.

    Blocks inside an array are views of it; only the rows a block takes from two arrays are
    copied. Joining whole strips instead copied every row once more, into fresh memory each
    time (memory a process touches first is zeroed by the kernel: see ``docs/engine.md``).
    """
    carry: np.ndarray | None = None  # a block being filled across arrays
    filled = 0
    for block in strips:
        y = 0
        if carry is not None:
            take = min(rows_per_strip - filled, block.shape[0])
            carry[filled:filled + take] = block[:take]
            filled += take
            y = take
            if filled < rows_per_strip:
                continue
            yield carry
            carry = None
        while block.shape[0] - y >= rows_per_strip:
            yield np.ascontiguousarray(block[y:y + rows_per_strip])
            y += rows_per_strip
        if y < block.shape[0]:
            carry = np.empty((rows_per_strip, *block.shape[1:]), dtype=block.dtype)
            filled = block.shape[0] - y
            carry[:filled] = block[y:]
    if carry is not None:
        yield carry[:filled]


def _tiff_strips(strips: Iterable[np.ndarray], rows_per_strip: int,
                 n_threads: int) -> Iterator[bytes]:
    """LZW-encoded TIFF strips of ``rows_per_strip`` rows from arrays of any row count.

    The strips are encoded by the engine's worker threads (:mod:`steinpix.workers`) after any
    computation queued there, so encoding fills the time the computation leaves free, and
    after the last strip the rows are encoded in parallel; order is kept. At most
    :data:`MAX_ENCODING` strips wait: then this waits, and so, once the writer's queue is
    full, does the computation, which bounds the memory held.
    """
    pool = workers.pool(n_threads)
    waiting: collections.deque[Future] = collections.deque()
    try:
        for rows in _row_chunks(strips, rows_per_strip):
            waiting.append(pool.submit(lzw_encode, rows, priority=workers.ENCODE))
            while waiting and (waiting[0].done() or len(waiting) >= MAX_ENCODING):
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()
    finally:  # stopped early: drop the strips not yet encoded
        for future in waiting:
            future.cancel()


def _write_tiff(path: str | os.PathLike, shape: tuple[int, int, int],
                strips: Iterable[np.ndarray], dtype: np.dtype | type = np.uint16) -> None:
    """Write (Y, X, C) rows of ``dtype`` arriving in strips as an LZW TIFF, atomically."""
    with atomic_output(path) as tmp:
        _encode_tiff(tmp, shape, strips, dtype, numba.get_num_threads())


def _encode_tiff(path: str | os.PathLike, shape: tuple[int, int, int],
                 strips: Iterable[np.ndarray], dtype: np.dtype | type, n_threads: int) -> None:
    """Write (Y, X, C) rows of ``dtype`` arriving in strips as an LZW TIFF at ``path``,
    encoded in the ``n_threads`` worker threads."""
    height, width, n_channels = shape
    row_bytes = np.dtype(dtype).itemsize * width * n_channels
    rows_per_strip = max(1, min(height, TIFF_STRIP_BYTES // row_bytes))
    if n_channels == 1:  # tifffile stores one sample per pixel as a plain 2-D page
        options = {"shape": (height, width), "photometric": "minisblack"}
    else:
        photometric = "rgb" if n_channels == 3 else "minisblack"
        options = {"shape": shape, "photometric": photometric, "planarconfig": "contig"}
    tifffile.imwrite(path, _tiff_strips(strips, rows_per_strip, n_threads), dtype=dtype,
                     compression="lzw", rowsperstrip=rows_per_strip, **options)


def write_probabilities(path: str | os.PathLike, probs: np.ndarray) -> None:
    """Write probabilities as ilastik's TIFF export: uint16, Y x X x C, LZW.

    Three channels are written as an RGB image (as vigra does), any other count as
    minisblack samples. The file appears atomically (written under a temporary name).

    Parameters
    ----------
    path : path-like
        Output ``.tiff``.
    probs : (Y, X, C) ndarray of uint16
    """
    if probs.ndim != 3 or probs.dtype != np.uint16:
        raise ValueError(f"expected a (Y, X, C) uint16 array, got {probs.dtype} {probs.shape}")
    _write_tiff(path, probs.shape, [probs])


class _TiffSink:
    """One output TIFF, fed strip by strip by the caller and written by its own thread.

    :func:`start_file` pushes each strip's probabilities and other exports into one sink each,
    so one pass over the image writes all of them. The file is written under a temporary name
    and renamed by :meth:`commit`.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int],
                 dtype: np.dtype | type) -> None:
        self.path = Path(path)
        self._tmp = create_temporary(self.path)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        # numba's thread count is per thread: the caller's (``run --threads``) applies
        args = (shape, dtype, numba.get_num_threads())
        self._thread = threading.Thread(target=self._write, args=args, daemon=True)
        self._thread.start()

    def _strips(self) -> Iterator[np.ndarray]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _write(self, shape: tuple[int, int, int], dtype: np.dtype | type,
               n_threads: int) -> None:
        try:
            _encode_tiff(self._tmp, shape, self._strips(), dtype, n_threads)  # see commit()
        except BaseException as exc:  # handed to the caller in put/close
            self._error = exc

    def _send(self, item: object) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        self.close()  # the writer stopped early: raise its error

    def put(self, strip: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._send(strip)

    def close(self) -> None:
        """Finish writing the temporary file, or raise the writer's error."""
        if self._thread.is_alive():
            self._send(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def commit(self) -> None:
        """Rename the finished file into place."""
        interrupts.check()  # a Ctrl-C that Python dropped while the image was computed
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Stop, and remove the temporary file (nothing to do after :meth:`commit`)."""
        if self._thread.is_alive():
            with contextlib.suppress(BaseException):
                self._send(_Aborted())
        self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class _Aborted(Exception):
    pass


class PendingFile:
    """The outputs of one image whose computation is done, still being LZW-encoded and written
    by background threads under temporary names (see :func:`start_file`).

    Call :meth:`finish` to wait for them and rename them into place, or :meth:`abort` to
    remove them.
    """

    def __init__(self, sinks: list[_TiffSink]) -> None:
        self._sinks = sinks  # the probabilities first

    def finish(self) -> None:
        """Wait for the files and rename them into place, the probabilities first; when writing
        any of them failed, none appears and the writer's error is raised."""
        try:
            for sink in self._sinks:
                sink.close()
            for sink in self._sinks:
                sink.commit()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop writing and remove the temporary files (nothing to do after :meth:`finish`)."""
        for sink in self._sinks:
            sink.abort()


def start_file(img_file: str | os.PathLike, out_file: str | os.PathLike,
               classifier: Classifier, selection: FeatureSelection,
               profile: str = "133", strip_bytes: int | None = None,
               exports: Mapping[str, str | os.PathLike] | None = None) -> PendingFile:
    """Classify one steinbock image; return while its TIFFs are still being written.

    Like :func:`predict_file`, which is ``start_file(...).finish()``. Returning once the last
    strip is computed lets a batch compute the next image while the last rows of this one are
    LZW-encoded and written (``batch.run_local`` does).

    Parameters
    ----------
    img_file, out_file, classifier, selection, profile, strip_bytes, exports
        As for :func:`predict_file`.

    Returns
    -------
    PendingFile
        Its :meth:`PendingFile.finish` puts the files in place (or raises the writer's error).

    Raises
    ------
    SteinpixError
        When the image cannot be read or classified; no output file is left behind.
    """
    wanted = dict(exports or {})
    unknown = set(wanted) - set(EXPORTS)
    if unknown:
        raise ValueError(f"unknown exports {sorted(unknown)}; known: {sorted(EXPORTS)}")
    sinks: dict[str, _TiffSink] = {}
    with _open_image(img_file) as dataset:
        _, height, width = dataset.shape

        def on_strip(probs: np.ndarray) -> None:
            if not sinks:  # opened with the first strip, after the image's checks
                sinks[""] = _TiffSink(out_file, (height, width, classifier.n_outputs),
                                      np.uint16)
                for name, path in wanted.items():
                    sinks[name] = _TiffSink(path, (height, width, 1), EXPORTS[name][1])
            for name in wanted:
                sinks[name].put(EXPORTS[name][0](probs))

        try:
            for strip in iter_strips(dataset, classifier, selection, profile,
                                     source=str(img_file), strip_bytes=strip_bytes,
                                     on_strip=on_strip):
                sinks[""].put(strip)
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise
    return PendingFile(list(sinks.values()))


def predict_file(img_file: str | os.PathLike, out_file: str | os.PathLike,
                 classifier: Classifier, selection: FeatureSelection,
                 profile: str = "133", strip_bytes: int | None = None,
                 exports: Mapping[str, str | os.PathLike] | None = None) -> None:
    """Classify one steinbock image and write its probability TIFF (and other exports).

    The image is read and the TIFFs written strip by strip, so memory does not grow with the
    image height. The other exports are computed from each strip's float32 probabilities
    (:mod:`steinpix.exports`) and written alongside; every file appears atomically, the
    others right after the probabilities; a failure while computing or writing leaves none.

    Parameters
    ----------
    img_file : path-like
        HDF5 image with an ``img`` dataset (C, Y, X).
    out_file : path-like
        Output TIFF, written atomically.
    classifier, selection
        From :func:`steinpix.forest.load_classifier` and :func:`load_selection`.
    profile : {"133", "14x"}
        Arithmetic profile of the feature filters.
    strip_bytes : int, optional
        Working-memory budget of one strip (default :data:`STRIP_BYTES`); ``run --mem``.
    exports : mapping, optional
        More outputs: ``{"uncertainty": path, "segmentation": path}`` (either or both), the
        Y x X TIFFs of ilastik's ``Uncertainty`` (uint16) and ``Simple Segmentation`` (uint8)
        exports.
    """
    start_file(img_file, out_file, classifier, selection, profile, strip_bytes,
               exports).finish()


def load_project(ilp_path: str | os.PathLike) -> tuple[Classifier, FeatureSelection]:
    """The classifier and the feature selection of a project (both checked)."""
    return load_classifier(ilp_path), load_selection(ilp_path)
