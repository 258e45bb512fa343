"""Describe an HDF5 file as a flat dict, so that two files can be compared in full."""

from __future__ import annotations

import h5py
import numpy as np


def _string_kind(obj) -> str:
    tid = obj.id.get_type()
    if isinstance(tid, h5py.h5t.TypeStringID):
        cset = "utf8" if tid.get_cset() == h5py.h5t.CSET_UTF8 else "ascii"
        return f"{'vlen' if tid.is_variable_str() else 'fixed'}-{cset}"
    return ""


def _value(value):
    if isinstance(value, np.ndarray):
        return (
            str(value.dtype),
            value.shape,
            value.tobytes()
            if value.dtype != object
            else tuple(v if isinstance(v, bytes) else str(v) for v in value.ravel()),
        )
    if isinstance(value, np.generic):
        return (str(value.dtype), value.item())
    return (type(value).__name__, value)


def describe(path, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """``{object path: (kind, dtype, shape, string type, value, attributes)}``.

    Paths whose last component is in ``ignore`` (e.g. ``time``, ``datasetId``) keep their
    type but not their value.
    """
    tree: dict[str, tuple] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj) -> None:
            attrs = tuple(sorted((k, _value(v)) for k, v in obj.attrs.items()))
            if isinstance(obj, h5py.Group):
                tree[name] = ("group", attrs)
                return
            value = None if name.rsplit("/", 1)[-1] in ignore else _value(obj[()])
            tree[name] = ("dataset", str(obj.dtype), obj.shape, _string_kind(obj), value, attrs)

        f.visititems(visit)
    return tree
