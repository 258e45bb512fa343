"""The random forest classifier stored in an ilastik project, and bit-exact prediction with it.

ilastik 1.3.3 stores its pixel classifier (a ``ParallelVigraRfLazyflowClassifier``: several vigra
random forests whose votes are averaged) in ``PixelClassification/ClassifierForests`` of the
``.ilp`` file. This module reads those forests with h5py only (the pickled class names are matched
as text, never unpickled) and predicts with them exactly as vigra 1.11.1 and lazyflow do, down to
the last float32 bit (spec ``ilastik-1.3.3-prediction.md`` §1 and §3).

All trees of all forests are flattened into numpy arrays (:class:`FlatForest`) for one numba
kernel that classifies blocks of 32 pixels in parallel: small trees with the branch-free
QuickScorer algorithm in SIMD instructions, large trees by walking them. When every leaf votes
for one class (ilastik's usual forests), the votes are counted in SIMD registers as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from steinpix import features
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

# Trees with at most this many leaves use QuickScorer (two 32-bit words per pixel and tree);
# larger ones are walked node by node, because QuickScorer evaluates every node of a tree.
QS_MAX_LEAVES = 64

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


class FlatForest(NamedTuple):
    """All trees of all forests as flat arrays; a named tuple so numba functions take it whole.

    Two representations of the same trees are kept. Trees with at most
    :data:`QS_MAX_LEAVES` leaves (all trees ilastik usually writes) are evaluated with the
    QuickScorer algorithm (Lucchese et al., SIGIR 2015): each split node is an *entry* that,
    when a pixel goes right, clears the bits of the leaves of its left subtree in the tree's
    32-bit leaf masks ("slots"); the pixel's leaf is then the lowest remaining bit. That is
    branch-free and runs 8 pixels per SIMD instruction. Larger trees are walked node by node.

    Attributes
    ----------
    next_node : (2 * n_nodes,) uint32 ndarray
        ``next_node[2*k + (x < threshold[k])]``: entry 0 is the right child, entry 1 the left one
        (vigra goes left when ``x < threshold``; NaN goes right). Leaves point to themselves.
    column : (n_nodes,) uint32 ndarray
        Feature column tested by each node (0 for leaves).
    threshold : (n_nodes,) float32 ndarray
        The smallest float32 >= the stored float64 threshold: for float32 ``x``,
        ``x < threshold32`` equals vigra's ``float64(x) < threshold64``.
    leaf_f32 : (n_nodes, K) float32 ndarray
        ``float32(w_l)`` of each leaf (zeros for split nodes).
    leaf_f64 : (n_nodes, K) float64 ndarray
        ``w_l`` of each leaf: probability, times the sample count if ``predict_weighted``.
    leaf_vote : (n_nodes,) uint64 ndarray
        ``1 << 8*class`` of each leaf when ``votes`` is True, else zeros.
    tree_root : (n_trees,) uint32 ndarray
        Root node of each tree.
    tree_slot_start : (n_trees + 1,) int64 ndarray
        Slots of tree ``t``; a tree without slots is walked.
    tree_leaf_start : (n_trees,) int64 ndarray
        Offset of tree ``t``'s leaves in ``qs_leaf_node`` and ``qs_leaf_vote``.
    qs_leaf_node : (n_qs_leaves,) uint32 ndarray
        Node index of each QuickScorer leaf, each tree's leaves from left to right.
    qs_leaf_vote : (n_qs_leaves,) uint64 ndarray
        ``leaf_vote`` of those leaves.
    qs_leaf_f32, qs_leaf_f64 : (n_qs_leaves, K) ndarray
        ``leaf_f32`` and ``leaf_f64`` of those leaves.
    qs_slot_start : (n_slots + 1,) int64 ndarray
        Entries of slot ``s`` are ``qs_slot_start[s]:qs_slot_start[s+1]``.
    qs_entries : (3 * n_entries,) uint32 ndarray
        Per entry: its feature column times :data:`LANES` (the column's offset in a block), the
        float32 bits of the rounded-up threshold of its split node, and the bits of the slot
        to keep when the pixel goes right. One array, so an entry is one cache access.
    qs_vote_mask : (n_slots * K,) uint32 ndarray
        When ``votes``: ``qs_vote_mask[slot * K + c]`` has the bits of the slot's leaves that
        vote for class ``c`` (zeros otherwise).
    forest_start : (n_forests + 1,) int64 ndarray
        Trees of forest ``f`` are ``forest_start[f]:forest_start[f+1]``.
    forest_tree_count : (n_forests,) float32 ndarray
        Tree count of each forest (the weight lazyflow gives to its probabilities).
    walked, walked_forest : (n_walked,) int64 ndarray
        The trees without slots (walked) and their forests.
    total_tree_count : float32
        Sum of the tree counts.
    combine : bool
        True for the parallel classifier (lazyflow's weighted sum over forests); False for a
        single-forest classifier, whose forest output is used as it is.
    votes : bool
        All leaves are pure and unweighted (weights 0 or 1, one 1 per leaf), there are at most 8
        classes and 255 trees per forest. Per-forest sums are then exact vote counts, which are
        counted in integer vector lanes and normalised as vigra does (:func:`_vote_probs`);
        the result is identical to the general float arithmetic.
    """

    next_node: np.ndarray
    column: np.ndarray
    threshold: np.ndarray
    leaf_f32: np.ndarray
    leaf_f64: np.ndarray
    leaf_vote: np.ndarray
    tree_root: np.ndarray
    tree_slot_start: np.ndarray
    tree_leaf_start: np.ndarray
    qs_leaf_node: np.ndarray
    qs_leaf_vote: np.ndarray
    qs_leaf_f32: np.ndarray
    qs_leaf_f64: np.ndarray
    qs_slot_start: np.ndarray
    qs_entries: np.ndarray
    qs_vote_mask: np.ndarray
    forest_start: np.ndarray
    forest_tree_count: np.ndarray
    walked: np.ndarray
    walked_forest: np.ndarray
    total_tree_count: np.float32
    combine: bool
    votes: bool


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


def _read_array(group_id: h5py.h5g.GroupID, path: str, name: str, where: str,
                dtype: type) -> np.ndarray:
    """The numeric dataset ``name`` of the group ``path`` (open as ``group_id``), flattened,
    as ``dtype``."""
    key = name.encode()
    if key not in group_id:
        raise _corrupt(where, f"missing {path}/{name}")
    dataset_id = h5py.h5d.open(group_id, key)
    if dataset_id.dtype.kind not in "biuf" or dataset_id.dtype.fields is not None:
        raise _corrupt(where, f"{path}/{name} is not numeric ({dataset_id.dtype})")
    values = np.empty(dataset_id.shape, dtype=dataset_id.dtype)
    if values.size:
        dataset_id.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
    return np.asarray(values, dtype=dtype).ravel()


def _read_forest(group: h5py.Group, where: str) -> Forest:
    """One vigra forest group: its trees in HDF5 name order and its prediction options.

    The trees are read through h5py's low-level API: a project holds hundreds of tree
    datasets, and h5py's high-level objects cost about 0.1 ms per access.
    """
    for name in ("_options", "_ext_param"):
        if name not in group:
            raise _corrupt(where, f"missing {group.name}/{name}")
    tree_count = _scalar(group["_options"], "tree_count_", where)
    weighted = _scalar(group["_options"], "predict_weighted_", where)
    # vigra loads every subgroup that does not start with "_" as a tree, in name order.
    group_id = group.id
    names = sorted(
        k for k in group_id
        if not k.startswith(b"_") and h5py.h5o.get_info(group_id, k).type == h5py.h5o.TYPE_GROUP
    )
    if tree_count != len(names) or not names:
        raise _corrupt(
            where, f"{group.name} has {len(names)} trees but tree_count_ = {tree_count:g}"
        )
    trees = []
    for key in names:
        tree_id = h5py.h5g.open(group_id, key)
        path = f"{group.name}/{key.decode(errors='replace')}"
        topology = _read_array(tree_id, path, "topology", where, np.int64)
        parameters = _read_array(tree_id, path, "parameters", where, np.float64)
        trees.append(Tree(topology=topology.astype(np.int32), parameters=parameters))
    return Forest(name=group.name.rsplit("/", 1)[-1], trees=tuple(trees),
                  predict_weighted=weighted != 0)


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
        load_supported_classifier(ilp_path)
    except SteinpixError as exc:
        return False, str(exc)
    return True, ""


def load_supported_classifier(ilp_path: str | os.PathLike) -> Classifier:
    """:func:`load_classifier`, plus the checks of :func:`supports_project`.

    Raises
    ------
    SteinpixError
        With the reason :func:`supports_project` gives.
    """
    classifier = load_classifier(ilp_path)
    _check_feature_selection(classifier)
    return classifier


def _check_feature_selection(classifier: Classifier) -> None:
    """The project's feature selection must be readable and yield the classifier's columns."""
    where = str(classifier.path)
    with _open_project(classifier.path) as h5:
        if "FeatureSelections" not in h5:
            raise SteinpixError(f"{where}: the project has no feature selection")
        selection = features.FeatureSelection.from_h5(h5["FeatureSelections"], where)
    n, per_channel = classifier.n_features, selection.n_features(1)
    if n % per_channel == 0:
        names = features.feature_names(selection, n // per_channel)
        if classifier.feature_names is None or list(classifier.feature_names) == names:
            return
    raise SteinpixError(
        f"{where}: the classifier's {n} feature columns do not match the project's feature "
        f"selection; {_ENGINE_HINT}"
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
class _ParsedTree:
    """One tree as local node lists; node 0 is the root, children are local indices."""

    left: list[int] = field(default_factory=list)
    right: list[int] = field(default_factory=list)
    column: list[int] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    weights: list[np.ndarray | None] = field(default_factory=list)  # leaf w_l, None for splits

    def add(self) -> int:
        self.left.append(-1)
        self.right.append(-1)
        self.column.append(0)
        self.threshold.append(0.0)
        self.weights.append(None)
        return len(self.left) - 1

    def in_order_leaves(self) -> tuple[list[int], dict[int, tuple[int, int]]]:
        """Leaves left to right, and for each split node the leaf range of its left subtree."""
        leaves: list[int] = []
        first: dict[int, int] = {}
        left_range: dict[int, tuple[int, int]] = {}
        stack = [(0, False)]
        while stack:  # iterative in-order traversal; deep trees must not hit the recursion limit
            node, expanded = stack.pop()
            if self.weights[node] is not None:
                leaves.append(node)
            elif not expanded:
                first[node] = len(leaves)
                stack.append((node, True))
                stack.append((self.left[node], False))
            else:  # left subtree done
                left_range[node] = (first[node], len(leaves))
                stack.append((self.right[node], False))
        return leaves, left_range


def _parse_tree(tree: Tree, weighted: bool, n_features: int, n_classes: int,
                where: str) -> _ParsedTree:
    """Check a vigra topology/parameters pair and turn it into a :class:`_ParsedTree`."""
    top, par, k = tree.topology, tree.parameters, n_classes
    if top.size < 4 or top[0] != n_features or top[1] != k:
        raise _corrupt(where, "a tree's topology header does not match the forest")
    parsed = _ParsedTree()
    stack = [(2, parsed.add())]  # (topology index, local node)
    seen: set[int] = set()
    while stack:
        pos, node = stack.pop()
        if pos in seen or not 2 <= pos < top.size - 1:
            raise _corrupt(where, f"invalid child link {pos} in a tree")
        seen.add(pos)
        kind, p = int(top[pos]), int(top[pos + 1])
        if kind == CONST_PROB_LEAF:
            if not 0 <= p <= par.size - 1 - k:
                raise _corrupt(where, "a leaf points outside the tree parameters")
            probs = par[p + 1:p + 1 + k]
            # vigra: w = prob * (weighted * leaf_weight + (1 - weighted)), in double
            parsed.weights[node] = probs * par[p] if weighted else probs * 1.0
        elif kind == THRESHOLD_NODE:
            if pos + 5 > top.size or not 0 <= p <= par.size - 2:
                raise _corrupt(where, "a split node is truncated")
            column = int(top[pos + 4])
            if not 0 <= column < n_features:
                raise _corrupt(where, f"a split node tests feature {column} of {n_features}")
            parsed.column[node] = column
            parsed.threshold[node] = float(par[p + 1])
            parsed.left[node], parsed.right[node] = parsed.add(), parsed.add()
            stack.append((int(top[pos + 3]), parsed.right[node]))
            stack.append((int(top[pos + 2]), parsed.left[node]))
        else:
            name = _NODE_TYPE_NAMES.get(kind, f"unknown type {kind:#x}")
            raise _corrupt(where, f"a tree contains a {name} node, which ilastik never writes")
    return parsed


@dataclass
class _Tables:
    """Growing lists behind a :class:`FlatForest`."""

    next_node: list[int] = field(default_factory=list)
    column: list[int] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    is_leaf: list[bool] = field(default_factory=list)
    tree_root: list[int] = field(default_factory=list)
    slot_start: list[int] = field(default_factory=lambda: [0])
    leaf_start: list[int] = field(default_factory=list)
    qs_leaf_node: list[int] = field(default_factory=list)
    # (slot, column, threshold, mask to keep)
    qs_entries: list[tuple[int, int, float, int]] = field(default_factory=list)

    def add_nodes(self, tree: _ParsedTree, n_classes: int) -> int:
        """Append a tree's nodes for walking; returns the global index of its root."""
        base = len(self.column)
        for j in range(len(tree.left)):
            if tree.weights[j] is not None:
                # Leaves loop onto themselves, so a walk may stop there or step on.
                self.next_node += [base + j, base + j]
                self.weights.append(tree.weights[j])
                self.is_leaf.append(True)
            else:
                self.next_node += [base + tree.right[j], base + tree.left[j]]
                self.weights.append(np.zeros(n_classes))
                self.is_leaf.append(False)
            self.column.append(tree.column[j])
            self.threshold.append(tree.threshold[j])
        self.tree_root.append(base)
        return base

    def add_quickscorer(self, tree: _ParsedTree, base: int) -> None:
        """Append a tree's QuickScorer entries, or give it no slots if it is too large."""
        leaves, left_range = tree.in_order_leaves()
        self.leaf_start.append(len(self.qs_leaf_node))
        slot0 = self.slot_start[-1]
        if len(leaves) > QS_MAX_LEAVES:
            self.slot_start.append(slot0)
            return
        self.qs_leaf_node += [base + j for j in leaves]
        for node, (lo, hi) in left_range.items():
            # Going right at ``node`` rules out leaves lo..hi-1 (its left subtree).
            for word in range(lo // 32, (hi - 1) // 32 + 1):
                a = max(lo, 32 * word) - 32 * word
                b = min(hi, 32 * word + 32) - 32 * word
                cleared = ((1 << b) - 1) ^ ((1 << a) - 1)
                self.qs_entries.append(
                    (slot0 + word, tree.column[node], tree.threshold[node], ~cleared & 0xFFFFFFFF)
                )
        self.slot_start.append(slot0 + (len(leaves) + 31) // 32)


def _votes_possible(leaf_weights: np.ndarray, forests, n_classes: int) -> bool:
    """Whether every leaf votes 1.0 for exactly one class (so float sums are exact counts)."""
    w = leaf_weights
    pure = bool(np.all((w == 0) | (w == 1)) and np.all(np.sum(w == 1, axis=1) == 1))
    return pure and n_classes <= 8 and max(f.tree_count for f in forests) <= 255


def _pack_entries(entries: list[tuple[int, int, float, int]]) -> np.ndarray:
    """``qs_entries`` of a :class:`FlatForest` from (slot, column, threshold, mask) tuples."""
    packed = np.zeros((len(entries), _ENTRY), dtype=np.uint32)
    packed[:, 0] = [e[1] * LANES for e in entries]
    packed[:, 1] = round_up_to_float32(np.array([e[2] for e in entries])).view(np.uint32)
    packed[:, 2] = [e[3] for e in entries]
    return packed.reshape(-1)


def _fill_vote_masks(vote_mask: np.ndarray, leaf_class: np.ndarray, tables: _Tables) -> None:
    """Set bit ``i % 32`` of ``vote_mask[slot0 + i // 32, c]`` for leaf ``i`` of each
    QuickScorer tree voting for class ``c`` (``leaf_class``: per QuickScorer leaf)."""
    ends = [*tables.leaf_start[1:], len(tables.qs_leaf_node)]
    for t, (first, end) in enumerate(zip(tables.leaf_start, ends, strict=True)):
        slot0 = tables.slot_start[t]
        if tables.slot_start[t + 1] == slot0:
            continue  # walked
        for i in range(end - first):
            vote_mask[slot0 + i // 32, leaf_class[first + i]] |= np.uint32(1 << (i % 32))


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
    tables = _Tables()
    starts = [0]
    for forest in forests:
        for tree in forest.trees:
            parsed = _parse_tree(tree, forest.predict_weighted, n_features, n_classes, where)
            base = tables.add_nodes(parsed, n_classes)
            tables.add_quickscorer(parsed, base)
        starts.append(len(tables.tree_root))
    weights = np.array(tables.weights, dtype=np.float64).reshape(-1, n_classes)
    counts = [f.tree_count for f in forests]
    is_leaf = np.array(tables.is_leaf, dtype=bool)
    votes = _votes_possible(weights[is_leaf], forests, n_classes)
    leaf_vote = np.zeros(len(weights), dtype=np.uint64)
    n_slots = tables.slot_start[-1]
    qs_leaf_node = np.array(tables.qs_leaf_node, dtype=np.uint32)
    vote_mask = np.zeros((n_slots, n_classes), dtype=np.uint32)
    if votes:
        classes = np.argmax(weights[is_leaf], axis=1).astype(np.uint64)
        leaf_vote[is_leaf] = np.left_shift(np.uint64(1), np.uint64(8) * classes)
        _fill_vote_masks(vote_mask, np.argmax(weights[qs_leaf_node], axis=1), tables)
    # Entries grouped by slot, so that a slot's mask stays in a register; then by column.
    entries = sorted(tables.qs_entries, key=lambda e: (e[0], e[1]))
    slots = np.array([e[0] for e in entries], dtype=np.int64)
    walked = np.flatnonzero(np.diff(tables.slot_start) == 0).astype(np.int64)
    return FlatForest(
        next_node=np.array(tables.next_node, dtype=np.uint32),
        column=np.array(tables.column, dtype=np.uint32),
        threshold=round_up_to_float32(np.array(tables.threshold, dtype=np.float64)),
        leaf_f32=weights.astype(np.float32),
        leaf_f64=weights,
        leaf_vote=leaf_vote,
        tree_root=np.array(tables.tree_root, dtype=np.uint32),
        tree_slot_start=np.array(tables.slot_start, dtype=np.int64),
        tree_leaf_start=np.array(tables.leaf_start, dtype=np.int64),
        qs_leaf_node=qs_leaf_node,
        qs_leaf_vote=leaf_vote[qs_leaf_node],
        qs_leaf_f32=weights[qs_leaf_node].astype(np.float32).reshape(-1, n_classes),
        qs_leaf_f64=weights[qs_leaf_node].reshape(-1, n_classes),
        qs_slot_start=np.searchsorted(slots, np.arange(n_slots + 1)).astype(np.int64),
        qs_entries=_pack_entries(entries),
        qs_vote_mask=vote_mask.reshape(-1),
        forest_start=np.array(starts, dtype=np.int64),
        forest_tree_count=np.array(counts, dtype=np.float32),
        walked=walked,
        walked_forest=np.searchsorted(starts, walked, side="right").astype(np.int64) - 1,
        total_tree_count=np.float32(sum(counts)),
        combine=bool(combine),
        votes=votes,
    )


# --------------------------------------------------------------------------------------------
# Prediction (numba). Pixels are processed in blocks of LANES; a block's features are first
# transposed to column-major (``xt[column * LANES + lane]``) so that one column of 8 pixels is
# one SIMD load. Index arithmetic is unsigned where it is hot: numba adds negative-index
# wrap-around code to signed indices.
# --------------------------------------------------------------------------------------------

# Pixels per block: 32 keeps a block's transposed features (160 columns: 20 KiB) in the L1 cache
# beside the stream of QuickScorer entries (12 bytes each, about 16 KiB for 100 trees) and
# spreads each entry's loads over four 8-wide SIMD groups (measured faster than 16 pixels).
LANES = 32
_SIMD = 8
_ENTRY = 3  # uint32 words per QuickScorer entry in FlatForest.qs_entries
_U = np.uint64


def _arrays_are(args, dtypes) -> bool:
    """Typing guard of the intrinsics below: 1-D C-contiguous arrays of the given dtypes."""
    return all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == d
        for a, d in zip(args, dtypes, strict=True)
    )


@intrinsic
def _cttz32(typingctx, value):
    """Count trailing zero bits of a uint32 (32 for 0)."""
    sig = types.uint32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


class _Emitter:
    """LLVM IR helpers shared by the QuickScorer intrinsics (8-lane int32/float vectors)."""

    def __init__(self, builder):
        self.builder = builder
        self.i32, self.i64 = ir.IntType(32), ir.IntType(64)
        self.fvec = ir.VectorType(ir.FloatType(), _SIMD)
        self.ivec = ir.VectorType(self.i32, _SIMD)
        self.ones = ir.Constant(self.ivec, [0xFFFFFFFF] * _SIMD)
        self.zeros = ir.Constant(self.ivec, [0] * _SIMD)

    def splat(self, value, vec_type):
        b = self.builder
        undef = ir.Constant(vec_type, ir.Undefined)
        return b.shuffle_vector(b.insert_element(undef, value, self.i32(0)), undef, self.zeros)

    def at(self, ptr, index):
        """``ptr[index]`` (a scalar load)."""
        return self.builder.load(self.builder.gep(ptr, [index]))

    def vec_ptr(self, ptr, index, vec_type):
        return self.builder.bitcast(self.builder.gep(ptr, [index]), vec_type.as_pointer())

    def slot_masks(self, slot, xt_p, start_p, entry_p):
        """The leaf masks of one slot, LANES // _SIMD vectors: start from all ones and, for each
        of the slot's entries, keep only its mask in the lanes that go right (not below the
        threshold, NaN included)."""
        b, i64 = self.builder, self.i64
        keep = [cgutils.alloca_once(b, self.ivec) for _ in range(LANES // _SIMD)]
        for acc in keep:
            b.store(self.ones, acc)
        e0 = self.at(start_p, slot)
        e1 = self.at(start_p, b.add(slot, i64(1)))
        float_p = ir.FloatType().as_pointer()
        with cgutils.for_range(b, e1, start=e0) as entry_loop:
            entry = b.gep(entry_p, [b.mul(entry_loop.index, i64(_ENTRY))])
            base = b.zext(b.load(entry), i64)
            # threshold and mask as float loads, so that each is one broadcast from memory
            thr = self.splat(b.load(b.bitcast(b.gep(entry, [i64(1)]), float_p)), self.fvec)
            mask = self.splat(b.load(b.bitcast(b.gep(entry, [i64(2)]), float_p)), self.fvec)
            mask = b.bitcast(mask, self.ivec)
            for g, acc in enumerate(keep):
                x = b.load(self.vec_ptr(xt_p, b.add(base, i64(g * _SIMD)), self.fvec), align=4)
                left = b.sext(b.fcmp_ordered("<", x, thr), self.ivec)
                b.store(b.and_(b.load(acc), b.or_(left, mask)), acc)
        return [b.load(acc) for acc in keep]


def _data_pointers(context, builder, signature, args, which):
    """Data pointers of the array arguments at positions ``which``."""
    return [context.make_array(signature.args[i])(context, builder, args[i]).data for i in which]


def _length(context, builder, array_type, array):
    """Length of a 1-D array argument (int64)."""
    shape = context.make_array(array_type)(context, builder, array).shape
    return cgutils.unpack_tuple(builder, shape, 1)[0]


@intrinsic
def _quickscorer(typingctx, xt, bits, slot_start, entries):
    """QuickScorer over a block: ``bits[slot * LANES + lane]`` for every slot and pixel.

    Feature ``j`` of the block's pixel ``lane`` is ``xt[j * LANES + lane]``; ``slot_start`` and
    ``entries`` are :class:`FlatForest`'s ``qs_slot_start`` and ``qs_entries``. Written as LLVM
    vector IR because numba's loops over the lanes are not vectorised.
    """
    args = (xt, bits, slot_start, entries)
    if not _arrays_are(args, (types.float32, types.uint32, types.int64, types.uint32)):
        return None
    sig = types.void(*args)

    def codegen(context, builder, signature, args):
        xt_p, bits_p, *qs = _data_pointers(context, builder, signature, args, (0, 1, 2, 3))
        em = _Emitter(builder)
        n_slots = builder.sub(_length(context, builder, signature.args[2], args[2]), em.i64(1))
        with cgutils.for_range(builder, n_slots) as slot_loop:
            slot = slot_loop.index
            words = em.slot_masks(slot, xt_p, *qs)
            out = builder.mul(slot, em.i64(LANES))
            for g, word in enumerate(words):
                ptr = em.vec_ptr(bits_p, builder.add(out, em.i64(g * _SIMD)), em.ivec)
                builder.store(word, ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _qs_votes(typingctx, xt, counts, tree_slot_start, forest_start, slot_start, entries,
              vote_mask, n_classes):
    """Vote counts of the QuickScorer trees of each forest over a block.

    ``counts[(f * (K - 1) + c) * LANES + lane]`` = number of forest ``f``'s QuickScorer trees
    whose leaf for pixel ``lane`` votes for class ``c < K - 1`` (``K = n_classes``; the last
    class gets the remaining votes). A tree's leaf is the lowest bit left in its masks (see
    :func:`_quickscorer`); isolated as ``b & -b``, it is tested against the tree's
    ``vote_mask`` of each class, all in vector registers. Walked trees are left out.
    """
    args = (xt, counts, tree_slot_start, forest_start, slot_start, entries, vote_mask)
    dtypes = (types.float32, types.int32, types.int64, types.int64, types.int64, types.uint32,
              types.uint32)
    if not _arrays_are(args, dtypes) or not isinstance(n_classes, types.Integer):
        return None
    sig = types.void(*args, types.int64)

    def codegen(context, builder, signature, args):
        b = builder
        n_classes = args[7]
        xt_p, counts_p, tree_p, forest_p, *qs, vote_p = _data_pointers(
            context, builder, signature, args, range(7))
        em = _Emitter(b)
        i64 = em.i64
        groups = LANES // _SIMD
        n_test = b.sub(n_classes, i64(1))
        n_forests = b.sub(_length(context, b, signature.args[3], args[3]), i64(1))

        def count_ptr(f, c, g):
            index = b.add(b.mul(b.add(b.mul(f, n_test), c), i64(LANES)), i64(g * _SIMD))
            return em.vec_ptr(counts_p, index, em.ivec)

        def count(f, slot, lsb):
            """Add the votes of one slot's isolated leaf bits to forest ``f``'s counts."""
            with cgutils.for_range(b, n_test) as class_loop:
                c = class_loop.index
                cm = em.splat(em.at(vote_p, b.add(b.mul(slot, n_classes), c)), em.ivec)
                for g in range(groups):
                    ptr = count_ptr(f, c, g)
                    hit = b.sext(b.icmp_unsigned("!=", b.and_(lsb[g], cm), em.zeros), em.ivec)
                    b.store(b.sub(b.load(ptr, align=4), hit), ptr, align=4)  # hit is -1

        with cgutils.for_range(b, n_forests) as forest_loop:
            f = forest_loop.index
            with cgutils.for_range(b, n_test) as class_loop:
                for g in range(groups):
                    b.store(em.zeros, count_ptr(f, class_loop.index, g), align=4)
            t0 = em.at(forest_p, f)
            t1 = em.at(forest_p, b.add(f, i64(1)))
            with cgutils.for_range(b, t1, start=t0) as tree_loop:
                t = tree_loop.index
                s0 = em.at(tree_p, t)
                s1 = em.at(tree_p, b.add(t, i64(1)))
                with b.if_else(b.icmp_signed("==", s1, b.add(s0, i64(1)))) as (single, other):
                    with single:  # the usual case: up to 32 leaves
                        words = em.slot_masks(s0, xt_p, *qs)
                        count(f, s0, [b.and_(w, b.sub(em.zeros, w)) for w in words])
                    with other:  # several slots: the lowest bit of the first nonzero word
                        found = [cgutils.alloca_once_value(b, em.zeros) for _ in range(groups)]
                        with cgutils.for_range(b, s1, start=s0) as slot_loop:
                            slot = slot_loop.index
                            words = em.slot_masks(slot, xt_p, *qs)
                            lsb = []
                            for w, seen in zip(words, found, strict=True):
                                old = b.load(seen)
                                lsb.append(b.and_(b.and_(w, b.sub(em.zeros, w)), b.not_(old)))
                                nonzero = b.sext(b.icmp_unsigned("!=", w, em.zeros), em.ivec)
                                b.store(b.or_(old, nonzero), seen)
                            count(f, slot, lsb)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _vote_probs(typingctx, counts, forest_start, res, n_classes, combine, total):
    """Probabilities from vote counts: ``res[c * LANES + lane]`` for every class ``c < K``.

    Per forest ``f`` with ``T`` trees, ``p = f32(n) / f32(T)`` for a class voted ``n`` times
    (vigra's normalisation; the last class gets ``T`` minus the others' votes); with
    ``combine`` (lazyflow) the forests' ``p * f32(T)`` are summed in float32 in forest order and
    divided by ``total``, else the one forest's ``p`` is used as it is. Exact IEEE float32
    arithmetic in vector registers, so the result equals vigra's float sums of pure leaves.
    """
    if not _arrays_are((counts, forest_start, res), (types.int32, types.int64, types.float32)):
        return None
    if not isinstance(n_classes, types.Integer) or not isinstance(combine, types.Boolean):
        return None
    sig = types.void(counts, forest_start, res, types.int64, types.boolean, types.float32)

    def codegen(context, builder, signature, args):
        b = builder
        counts_p, forest_p, res_p = _data_pointers(context, b, signature, args, (0, 1, 2))
        n_classes, combine, total = args[3], args[4], args[5]
        em = _Emitter(b)
        i64 = em.i64
        n_test = b.sub(n_classes, i64(1))
        n_forests = b.sub(_length(context, b, signature.args[1], args[1]), i64(1))
        rest = [cgutils.alloca_once(b, em.ivec) for _ in range(LANES // _SIMD)]

        def res_ptr(c, g):
            return em.vec_ptr(res_p, b.add(b.mul(c, i64(LANES)), i64(g * _SIMD)), em.fvec)

        with cgutils.for_range(b, n_forests) as forest_loop:
            f = forest_loop.index
            trees = b.sub(em.at(forest_p, b.add(f, i64(1))), em.at(forest_p, f))
            trees_i = em.splat(b.trunc(trees, em.i32), em.ivec)
            trees_f = em.splat(b.sitofp(trees, ir.FloatType()), em.fvec)
            for acc in rest:
                b.store(trees_i, acc)
            first = b.icmp_signed("==", f, i64(0))
            with cgutils.for_range(b, n_classes) as class_loop:
                c = class_loop.index
                tested = b.icmp_signed("<", c, n_test)
                for g, acc in enumerate(rest):
                    index = b.add(b.mul(b.add(b.mul(f, n_test), c), i64(LANES)), i64(g * _SIMD))
                    # the last class's slot may lie outside counts: load it only when tested
                    votes = cgutils.alloca_once_value(b, b.load(acc))
                    with b.if_then(tested):
                        b.store(b.load(em.vec_ptr(counts_p, index, em.ivec), align=4), votes)
                    n = b.load(votes)
                    b.store(b.sub(b.load(acc), n), acc)
                    p = b.fdiv(b.sitofp(n, em.fvec), trees_f)
                    p = b.select(combine, b.fmul(p, trees_f), p)
                    ptr = res_ptr(c, g)
                    b.store(b.select(first, p, b.fadd(b.load(ptr, align=4), p)), ptr, align=4)
        with b.if_then(combine):
            all_total = em.splat(total, em.fvec)
            with cgutils.for_range(b, n_classes) as class_loop:
                for g in range(LANES // _SIMD):
                    ptr = res_ptr(class_loop.index, g)
                    b.store(b.fdiv(b.load(ptr, align=4), all_total), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _single_slot_leaves(typingctx, bits, leaf, slot_start, leaf_start):
    """``leaf[t * LANES + lane] = leaf_start[t] + cttz(bits[slot * LANES + lane])`` for every
    tree ``t`` with exactly one slot (the others are left alone), 8 lanes per instruction."""
    args = (bits, leaf, slot_start, leaf_start)
    if not _arrays_are(args, (types.uint32, types.uint32, types.int64, types.int64)):
        return None
    sig = types.void(*args)

    def codegen(context, builder, signature, args):
        bits_p, leaf_p, start_p, first_p = (
            context.make_array(ty)(context, builder, val).data
            for ty, val in zip(signature.args, args, strict=True)
        )
        shape = context.make_array(signature.args[3])(context, builder, args[3]).shape
        n_trees = cgutils.unpack_tuple(builder, shape, 1)[0]
        i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
        ivec = ir.VectorType(i32, _SIMD)
        cttz = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ivec, [ivec, i1]), f"llvm.cttz.v{_SIMD}i32"
        )
        lane0 = ir.Constant(ivec, [0] * _SIMD)
        with cgutils.for_range(builder, n_trees) as tree_loop:
            t = tree_loop.index
            s0 = builder.load(builder.gep(start_p, [t]))
            s1 = builder.load(builder.gep(start_p, [builder.add(t, i64(1))]))
            with builder.if_then(builder.icmp_signed("==", s1, builder.add(s0, i64(1)))):
                first = builder.trunc(builder.load(builder.gep(first_p, [t])), i32)
                undef = ir.Constant(ivec, ir.Undefined)
                first = builder.shuffle_vector(builder.insert_element(undef, first, i32(0)),
                                               undef, lane0)
                src, dst = builder.mul(s0, i64(LANES)), builder.mul(t, i64(LANES))
                for g in range(LANES // _SIMD):
                    ptr = builder.gep(bits_p, [builder.add(src, i64(g * _SIMD))])
                    v = builder.load(builder.bitcast(ptr, ivec.as_pointer()), align=4)
                    index = builder.add(first, builder.call(cttz, [v, ir.Constant(i1, 0)]))
                    ptr = builder.gep(leaf_p, [builder.add(dst, i64(g * _SIMD))])
                    builder.store(index, builder.bitcast(ptr, ivec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_block(typingctx, flat, x0, width, n_feat, xt, nan):
    """``xt[j * LANES + lane] = flat[j * width + x0 + lane]`` for j < n_feat, lane < LANES, and
    ``nan[lane]`` = -1 where pixel ``lane`` has a NaN feature (else 0).

    Vector loads and stores (numba leaves this loop scalar); the loads of all features are
    independent, so the CPU fetches a block's features from the cache in parallel rather than
    one at a time inside the forest's dependent loop.
    """
    if not _arrays_are((flat, xt, nan), (types.float32, types.float32, types.int32)):
        return None
    sig = types.void(flat, types.int64, types.int64, types.int64, xt, nan)

    def codegen(context, builder, signature, args):
        b = builder
        src, dst, nan_p = _data_pointers(context, b, signature, args, (0, 4, 5))
        x0, width, n = args[1], args[2], args[3]
        em = _Emitter(b)
        bad = [cgutils.alloca_once_value(b, em.zeros) for _ in range(LANES // _SIMD)]
        with cgutils.for_range(b, n) as loop:
            j = loop.index
            row = b.add(b.mul(j, width), x0)
            out = b.mul(j, em.i64(LANES))
            for g, acc in enumerate(bad):
                v = b.load(em.vec_ptr(src, b.add(row, em.i64(g * _SIMD)), em.fvec), align=4)
                b.store(v, em.vec_ptr(dst, b.add(out, em.i64(g * _SIMD)), em.fvec), align=4)
                is_nan = b.sext(b.fcmp_unordered("uno", v, v), em.ivec)
                b.store(b.or_(b.load(acc), is_nan), acc)
        for g, acc in enumerate(bad):
            b.store(b.load(acc), em.vec_ptr(nan_p, em.i64(g * _SIMD), em.ivec), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _load_block(x, lo, m, n_feat, width, xt, nan):
    """Pixels ``lo .. lo + m`` (m <= LANES) into ``xt[feature * LANES + lane]``, padded with
    zeros; ``nan[lane]`` = -1 for pixels with a NaN feature and for padding lanes, else 0.

    ``x`` is flat: an (N, n_feat) matrix (``width`` 0) or an (n_feat, width) image row.
    """
    for lane in range(LANES):
        bad = lane >= m
        for j in range(n_feat):
            if lane >= m:
                v = np.float32(0.0)
            elif width:
                v = x[_U(j) * _U(width) + _U(lo + lane)]
            else:
                v = x[_U(lo + lane) * _U(n_feat) + _U(j)]
            bad |= np.isnan(v)
            xt[_U(j) * _U(LANES) + _U(lane)] = v
        nan[lane] = -1 if bad else 0


@numba.njit(cache=True, nogil=True, inline="always")
def _qs_leaf(bits, s0, s1, lane):
    """Index (within its tree) of the leftmost leaf left in slots s0..s1-1 for one lane."""
    s = s0
    while s + 1 < s1 and bits[_U(s) * _U(LANES) + _U(lane)] == 0:
        s += 1
    return (s - s0) * 32 + np.int64(_cttz32(bits[_U(s) * _U(LANES) + _U(lane)]))


@numba.njit(cache=True, nogil=True, inline="always")
def _walk(next_node, column, threshold, root, xt, offset, stride, lane):
    """Leaf node reached from ``root`` by one lane, walking the tree node by node."""
    k = _U(root)
    while _U(next_node[_U(2) * k]) != k:
        go_left = xt[_U(column[k]) * _U(stride) + _U(offset) + _U(lane)] < threshold[k]
        k = _U(next_node[_U(2) * k + _U(go_left)])
    return k


@numba.njit(cache=True, nogil=True)
def _tree_leaves(ff, xt, offset, stride, bits, leaf):
    """Leaf of each lane in each tree, into ``leaf[tree * LANES + lane]``.

    Walked trees (no slots) give a node index (into ``leaf_*``); QuickScorer trees give a
    position in the ``qs_leaf_*`` tables.
    """
    # Unpacked once: numba reference-counts every array taken out of the named tuple.
    slot_start, leaf_start, tree_root = ff.tree_slot_start, ff.tree_leaf_start, ff.tree_root
    next_node, column, threshold = ff.next_node, ff.column, ff.threshold
    _single_slot_leaves(bits, leaf, slot_start, leaf_start)
    for t in range(tree_root.size):
        s0, s1 = slot_start[t], slot_start[t + 1]
        first = np.uint32(leaf_start[t])
        out = _U(t) * _U(LANES)
        if s1 == s0 + 1:
            continue  # done by _single_slot_leaves
        if s1 > s0:
            for lane in range(LANES):
                leaf[out + _U(lane)] = first + np.uint32(_qs_leaf(bits, s0, s1, lane))
        else:
            for lane in range(LANES):
                k = _walk(next_node, column, threshold, tree_root[t], xt, offset, stride, lane)
                leaf[out + _U(lane)] = np.uint32(k)


@numba.njit(cache=True, nogil=True)
def _walked_votes(ff, xt, counts):
    """Add the votes of the walked trees (more than :data:`QS_MAX_LEAVES` leaves) to the
    counts of :func:`_qs_votes`."""
    n_test = ff.leaf_f32.shape[1] - 1
    next_node, column, threshold, leaf_vote = ff.next_node, ff.column, ff.threshold, ff.leaf_vote
    tree_root, walked, walked_forest = ff.tree_root, ff.walked, ff.walked_forest
    for i in range(walked.size):
        root, f = tree_root[walked[i]], walked_forest[i]
        for lane in range(LANES):
            k = _walk(next_node, column, threshold, root, xt, 0, LANES, lane)
            vote, c = leaf_vote[k], 0
            while vote > 1:  # leaf_vote is 1 << 8 * class
                vote >>= _U(8)
                c += 1
            if c < n_test:
                counts[(f * n_test + c) * LANES + lane] += 1


@numba.njit(cache=True, nogil=True)
def _general_block(ff, leaf, acc, total, res):
    """Any leaves: vigra's float32 sums with a double total per forest, then lazyflow's sum."""
    n_classes = ff.leaf_f32.shape[1]
    slot_start, forest_start, tree_count = ff.tree_slot_start, ff.forest_start, ff.forest_tree_count
    combine = ff.combine
    for f in range(forest_start.size - 1):
        acc[:] = 0.0  # acc[lane * n_classes + c]
        total[:] = 0.0
        for t in range(forest_start[f], forest_start[f + 1]):
            quick = slot_start[t + 1] > slot_start[t]
            w32 = ff.qs_leaf_f32 if quick else ff.leaf_f32
            w64 = ff.qs_leaf_f64 if quick else ff.leaf_f64
            row = _U(t) * _U(LANES)
            for lane in range(LANES):
                k = _U(leaf[row + _U(lane)])
                first = _U(lane) * _U(n_classes)
                weight = total[lane]
                for c in range(n_classes):  # vigra's order: classes inside the tree loop
                    acc[first + _U(c)] += w32[k, _U(c)]
                    weight += w64[k, _U(c)]
                total[lane] = weight
        count = tree_count[f]
        for lane in range(LANES):
            norm = np.float32(total[lane])
            for c in range(n_classes):
                p = acc[lane * n_classes + c] / norm  # float32, as vigra's prob /= (float)total
                i = c * LANES + lane
                if not combine:
                    res[i] = p
                elif f == 0:
                    res[i] = p * count  # lazyflow: forest_predictions *= treeCount
                else:
                    res[i] += p * count
    if combine:
        for i in range(n_classes * LANES):
            res[i] /= ff.total_tree_count  # lazyflow: total_predictions /= num_trees (float32)


@numba.njit(cache=True, nogil=True)
def _store_block(res, nan, out_channel, lo, m, out):
    """``res[c * LANES + lane]`` into ``out[lo + lane, out_channel[c]]``; zeros elsewhere."""
    n_classes, n_out = out_channel.size, out.shape[1]
    for lane in range(m):
        row = out[lo + lane]
        if n_out > n_classes or nan[lane]:
            row[:] = np.float32(0.0)
        if nan[lane]:  # vigra: a row with any NaN feature gets all-zero probabilities
            continue
        for c in range(n_classes):
            row[_U(out_channel[c])] = res[_U(c) * _U(LANES) + _U(lane)]


@numba.njit(cache=True, nogil=True)
def _block_state(ff, n_features):
    """Scratch space of one thread for :func:`_classify_span`."""
    n_classes = ff.leaf_f32.shape[1]
    n_slots = max(ff.tree_slot_start[-1], 1)
    return (
        np.empty(n_features * LANES, dtype=np.float32),  # xt
        np.empty(LANES, dtype=np.int32),  # nan
        np.empty(n_slots * LANES, dtype=np.uint32),  # bits
        np.empty(ff.tree_root.size * LANES, dtype=np.uint32),  # leaf
        np.empty(n_classes * LANES, dtype=np.float32),  # acc
        np.empty(LANES, dtype=np.float64),  # total
        np.empty(n_classes * LANES, dtype=np.float32),  # res
        np.empty(max((ff.forest_start.size - 1) * (n_classes - 1), 1) * LANES,
                 dtype=np.int32),  # counts
    )


@numba.njit(cache=True, nogil=True)
def _classify_span(ff, out_channel, state, x, n_feat, width, lo, hi, out):
    """Probabilities of pixels ``lo .. hi`` into ``out[lo:hi]`` ((N, n_outputs) float32).

    ``x`` is flat: with ``width`` 0 an (N, n_feat) matrix, one row per pixel; else one
    (n_feat, width) row of an image, one column per pixel. Pixels go through the forests in
    blocks of LANES, each first copied to ``state``'s ``xt`` (``xt[feature * LANES + lane]``);
    pixels with a NaN feature get zeros, as in vigra. Everything the blocks share is taken out
    of the named tuples once per call: numba reference-counts each array taken out.
    """
    xt, nan, bits, leaf, acc, total, res, counts = state
    n_classes, votes, n_walked = ff.leaf_f32.shape[1], ff.votes, ff.walked.size
    combine, total_count = ff.combine, ff.total_tree_count
    tree_slot_start, forest_start = ff.tree_slot_start, ff.forest_start
    slot_start, entries, vote_mask = ff.qs_slot_start, ff.qs_entries, ff.qs_vote_mask
    for x0 in range(lo, hi, LANES):
        m = min(LANES, hi - x0)
        if m == LANES and width:
            _copy_block(x, x0, width, n_feat, xt, nan)
        else:
            _load_block(x, x0, m, n_feat, width, xt, nan)
        if votes:
            _qs_votes(xt, counts, tree_slot_start, forest_start, slot_start, entries, vote_mask,
                      n_classes)
            if n_walked:
                _walked_votes(ff, xt, counts)
            _vote_probs(counts, forest_start, res, n_classes, combine, total_count)
        else:
            _quickscorer(xt, bits, slot_start, entries)
            _tree_leaves(ff, xt, 0, LANES, bits, leaf)
            _general_block(ff, leaf, acc, total, res)
        _store_block(res, nan, out_channel, x0, m, out)


@numba.njit(cache=True, parallel=True, nogil=True)
def _predict_kernel(x, ff, out_channel, out, n_threads):
    n, n_features = x.shape
    n_blocks = (n + LANES - 1) // LANES
    # Contiguous runs of blocks per work item, so scratch space is allocated once per run.
    n_runs = min(n_blocks, 8 * n_threads)
    flat = x.reshape(-1)
    for r in numba.prange(n_runs):
        state = _block_state(ff, n_features)
        lo = r * n_blocks // n_runs * LANES
        hi = min(n, (r + 1) * n_blocks // n_runs * LANES)
        _classify_span(ff, out_channel, state, flat, n_features, 0, lo, hi, out)


def predict_proba(classifier: Classifier, features: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities of each pixel, bit-identical to ilastik 1.3.3 (vigra 1.11.1).

    Per forest, leaf weights are summed over the trees in float32 with a float64 total and
    divided; the forests are then combined as lazyflow does (weighted by tree count, summed in
    ``ForestNNNN`` order in float32, divided by the total tree count). Rows containing a NaN
    get zeros. Classifier column ``i`` goes to output channel ``known_labels[i] - 1``; channels
    of labels without a trained column are 0. Runs on ``numba.get_num_threads()`` threads.

    Parameters
    ----------
    classifier : Classifier
        From :func:`load_classifier`.
    features : (N, F) float32 ndarray
        One row per pixel, columns in the order of ``classifier.feature_names``.
    out : (N, n_outputs) float32 ndarray, optional
        C-contiguous array to write into.

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
        _predict_kernel(features, classifier.flat, classifier.output_channels, out,
                        numba.get_num_threads())
    return out
