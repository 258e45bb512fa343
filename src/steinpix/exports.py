"""ilastik's pixel-classification exports, computed from the float32 probabilities.

ilastik 1.3.3post3 derives every export from the classifier's float32 probability maps
(``OpClassifierPredict.PMaps``, the cacheless path ``OpPredictionPipelineNoCache`` in
``ilastik/applets/pixelClassification/opPixelClassification.py``) and converts it with lazyflow's
``OpFormattedDataExport`` (``lazyflow/operators/ioOperators/opFormattedDataExport.py``):
``asarray(out_min + (a - in_min) * f32((out_max - out_min) / (in_max - in_min)), dtype)``,
where ``in_min, in_max`` is ``--pipeline_result_drange`` and ``out_min, out_max`` is
``--export_drange``. The functions here reproduce the three exports ``classify ilastik run``
writes, with the arguments steinpix passes to ilastik (``runners.headless_args``):

- ``Probabilities`` (uint16, 0..65535 from 0.0..1.0): :func:`export_uint16`;
- ``Uncertainty`` (uint16, 0..65535 from 0.0..1.0): :func:`uncertainty`;
- ``Simple Segmentation`` (uint8, 0..255 from 0..255): :func:`segmentation`.

ilastik 1.4.x uses the same operators and the same normalisation, so only the probabilities
themselves depend on the engine's arithmetic profile.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EXPORTS", "export_uint16", "margin_uncertainty", "segmentation", "uncertainty"]


def export_uint16(probs: np.ndarray, out: np.ndarray | None = None,
                  overwrite_input: bool = False) -> np.ndarray:
    """lazyflow's export normalisation from (0.0, 1.0) to uint16 (0, 65535).

    ``frac = f32(65535 / 1.0)``; ``uint16(p * frac)`` in float32, truncating like a C cast
    (``0 + (p - 0.0) * frac`` is the same in float32).

    Parameters
    ----------
    probs : ndarray of float32
        Values in [0, 1].
    out : ndarray of uint16, optional
        Same shape as ``probs``.
    overwrite_input : bool
        Scale a float32 ``probs`` in place instead of into a temporary array (``probs`` then
        holds ``p * frac``).

    Returns
    -------
    ndarray of uint16
    """
    frac = np.float32(np.float64(65535 - 0) / np.float64(1.0 - 0.0))
    in_place = overwrite_input and probs.dtype == np.float32
    scaled = np.multiply(probs, frac, out=probs if in_place else None, dtype=np.float32)
    if out is None:
        return scaled.astype(np.uint16)
    np.copyto(out, scaled, casting="unsafe")
    return out


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """ilastik's uncertainty before export: one minus the margin of the two largest classes.

    ilastik's ``OpEnsembleMargin`` sorts each pixel's probabilities along the channel axis,
    subtracts the second largest from the largest and returns ``1 - difference``, all in
    float32 (``f32(1 - f32(p_max - p_second))``). Two equal largest values give 1.0. With a
    single channel it returns 0 everywhere.

    Parameters
    ----------
    probs : (..., C) ndarray of float32
        Probabilities, channels last.

    Returns
    -------
    (...) ndarray of float32
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[-1] <= 1:
        return np.zeros(probs.shape[:-1], dtype=np.float32)
    # The two largest values are the same whichever way they are found; one pass over the
    # channels is several times faster than sorting the short last axis.
    largest = probs[..., 0].copy()
    second = np.full_like(largest, -np.inf)
    for c in range(1, probs.shape[-1]):
        p = probs[..., c]
        np.maximum(second, np.minimum(largest, p), out=second)
        np.maximum(largest, p, out=largest)
    margin = np.subtract(largest, second, out=largest)
    return np.subtract(np.float32(1), margin, out=margin)


def uncertainty(probs: np.ndarray) -> np.ndarray:
    """The ``Uncertainty`` export: :func:`margin_uncertainty` scaled like the probabilities.

    What ilastik 1.3.3post3 writes with ``--export_source=Uncertainty --export_dtype=uint16
    --output_axis_order=yxc --pipeline_result_drange=(0.0,1.0) --export_drange=(0,65535)``:
    ``uint16(f32(u * 65535))``, truncated (:func:`export_uint16`).

    Parameters
    ----------
    probs : (Y, X, C) ndarray of float32
        The classifier's probabilities (before their own export).

    Returns
    -------
    (Y, X) ndarray of uint16
        0 where one class is certain, 65535 where the two most probable classes tie.
    """
    return export_uint16(margin_uncertainty(probs))


def segmentation(probs: np.ndarray) -> np.ndarray:
    """The ``Simple Segmentation`` export: the most probable class per pixel, from 1.

    ilastik's ``OpArgmaxChannel`` writes ``numpy.argmax(probs, axis=-1) + 1`` as uint8: on a
    tie the class listed first in the project wins (numpy returns the first maximum). The
    export with ``--export_dtype=uint8 --pipeline_result_drange=(0,255)
    --export_drange=(0,255)`` multiplies by ``f32(255 / 255) = 1`` and so keeps the labels.
    ilastik accepts at most 255 classes here.

    Parameters
    ----------
    probs : (Y, X, C) ndarray of float32
        The classifier's probabilities (before their own export), C <= 255.

    Returns
    -------
    (Y, X) ndarray of uint8
        Labels 1..C.
    """
    n_classes = probs.shape[-1]
    if n_classes > 255:
        raise ValueError(f"a simple segmentation holds at most 255 classes, got {n_classes}")
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    labels += 1
    return labels


# The exports besides the probabilities, by ``run`` option name: the function of a strip's
# float32 probabilities and the dtype of the (Y, X) TIFF it is written to.
EXPORTS = {"uncertainty": (uncertainty, np.uint16), "segmentation": (segmentation, np.uint8)}
