"""The random forest classifier stored in an ilastik project, and bit-exact prediction with it.

ilastik 1.3.3 stores its pixel classifier (a ``ParallelVigraRfLazyflowClassifier``: several vigra
random forests whose votes are averaged) in ``PixelClassification/ClassifierForests`` of the
``.ilp`` file. This module reads those forests with h5py only (the pickled class names are matched
as text, never unpickled) and predicts with them exactly as vigra 1.11.1 and lazyflow do, down to
the last float32 bit (spec ``ilastik-1.3.3-prediction.md`` §1 and §3).

All trees of all forests are flattened into a few numpy arrays so that one numba kernel can walk
them for blocks of pixels in parallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numba
import numpy as np

from steinpix.errors import SteinpixError

__all__ = [
    "Classifier",
    "FlatForest",
    "Forest",
    "Tree",
    "load_classifier",
    "predict_proba",
    "supports_project",
]

CLASSIFIER_GROUP = "PixelClassification/ClassifierForests"
LABEL_NAMES = "PixelClassification/LabelNames"
PARALLEL_TYPE = "ParallelVigraRfLazyflowClassifier"
SINGLE_TYPE = "VigraRfLazyflowClassifier"

# vigra's node type ids (rf_nodeproxy.hxx). Leaves carry the 0x40000000 tag.
THRESHOLD_NODE = 0
CONST_PROB_LEAF = 0x40000000
_NODE_TYPE_NAMES = {
    1: "hyperplane split",
    2: "hypersphere split",
    0x40000001: "logistic regression leaf",
}

# Pixels per work item of the numba kernel: 256 rows of 160 float32 features (160 KiB) stay in
# the L2 cache while all trees are walked for them.
BLOCK_PIXELS = 256

_ENGINE_HINT = "use --engine ilastik"


@dataclass(frozen=True, eq=False)
class Tree:
    """One vigra decision tree as stored in HDF5.

    Attributes
    ----------
    topology : (T,) int32 ndarray
        ``[n_features, n_classes, node...]``; nodes start at index 2.
    parameters : (P,) float64 ndarray
        Split thresholds and leaf class probabilities, addressed by the nodes.
    """

    topology: np.ndarray
    parameters: np.ndarray


@dataclass(frozen=True, eq=False)
class Forest:
    """One vigra random forest (a ``ForestNNNN`` group).

    Attributes
    ----------
    name : str
        HDF5 group name.
    trees : tuple of Tree
        The trees in HDF5 name order, which is vigra's prediction order.
    predict_weighted : bool
        Whether leaf probabilities are multiplied by the leaf's training sample count.
    """

    name: str
    trees: tuple[Tree, ...]
    predict_weighted: bool

    @property
    def tree_count(self) -> int:
        return len(self.trees)


@dataclass(frozen=True, eq=False)
class FlatForest:
    """All trees of all forests as flat arrays for the numba kernel.

    Every node has a global index. Leaves point to themselves, so a walk of exactly
    ``tree_depth[t]`` steps from ``tree_root[t]`` ends at the pixel's leaf without any branch.

    Attributes
    ----------
    next_node : (2 * n_nodes,) int32 ndarray
        ``next_node[2*k + (x < threshold[k])]``: entry 0 is the right child, entry 1 the left one
        (vigra goes left when ``x < threshold``; NaN goes right).
    column : (n_nodes,) int32 ndarray
        Feature column tested by each node (0 for leaves).
    threshold : (n_nodes,) float32 ndarray
        The smallest float32 >= the stored float64 threshold: for float32 ``x``,
        ``x < threshold32`` equals vigra's ``float64(x) < threshold64``.
    leaf_f32 : (n_nodes, K) float32 ndarray
        ``float32(w_l)`` of each leaf (zeros for split nodes).
    leaf_f64 : (n_nodes, K) float64 ndarray
        ``w_l`` of each leaf: probability, times the sample count if ``predict_weighted``.
    tree_root, tree_depth : (n_trees,) int32 ndarray
        Root node and maximum depth of each tree.
    forest_start : (n_forests + 1,) int32 ndarray
        Trees of forest ``f`` are ``forest_start[f]:forest_start[f+1]``.
    forest_tree_count : (n_forests,) float32 ndarray
        Tree count of each forest (the weight lazyflow gives to its probabilities).
    total_tree_count : float
        Sum of the tree counts.
    combine : bool
        True for the parallel classifier (lazyflow's weighted sum over forests); False for a
        single-forest classifier, whose forest output is used as it is.
    """

    next_node: np.ndarray
    column: np.ndarray
    threshold: np.ndarray
    leaf_f32: np.ndarray
    leaf_f64: np.ndarray
    tree_root: np.ndarray
    tree_depth: np.ndarray
    forest_start: np.ndarray
    forest_tree_count: np.ndarray
    total_tree_count: float
    combine: bool


@dataclass(frozen=True, eq=False)
class Classifier:
    """The pixel classifier of an ilastik project.

    Attributes
    ----------
    path : Path
        The ``.ilp`` it was read from (for error messages).
    classifier_type : str
        ``"ParallelVigraRfLazyflowClassifier"`` or ``"VigraRfLazyflowClassifier"``.
    feature_names : tuple of str, or None
        Names of the feature columns the forests were trained on (None in old projects).
    n_features : int
        Number of feature columns.
    known_labels : tuple of int
        Label value (1-based) of each classifier column.
    label_names : tuple of str
        Label names of the project; their count is the number of output channels.
    forests : tuple of Forest
        The forests in ``ForestNNNN`` order.
    flat : FlatForest
        The same forests flattened for prediction.
    """

    path: Path
    classifier_type: str
    feature_names: tuple[str, ...] | None
    n_features: int
    known_labels: tuple[int, ...]
    label_names: tuple[str, ...]
    forests: tuple[Forest, ...]
    flat: FlatForest = field(repr=False)

    @property
    def n_classes(self) -> int:
        """Number of classifier columns (trained labels)."""
        return len(self.known_labels)

    @property
    def n_outputs(self) -> int:
        """Number of output channels (label names)."""
        return len(self.label_names)

    @property
    def output_channels(self) -> np.ndarray:
        """(n_classes,) int64: output channel of each classifier column (``label - 1``)."""
        return np.asarray(self.known_labels, dtype=np.int64) - 1


# --------------------------------------------------------------------------------------------
# Reading the project
# --------------------------------------------------------------------------------------------


def _decode(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        return _decode(value[()])
    return str(value)


def _scalar(group: h5py.Group, name: str, where: str) -> float:
    """A length-1 (or scalar) numeric dataset of a vigra forest as a Python float."""
    if name not in group:
        raise _corrupt(where, f"missing {group.name}/{name}")
    value = np.asarray(group[name][()], dtype=np.float64).ravel()
    if value.size != 1:
        raise _corrupt(where, f"{group.name}/{name} has {value.size} values, expected 1")
    return float(value[0])


def _corrupt(where: str, problem: str) -> SteinpixError:
    return SteinpixError(
        f"{where}: the stored random forest is damaged or unsupported ({problem}); {_ENGINE_HINT}"
    )


def _classifier_type(group: h5py.Group, where: str) -> str:
    """Which lazyflow classifier class is pickled in ``pickled_type`` (matched as text)."""
    if "pickled_type" not in group:
        raise _corrupt(where, "no pickled_type")
    text = _decode(group["pickled_type"][()])
    # The parallel name contains the single one, so test it first.
    if PARALLEL_TYPE in text:
        return PARALLEL_TYPE
    if SINGLE_TYPE in text:
        return SINGLE_TYPE
    shown = " ".join(text.replace("\n", " ").split()[:2]) or "empty"
    raise SteinpixError(
        f"{where}: the project's classifier ({shown}) is not a vigra random forest, which the "
        f"built-in engine cannot run; {_ENGINE_HINT}"
    )


def _read_tree(group: h5py.Group, where: str) -> Tree:
    for name in ("topology", "parameters"):
        if name not in group:
            raise _corrupt(where, f"missing {group.name}/{name}")
    topology = np.asarray(group["topology"][()], dtype=np.int64).ravel()
    parameters = np.asarray(group["parameters"][()], dtype=np.float64).ravel()
    return Tree(topology=topology.astype(np.int32), parameters=parameters)


def _read_forest(group: h5py.Group, where: str) -> Forest:
    """One vigra forest group: its trees in HDF5 name order and its prediction options."""
    for name in ("_options", "_ext_param"):
        if name not in group:
            raise _corrupt(where, f"missing {group.name}/{name}")
    tree_count = _scalar(group["_options"], "tree_count_", where)
    weighted = _scalar(group["_options"], "predict_weighted_", where)
    # vigra loads every subgroup that does not start with "_" as a tree, in name order.
    names = sorted(k for k in group if not k.startswith("_") and isinstance(group[k], h5py.Group))
    if tree_count != len(names) or not names:
        raise _corrupt(
            where, f"{group.name} has {len(names)} trees but tree_count_ = {tree_count:g}"
        )
    trees = tuple(_read_tree(group[name], where) for name in names)
    return Forest(name=group.name.rsplit("/", 1)[-1], trees=trees, predict_weighted=weighted != 0)


def _forest_groups(group: h5py.Group, kind: str, where: str) -> list[h5py.Group]:
    if kind == SINGLE_TYPE:
        if "forest" not in group:
            raise _corrupt(where, f"missing {group.name}/forest")
        return [group["forest"]]
    # lazyflow: sorted(group.items()), keeping names that start with "Forest".
    names = sorted(k for k in group if k.startswith("Forest"))
    if not names:
        raise _corrupt(where, f"no Forest groups in {group.name}")
    return [group[name] for name in names]


def _class_count(forests_h5: list[h5py.Group], where: str) -> tuple[int, int]:
    """(n_classes, n_features) shared by all forests."""
    counts = set()
    for g in forests_h5:
        ext = g["_ext_param"]
        counts.add(
            (int(_scalar(ext, "class_count_", where)), int(_scalar(ext, "column_count_", where)))
        )
    if len(counts) != 1:
        raise _corrupt(where, f"forests disagree on class/feature counts {sorted(counts)}")
    return counts.pop()


def _label_names(h5: h5py.File, where: str) -> tuple[str, ...]:
    if LABEL_NAMES not in h5:
        raise _corrupt(where, f"missing {LABEL_NAMES}")
    return tuple(_decode(v) for v in np.asarray(h5[LABEL_NAMES][()]).ravel())


def _open_project(path: Path) -> h5py.File:
    if not path.is_file():
        raise SteinpixError(f"{path}: no such project file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SteinpixError(f"{path}: not an ilastik project (cannot open as HDF5: {exc})") from exc


def load_classifier(ilp_path: str | os.PathLike) -> Classifier:
    """Read the trained random forests of an ilastik pixel classification project.

    Nothing is unpickled: the classifier class is recognised by its name in ``pickled_type``.

    Parameters
    ----------
    ilp_path : path-like
        The ``.ilp`` project (HDF5).

    Returns
    -------
    Classifier
        Forests, label bookkeeping and the flattened arrays used by :func:`predict_proba`.

    Raises
    ------
    SteinpixError
        If the file is not a project, holds no trained classifier, holds a classifier other than a
        vigra random forest, or the forests use node types ilastik never writes.
    """
    path = Path(ilp_path)
    where = str(path)
    with _open_project(path) as h5:
        if CLASSIFIER_GROUP not in h5:
            raise SteinpixError(
                f"{where}: the project has no trained classifier stored; train it and save the "
                f"project in ilastik, or {_ENGINE_HINT}"
            )
        group = h5[CLASSIFIER_GROUP]
        kind = _classifier_type(group, where)
        forests_h5 = _forest_groups(group, kind, where)
        n_classes, n_features = _class_count(forests_h5, where)
        forests = tuple(_read_forest(g, where) for g in forests_h5)
        if "known_labels" in group:
            known = tuple(int(v) for v in np.asarray(group["known_labels"][()]).ravel())
        else:  # older projects: labels 1..K
            known = tuple(range(1, n_classes + 1))
        names = None
        if "feature_names" in group:
            names = tuple(_decode(v) for v in np.asarray(group["feature_names"][()]).ravel())
        label_names = _label_names(h5, where)

    _check_labels(known, n_classes, len(label_names), where)
    if names is not None and len(names) != n_features:
        raise _corrupt(where, f"{len(names)} feature names for {n_features} feature columns")
    flat = flatten_forests(forests, n_features, n_classes, combine=kind == PARALLEL_TYPE,
                           where=where)
    return Classifier(
        path=path,
        classifier_type=kind,
        feature_names=names,
        n_features=n_features,
        known_labels=known,
        label_names=label_names,
        forests=forests,
        flat=flat,
    )


def _check_labels(known: tuple[int, ...], n_classes: int, n_outputs: int, where: str) -> None:
    if len(known) != n_classes:
        raise _corrupt(where, f"{len(known)} known labels for {n_classes} classes")
    bad = [k for k in known if not 1 <= k <= n_outputs]
    if bad or len(set(known)) != len(known):
        raise _corrupt(where, f"known labels {list(known)} do not fit {n_outputs} label names")


def supports_project(ilp_path: str | os.PathLike) -> tuple[bool, str]:
    """Whether the built-in engine can run a project (for ``--engine auto``).

    Parameters
    ----------
    ilp_path : path-like
        The ``.ilp`` project.

    Returns
    -------
    ok : bool
        True if the classifier and the feature selection can be reproduced.
    reason : str
        Empty if ``ok``, else a one-line explanation naming the file.
    """
    try:
        classifier = load_classifier(ilp_path)
        _check_feature_selection(classifier)
    except SteinpixError as exc:
        return False, str(exc)
    return True, ""


def _check_feature_selection(classifier: Classifier) -> None:
    """The project's feature selection must be readable and yield the classifier's columns."""
    from steinpix import features  # imported late: features is a sibling module

    where = str(classifier.path)
    with _open_project(classifier.path) as h5:
        if "FeatureSelections" not in h5:
            raise SteinpixError(f"{where}: the project has no feature selection")
        selection = features.FeatureSelection.from_h5(h5["FeatureSelections"], where)
    if classifier.feature_names is None:
        return
    n = classifier.n_features
    for n_channels in range(1, n + 1):
        if features.feature_names(selection, n_channels) == list(classifier.feature_names):
            return
    raise SteinpixError(
        f"{where}: the classifier's {n} feature names do not match the project's feature "
        f"selection for any channel count; {_ENGINE_HINT}"
    )


# --------------------------------------------------------------------------------------------
# Flattening
# --------------------------------------------------------------------------------------------


def round_up_to_float32(values: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 value (NaN stays NaN).

    For float32 ``x`` and float64 ``t``, ``float64(x) < t`` holds exactly when
    ``x < round_up_to_float32(t)``: float32 values below ``t`` are also below the next float32
    up, and every float32 below that one is below ``t``. This holds for infinities, too
    (``t > FLT_MAX`` gives +inf, ``t < -FLT_MAX`` gives -FLT_MAX).

    Parameters
    ----------
    values : ndarray of float64

    Returns
    -------
    ndarray of float32, same shape
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        t32 = values.astype(np.float32)
    low = t32.astype(np.float64) < values
    t32[low] = np.nextafter(t32[low], np.float32(np.inf))
    return t32


@dataclass
class _FlatBuilder:
    """Accumulates the nodes of all trees while they are being flattened."""

    n_classes: int
    left: list[int] = field(default_factory=list)
    right: list[int] = field(default_factory=list)
    column: list[int] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    leaf: list[np.ndarray] = field(default_factory=list)

    def add(self) -> int:
        self.left.append(-1)
        self.right.append(-1)
        self.column.append(0)
        self.threshold.append(0.0)
        self.leaf.append(np.zeros(self.n_classes))
        return len(self.left) - 1


def _add_tree(b: _FlatBuilder, tree: Tree, weighted: bool, n_features: int,
              where: str) -> tuple[int, int]:
    """Append one tree's nodes to ``b``; returns (root index, maximum depth)."""
    top, par, k = tree.topology, tree.parameters, b.n_classes
    if top.size < 4 or top[0] != n_features or top[1] != k:
        raise _corrupt(where, "a tree's topology header does not match the forest")
    root = b.add()
    stack = [(2, root, 0)]  # (topology index, global node, depth)
    seen: set[int] = set()
    max_depth = 0
    while stack:
        pos, node, depth = stack.pop()
        if pos in seen or not 2 <= pos < top.size - 1:
            raise _corrupt(where, f"invalid child link {pos} in a tree")
        seen.add(pos)
        kind, p = int(top[pos]), int(top[pos + 1])
        max_depth = max(max_depth, depth)
        if kind == CONST_PROB_LEAF:
            if not 0 <= p <= par.size - 1 - k:
                raise _corrupt(where, "a leaf points outside the tree parameters")
            probs = par[p + 1:p + 1 + k]
            # vigra: w = prob * (weighted * leaf_weight + (1 - weighted)), in double
            b.leaf[node] = probs * par[p] if weighted else probs * 1.0
            b.left[node] = b.right[node] = node  # leaves loop onto themselves
        elif kind == THRESHOLD_NODE:
            if pos + 5 > top.size or not 0 <= p <= par.size - 2:
                raise _corrupt(where, "a split node is truncated")
            column = int(top[pos + 4])
            if not 0 <= column < n_features:
                raise _corrupt(where, f"a split node tests feature {column} of {n_features}")
            b.column[node] = column
            b.threshold[node] = float(par[p + 1])
            b.left[node], b.right[node] = b.add(), b.add()
            stack.append((int(top[pos + 3]), b.right[node], depth + 1))
            stack.append((int(top[pos + 2]), b.left[node], depth + 1))
        else:
            name = _NODE_TYPE_NAMES.get(kind, f"unknown type {kind:#x}")
            raise _corrupt(where, f"a tree contains a {name} node, which ilastik never writes")
    return root, max_depth


def flatten_forests(forests: tuple[Forest, ...] | list[Forest], n_features: int, n_classes: int,
                    combine: bool = True, where: str = "classifier") -> FlatForest:
    """Flatten forests into the arrays of a :class:`FlatForest`.

    Parameters
    ----------
    forests : sequence of Forest
        In the order their outputs are summed.
    n_features, n_classes : int
        Feature columns and classes of every tree.
    combine : bool
        Use lazyflow's tree-count weighted sum over forests (parallel classifier).
    where : str
        Name used in error messages (the project file).

    Returns
    -------
    FlatForest
    """
    b = _FlatBuilder(n_classes)
    roots, depths, starts = [], [], [0]
    for forest in forests:
        for tree in forest.trees:
            root, depth = _add_tree(b, tree, forest.predict_weighted, n_features, where)
            roots.append(root)
            depths.append(depth)
        starts.append(len(roots))
    next_node = np.empty(2 * len(b.left), dtype=np.int32)
    next_node[0::2] = b.right  # x < t is False (or NaN): right child
    next_node[1::2] = b.left
    leaf_f64 = np.array(b.leaf, dtype=np.float64).reshape(-1, n_classes)
    counts = [f.tree_count for f in forests]
    return FlatForest(
        next_node=next_node,
        column=np.array(b.column, dtype=np.int32),
        threshold=round_up_to_float32(np.array(b.threshold, dtype=np.float64)),
        leaf_f32=leaf_f64.astype(np.float32),
        leaf_f64=leaf_f64,
        tree_root=np.array(roots, dtype=np.int32),
        tree_depth=np.array(depths, dtype=np.int32),
        forest_start=np.array(starts, dtype=np.int32),
        forest_tree_count=np.array(counts, dtype=np.float32),
        total_tree_count=float(sum(counts)),
        combine=bool(combine),
    )


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _walk_tree(x, lo, m, root, depth, next_node, column, threshold, node):
    """Leaf of each pixel ``lo..lo+m`` in one tree, into ``node[:m]``.

    All pixels take exactly ``depth`` steps (leaves loop onto themselves), so the inner loop has
    no data-dependent branch and the walks of different pixels overlap in the CPU.
    """
    for i in range(m):
        node[i] = root
    for _ in range(depth):
        for i in range(m):
            k = node[i]
            go_left = x[lo + i, column[k]] < threshold[k]
            node[i] = next_node[2 * k + np.int32(go_left)]


@numba.njit(cache=True, nogil=True)
def _has_nan(x, row):
    for j in range(x.shape[1]):
        if np.isnan(x[row, j]):
            return True
    return False


@numba.njit(cache=True, nogil=True)
def _predict_block(x, lo, m, flat_args, out_channel, out, node, acc, total, res):
    (next_node, column, threshold, leaf_f32, leaf_f64, tree_root, tree_depth, forest_start,
     forest_tree_count, total_tree_count, combine) = flat_args
    n_classes = leaf_f32.shape[1]
    for i in range(m):
        for c in range(n_classes):
            res[i, c] = np.float32(0.0)
    for f in range(forest_start.size - 1):
        # vigra predictProbabilities of one forest: float32 sum, double total weight
        for i in range(m):
            total[i] = 0.0
            for c in range(n_classes):
                acc[i, c] = np.float32(0.0)
        for t in range(forest_start[f], forest_start[f + 1]):
            _walk_tree(x, lo, m, tree_root[t], tree_depth[t], next_node, column, threshold, node)
            for i in range(m):
                k = node[i]
                for c in range(n_classes):
                    acc[i, c] += leaf_f32[k, c]
                    total[i] += leaf_f64[k, c]
        count = forest_tree_count[f]
        for i in range(m):
            norm = np.float32(total[i])
            for c in range(n_classes):
                p = acc[i, c] / norm
                if combine:  # lazyflow: forest_predictions *= treeCount; total += ...
                    res[i, c] += p * count
                else:
                    res[i, c] = p
    scale = np.float32(total_tree_count)
    for i in range(m):
        row = lo + i
        for c in range(out.shape[1]):
            out[row, c] = np.float32(0.0)
        if _has_nan(x, row):  # vigra: a row with any NaN feature gets all-zero probabilities
            continue
        for c in range(n_classes):
            value = res[i, c] / scale if combine else res[i, c]
            out[row, out_channel[c]] = value


@numba.njit(cache=True, parallel=True, nogil=True)
def _predict_kernel(x, flat_args, out_channel, out, block):
    n = x.shape[0]
    n_classes = flat_args[3].shape[1]
    n_blocks = (n + block - 1) // block
    for b in numba.prange(n_blocks):
        lo = b * block
        m = min(block, n - lo)
        node = np.empty(block, dtype=np.int32)
        acc = np.empty((block, n_classes), dtype=np.float32)
        total = np.empty(block, dtype=np.float64)
        res = np.empty((block, n_classes), dtype=np.float32)
        _predict_block(x, lo, m, flat_args, out_channel, out, node, acc, total, res)


def _flat_args(flat: FlatForest) -> tuple:
    return (
        flat.next_node, flat.column, flat.threshold, flat.leaf_f32, flat.leaf_f64,
        flat.tree_root, flat.tree_depth, flat.forest_start, flat.forest_tree_count,
        np.float32(flat.total_tree_count), bool(flat.combine),
    )


def predict_proba(classifier: Classifier, features: np.ndarray, out: np.ndarray | None = None,
                  block: int = BLOCK_PIXELS) -> np.ndarray:
    """Class probabilities of each pixel, bit-identical to ilastik 1.3.3 (vigra 1.11.1).

    Per forest, leaf weights are summed over the trees in float32 with a float64 total and
    divided; the forests are then combined as lazyflow does (weighted by tree count, summed in
    ``ForestNNNN`` order in float32, divided by the total tree count). Rows containing a NaN
    get zeros. Classifier column ``i`` goes to output channel ``known_labels[i] - 1``; channels
    of labels without a trained column are 0.

    Parameters
    ----------
    classifier : Classifier
        From :func:`load_classifier`.
    features : (N, F) float32 ndarray
        One row per pixel, columns in the order of ``classifier.feature_names``.
    out : (N, n_outputs) float32 ndarray, optional
        C-contiguous array to write into.
    block : int
        Pixels per parallel work item.

    Returns
    -------
    (N, n_outputs) float32 ndarray
        ``n_outputs`` = number of label names of the project.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != classifier.n_features:
        raise ValueError(
            f"features must have shape (N, {classifier.n_features}), got {features.shape}"
        )
    shape = (features.shape[0], classifier.n_outputs)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    if features.shape[0]:
        _predict_kernel(features, _flat_args(classifier.flat), classifier.output_channels, out,
                        int(block))
    return out
