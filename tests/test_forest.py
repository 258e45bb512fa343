"""The random forest reader and predictor against a plain re-implementation of spec §3.

Synthetic vigra forests are written as HDF5 groups, exactly in the layout ilastik stores them,
and ``predict_proba`` must agree bit for bit with a row-by-row reference written from the spec.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from steinpix.errors import SteinpixError
from steinpix.forest import (
    PARALLEL_TYPE,
    load_classifier,
    predict_proba,
    round_up_to_float32,
    supports_project,
)

from conftest import EXAMPLE

PROJECT = EXAMPLE / "pretrained.ilp"
LEAF, SPLIT = 0x40000000, 0
PARALLEL_PICKLE = (
    b"clazyflow.classifiers.parallelVigraRfLazyflowClassifier\n"
    b"ParallelVigraRfLazyflowClassifier\np0\n."
)
SINGLE_PICKLE = b"clazyflow.classifiers.vigraRfLazyflowClassifier\nVigraRfLazyflowClassifier\np0\n."


# ---------------------------------------------------------------------------------------------
# Building synthetic forests
# ---------------------------------------------------------------------------------------------


def random_tree(rng, n_features, n_classes, n_leaves, pure=False, values=None):
    """A random tree as nested tuples: ("leaf", weight, probs) or ("split", col, thr, l, r)."""
    if n_leaves == 1:
        if pure:
            probs = np.zeros(n_classes)
            probs[rng.integers(n_classes)] = 1.0
        else:
            counts = rng.integers(0, 5, n_classes).astype(float)
            counts[rng.integers(n_classes)] += 1
            probs = counts / counts.sum()  # vigra: normalised class histogram
        return ("leaf", float(rng.integers(1, 20)), probs)
    n_left = int(rng.integers(1, n_leaves))
    column = int(rng.integers(n_features))
    if values is not None and rng.random() < 0.5:
        # midpoint of two sample values, as vigra computes thresholds (often not a float32)
        a, b = rng.choice(values[:, column], 2)
        threshold = (float(a) + float(b)) / 2
    else:
        threshold = float(rng.normal())
    return (
        "split",
        column,
        threshold,
        random_tree(rng, n_features, n_classes, n_left, pure, values),
        random_tree(rng, n_features, n_classes, n_leaves - n_left, pure, values),
    )


def encode_tree(tree, n_features, n_classes):
    """vigra's HDF5 arrays of a tree: topology (nodes from index 2, absolute child links)."""
    topology = [n_features, n_classes]
    parameters: list[float] = []

    def emit(node):
        pos = len(topology)
        if node[0] == "leaf":
            topology.extend([LEAF, len(parameters)])
            parameters.extend([node[1], *node[2]])
            return pos
        topology.extend([SPLIT, len(parameters), -1, -1, node[1]])
        parameters.extend([1.0, node[2]])
        topology[pos + 2] = emit(node[3])
        topology[pos + 3] = emit(node[4])
        return pos

    emit(tree)
    return np.array(topology, dtype=np.int32), np.array(parameters, dtype=np.float64)


def write_forest(group, trees, n_features, n_classes, weighted=False, labels=None):
    group.attrs["vigra_random_forest_version"] = np.array([0.1])
    ext = group.create_group("_ext_param")
    ext["column_count_"] = np.array([float(n_features)])
    ext["class_count_"] = np.array([float(n_classes)])
    ext["labels"] = np.array(labels or range(1, n_classes + 1), dtype=np.uint32)
    ext["class_weights_"] = np.ones(n_classes)
    options = group.create_group("_options")
    options["tree_count_"] = np.array([float(len(trees))])
    options["predict_weighted_"] = np.array([1.0 if weighted else 0.0])
    for i, tree in enumerate(trees):
        topology, parameters = encode_tree(tree, n_features, n_classes)
        g = group.create_group(f"Tree_{i:02d}" if len(trees) <= 100 else f"Tree_{i:03d}")
        g["topology"] = topology
        g["parameters"] = parameters


def write_project(path: Path, forests, n_features, n_classes, *, weighted=False,
                  known_labels=None, n_label_names=None, pickled=PARALLEL_PICKLE,
                  feature_names=True):
    """An .ilp with just what prediction reads; ``forests`` is a list of tree lists."""
    with h5py.File(path, "w") as h5:
        names = [f"L{i}".encode() for i in range(n_label_names or n_classes)]
        h5["PixelClassification/LabelNames"] = names
        group = h5.create_group("PixelClassification/ClassifierForests")
        group["pickled_type"] = pickled
        if known_labels is not False:
            group["known_labels"] = np.array(
                known_labels or range(1, n_classes + 1), dtype=np.uint32
            )
        if feature_names:
            group["feature_names"] = [f"feature {i}".encode() for i in range(n_features)]
        if pickled == SINGLE_PICKLE:
            write_forest(group.create_group("forest"), forests[0], n_features, n_classes, weighted)
        else:
            for i, trees in enumerate(forests):
                write_forest(group.create_group(f"Forest{i:04d}"), trees, n_features, n_classes,
                             weighted)
    return path


def random_features(rng, n, n_features, forests=None):
    """Features with exact threshold hits, float32 neighbours of thresholds, NaN and inf."""
    x = (rng.normal(size=(n, n_features)) * 1.5).astype(np.float32)
    thresholds = []
    for trees in forests or []:
        for tree in trees:
            stack = [tree]
            while stack:
                node = stack.pop()
                if node[0] == "split":
                    thresholds.append((node[1], node[2]))
                    stack += [node[3], node[4]]
    for i, (column, t) in enumerate(thresholds[: n // 3]):
        t32 = np.float32(t)
        choice = [t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-1e9))]
        x[i, column] = choice[i % 3]
    x[n - 1, 0] = np.nan
    x[n - 2, :] = np.inf
    x[n - 3, :] = -np.inf
    x[n - 4, n_features - 1] = np.nan
    return x


# ---------------------------------------------------------------------------------------------
# Reference: spec §3.2-3.4, one row at a time, straight from the HDF5 arrays
# ---------------------------------------------------------------------------------------------


def reference_predict(ilp: Path, x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    with h5py.File(ilp, "r") as h5:
        group = h5["PixelClassification/ClassifierForests"]
        n_out = len(h5["PixelClassification/LabelNames"])
        parallel = b"ParallelVigraRfLazyflowClassifier" in group["pickled_type"][()]
        names = sorted(k for k in group if k.startswith("Forest")) if parallel else ["forest"]
        forests = []
        for name in names:
            g = group[name]
            n_trees = int(g["_options/tree_count_"][0])
            weighted = g["_options/predict_weighted_"][0]
            k = int(g["_ext_param/class_count_"][0])
            trees = [(g[t]["topology"][()], g[t]["parameters"][()])
                     for t in sorted(t for t in g if not t.startswith("_"))][:n_trees]
            forests.append((trees, weighted, k))
        if "known_labels" in group:
            known = list(group["known_labels"][()])
        else:
            known = list(range(1, forests[0][2] + 1))
    out = np.zeros((len(x), n_out), dtype=np.float32)
    for r, row in enumerate(x):
        if np.isnan(row).any():
            continue
        total = [f32(0)] * len(known)
        for trees, weighted, k in forests:
            acc, weight_sum = [f32(0)] * k, 0.0
            for topology, parameters in trees:
                i = 2
                while topology[i] == SPLIT:
                    p = topology[i + 1]
                    go_left = float(row[topology[i + 4]]) < parameters[p + 1]
                    i = topology[i + 2] if go_left else topology[i + 3]
                p = topology[i + 1]
                for c in range(k):
                    w = parameters[p + 1 + c] * (weighted * parameters[p] + (1 - weighted))
                    acc[c] = f32(acc[c] + f32(w))
                    weight_sum += w
            prob = [f32(a / f32(weight_sum)) for a in acc]
            if not parallel:
                total = prob
            else:
                weight = f32(len(trees))
                total = [f32(t + f32(q * weight)) for t, q in zip(total, prob, strict=True)]
        if parallel:
            n_all = f32(sum(len(trees) for trees, _, _ in forests))
            total = [f32(t / n_all) for t in total]
        for c, label in enumerate(known):
            out[r, label - 1] = total[c]
    return out


def make_forests(rng, n_forests, trees_per_forest, n_features, n_classes, leaves=(2, 30),
                 pure=False, values=None):
    return [
        [random_tree(rng, n_features, n_classes, int(rng.integers(*leaves)), pure, values)
         for _ in range(trees_per_forest[f % len(trees_per_forest)])]
        for f in range(n_forests)
    ]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_impure_leaves_match_reference(tmp_path, weighted):
    rng = np.random.default_rng(1 + weighted)
    n_features, n_classes = 7, 3
    values = rng.normal(size=(50, n_features)).astype(np.float32) * 1.5
    forests = make_forests(rng, 3, [5, 4], n_features, n_classes, values=values)
    ilp = write_project(tmp_path / "p.ilp", forests, n_features, n_classes, weighted=weighted)
    classifier = load_classifier(ilp)
    assert not classifier.flat.votes
    x = random_features(rng, 500, n_features, forests)
    got = predict_proba(classifier, x)
    want = reference_predict(ilp, x)
    assert got.dtype == np.float32 and got.shape == (500, n_classes)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[-1] == 0) and np.all(got[-4] == 0)  # rows with NaN
    assert np.all(got[-2] > -1)  # +inf rows are classified, not zeroed


def test_pure_leaves_use_vote_counts_and_match_reference(tmp_path):
    rng = np.random.default_rng(3)
    n_features, n_classes = 6, 4
    forests = make_forests(rng, 8, [13, 13, 12], n_features, n_classes, pure=True)
    ilp = write_project(tmp_path / "p.ilp", forests, n_features, n_classes)
    classifier = load_classifier(ilp)
    assert classifier.flat.votes
    x = random_features(rng, 700, n_features, forests)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))


def test_large_trees_are_walked_and_medium_trees_use_two_slots(tmp_path):
    rng = np.random.default_rng(4)
    n_features, n_classes = 5, 2
    forests = [
        [random_tree(rng, n_features, n_classes, n) for n in (40, 150, 3, 64, 65, 1)],
        [random_tree(rng, n_features, n_classes, n, pure=True) for n in (33, 200)],
    ]
    ilp = write_project(tmp_path / "p.ilp", forests, n_features, n_classes)
    classifier = load_classifier(ilp)
    slots = np.diff(classifier.flat.tree_slot_start)
    assert list(slots) == [2, 0, 1, 2, 0, 1, 2, 0]
    x = random_features(rng, 600, n_features, forests)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))


@pytest.mark.parametrize("n_classes", [1, 2, 3, 8])
@pytest.mark.parametrize("pickled", [PARALLEL_PICKLE, SINGLE_PICKLE])
def test_vote_counting_with_walked_and_two_slot_trees_matches_reference(tmp_path, n_classes,
                                                                         pickled):
    rng = np.random.default_rng(20 + n_classes)
    n_features = 6
    sizes = [[1, 3, 33, 64, 65, 200, 17], [32, 2, 150], [5] * 12]
    if pickled == SINGLE_PICKLE:
        sizes = sizes[:1]
    values = rng.normal(size=(50, n_features)).astype(np.float32) * 1.5
    forests = [[random_tree(rng, n_features, n_classes, n, pure=True, values=values) for n in s]
               for s in sizes]
    ilp = write_project(tmp_path / "p.ilp", forests, n_features, n_classes, pickled=pickled)
    classifier = load_classifier(ilp)
    assert classifier.flat.votes
    slots = [1 if n <= 32 else 2 if n <= 64 else 0 for s in sizes for n in s]
    assert list(np.diff(classifier.flat.tree_slot_start)) == slots
    x = random_features(rng, 1007, n_features, forests)  # not a whole number of blocks
    x[5:40:7, 2] = np.nan
    got = predict_proba(classifier, x)
    np.testing.assert_array_equal(got, reference_predict(ilp, x))
    assert np.all(got[5:40:7] == 0)


def test_votes_disabled_beyond_255_trees_or_8_classes(tmp_path):
    rng = np.random.default_rng(5)
    stumps = [[random_tree(rng, 3, 2, 2, pure=True) for _ in range(256)]]
    ilp = write_project(tmp_path / "a.ilp", stumps, 3, 2)
    classifier = load_classifier(ilp)
    assert not classifier.flat.votes
    x = random_features(rng, 100, 3, stumps)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))

    # a leaf without any vote (all-zero probabilities) changes vigra's total weight
    zero_leaf = ("split", 0, 0.25, ("leaf", 3.0, np.zeros(2)), ("leaf", 2.0, np.array([0.0, 1.0])))
    forests = [[zero_leaf] + [random_tree(rng, 3, 2, 4, pure=True) for _ in range(5)]]
    ilp = write_project(tmp_path / "z.ilp", forests, 3, 2)
    classifier = load_classifier(ilp)
    assert not classifier.flat.votes
    x = random_features(rng, 100, 3, forests)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))

    many = make_forests(rng, 2, [6], 3, 9, pure=True)
    ilp = write_project(tmp_path / "b.ilp", many, 3, 9)
    classifier = load_classifier(ilp)
    assert not classifier.flat.votes
    x = random_features(rng, 100, 3, many)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))


def test_known_labels_subset_maps_channels_and_zeros_the_rest(tmp_path):
    rng = np.random.default_rng(6)
    forests = make_forests(rng, 2, [4], 4, 2)
    ilp = write_project(tmp_path / "p.ilp", forests, 4, 2, known_labels=[3, 1], n_label_names=4)
    classifier = load_classifier(ilp)
    assert classifier.known_labels == (3, 1) and classifier.n_outputs == 4
    x = random_features(rng, 200, 4, forests)
    got = predict_proba(classifier, x)
    assert got.shape == (200, 4)
    assert np.all(got[:, 1] == 0) and np.all(got[:, 3] == 0)
    np.testing.assert_array_equal(got, reference_predict(ilp, x))


def test_missing_known_labels_default_to_one_to_k(tmp_path):
    rng = np.random.default_rng(7)
    forests = make_forests(rng, 1, [3], 3, 3)
    ilp = write_project(tmp_path / "p.ilp", forests, 3, 3, known_labels=False,
                        feature_names=False)
    classifier = load_classifier(ilp)
    assert classifier.known_labels == (1, 2, 3)
    assert classifier.feature_names is None
    x = random_features(rng, 50, 3, forests)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))


def test_single_forest_classifier_is_not_reweighted(tmp_path):
    rng = np.random.default_rng(8)
    forests = make_forests(rng, 1, [7], 5, 3)
    ilp = write_project(tmp_path / "p.ilp", forests, 5, 3, pickled=SINGLE_PICKLE)
    classifier = load_classifier(ilp)
    assert classifier.classifier_type == "VigraRfLazyflowClassifier"
    assert not classifier.flat.combine
    x = random_features(rng, 300, 5, forests)
    np.testing.assert_array_equal(predict_proba(classifier, x), reference_predict(ilp, x))


def test_out_argument_and_empty_input(tmp_path):
    rng = np.random.default_rng(9)
    forests = make_forests(rng, 2, [3], 3, 2)
    classifier = load_classifier(write_project(tmp_path / "p.ilp", forests, 3, 2))
    x = random_features(rng, 37, 3, forests)
    out = np.full((37, 2), 7, dtype=np.float32)
    assert predict_proba(classifier, x, out=out) is out
    np.testing.assert_array_equal(out, predict_proba(classifier, x.astype(np.float64)))
    assert predict_proba(classifier, x[:0]).shape == (0, 2)
    with pytest.raises(ValueError, match="shape"):
        predict_proba(classifier, x[:, :2])


def test_unknown_node_type_is_rejected(tmp_path):
    rng = np.random.default_rng(10)
    forests = make_forests(rng, 1, [2], 3, 2, leaves=(3, 4))
    ilp = write_project(tmp_path / "p.ilp", forests, 3, 2)
    with h5py.File(ilp, "a") as h5:
        topology = h5["PixelClassification/ClassifierForests/Forest0000/Tree_01/topology"]
        data = topology[()]
        data[2] = 1  # the root becomes a hyperplane split
        topology[...] = data
    with pytest.raises(SteinpixError, match="hyperplane") as info:
        load_classifier(ilp)
    assert str(ilp) in str(info.value) and "--engine ilastik" in str(info.value)


def test_other_classifier_type_is_rejected(tmp_path):
    rng = np.random.default_rng(11)
    ilp = write_project(
        tmp_path / "p.ilp", make_forests(rng, 1, [2], 3, 2), 3, 2,
        pickled=b"clazyflow.classifiers.sklearnLazyflowClassifier\nSklearnLazyflowClassifier\np0\n.",
    )
    with pytest.raises(SteinpixError, match="SklearnLazyflowClassifier") as info:
        load_classifier(ilp)
    assert str(ilp) in str(info.value) and "--engine ilastik" in str(info.value)
    ok, reason = supports_project(ilp)
    assert not ok and "SklearnLazyflowClassifier" in reason


def test_project_without_classifier_is_rejected(tmp_path):
    ilp = tmp_path / "untrained.ilp"
    with h5py.File(ilp, "w") as h5:
        h5["PixelClassification/LabelNames"] = [b"a", b"b"]
    with pytest.raises(SteinpixError, match="no trained classifier") as info:
        load_classifier(ilp)
    assert str(ilp) in str(info.value) and "--engine ilastik" in str(info.value)
    assert supports_project(ilp)[0] is False


def test_not_a_project(tmp_path):
    bad = tmp_path / "notes.ilp"
    bad.write_text("not hdf5")
    with pytest.raises(SteinpixError, match="not an ilastik project"):
        load_classifier(bad)
    with pytest.raises(SteinpixError, match="no such project"):
        load_classifier(tmp_path / "missing.ilp")


def test_tree_datasets_are_read_whatever_their_stored_type_and_checked(tmp_path):
    # the trees are read through h5py's low-level API (forest._read_array): other numeric
    # storage types give the same forest, a missing or non-numeric dataset is one line
    rng = np.random.default_rng(13)
    forests = make_forests(rng, 1, [3], 3, 2)
    ilp = write_project(tmp_path / "p.ilp", forests, 3, 2)
    expected = load_classifier(ilp)
    tree = "PixelClassification/ClassifierForests/Forest0000/Tree_01"
    with h5py.File(ilp, "a") as h5:
        for name, dtype in (("topology", np.float64), ("parameters", np.float32)):
            values = h5[f"{tree}/{name}"][()]
            del h5[f"{tree}/{name}"]
            h5[f"{tree}/{name}"] = values.astype(dtype)
    stored = load_classifier(ilp)
    for a, b in zip(expected.forests[0].trees, stored.forests[0].trees, strict=True):
        np.testing.assert_array_equal(a.topology, b.topology)
        assert b.topology.dtype == np.int32 and b.parameters.dtype == np.float64
    np.testing.assert_array_equal(stored.forests[0].trees[1].parameters,
                                  expected.forests[0].trees[1].parameters.astype(np.float32))
    with h5py.File(ilp, "a") as h5:
        del h5[f"{tree}/parameters"]
    with pytest.raises(SteinpixError, match=f"missing /{tree}/parameters") as info:
        load_classifier(ilp)
    assert str(ilp) in str(info.value) and "--engine ilastik" in str(info.value)
    with h5py.File(ilp, "a") as h5:
        h5[f"{tree}/parameters"] = "not numbers"
    with pytest.raises(SteinpixError, match=f"/{tree}/parameters is not numeric"):
        load_classifier(ilp)


def test_tree_count_must_match_stored_trees(tmp_path):
    rng = np.random.default_rng(12)
    ilp = write_project(tmp_path / "p.ilp", make_forests(rng, 1, [3], 3, 2), 3, 2)
    with h5py.File(ilp, "a") as h5:
        h5["PixelClassification/ClassifierForests/Forest0000/_options/tree_count_"][0] = 4.0
    with pytest.raises(SteinpixError, match="tree_count_"):
        load_classifier(ilp)


def test_round_up_to_float32_makes_float32_comparison_exact():
    f32max = float(np.finfo(np.float32).max)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    t = np.array([0.0, -0.0, 1.0, 0.1, -0.1, 1 / 3, -1 / 3, 1e-40, -1e-40, tiny / 2, -tiny / 2,
                  f32max, -f32max, f32max * 1.0000001, -f32max * 1.0000001, 1e300, -1e300,
                  np.inf, -np.inf, 16777217.0, -16777217.0, 2.5e-45, np.nan])
    x = np.array([0.0, -0.0, 1.0, -1.0, 0.1, -0.1, 1 / 3, -1 / 3, tiny, -tiny, 1e-40, -1e-40,
                  f32max, -f32max, np.inf, -np.inf, 16777216.0, 16777218.0, -16777216.0,
                  -16777218.0, 3e-45, np.nan], dtype=np.float32)
    with np.errstate(over="ignore"):
        up, down = np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))
        x = np.concatenate([x, up, down, t.astype(np.float32)])
    t32 = round_up_to_float32(t)
    assert t32.dtype == np.float32
    want = x.astype(np.float64)[:, None] < t[None, :]
    got = x[:, None] < t32[None, :]
    np.testing.assert_array_equal(got, want)


def test_real_project_loads():
    classifier = load_classifier(PROJECT)
    assert classifier.classifier_type == PARALLEL_TYPE
    assert [f.tree_count for f in classifier.forests] == [13] * 4 + [12] * 4
    assert classifier.n_features == 160 and len(classifier.feature_names) == 160
    assert classifier.feature_names[0] == "Gaussian Smoothing (σ=1.0) in 2D [0]"
    assert classifier.known_labels == (1, 2, 3)
    assert classifier.label_names == ("Nucleus", "Cytoplasm", "Background")
    assert classifier.flat.votes and classifier.flat.combine
    assert supports_project(PROJECT) == (True, "")


def test_real_project_matches_reference_on_random_rows():
    rng = np.random.default_rng(13)
    x = (rng.normal(size=(300, 160)) * rng.uniform(0, 40, 160)).astype(np.float32)
    x[7, 11] = np.nan
    np.testing.assert_array_equal(predict_proba(load_classifier(PROJECT), x),
                                  reference_predict(PROJECT, x))


def test_supports_project_checks_the_feature_selection(tmp_path):
    rng = np.random.default_rng(14)
    ilp = write_project(tmp_path / "p.ilp", make_forests(rng, 1, [2], 3, 2), 3, 2)
    ok, reason = supports_project(ilp)
    assert not ok and "no feature selection" in reason and str(ilp) in reason

    changed = tmp_path / "changed.ilp"
    changed.write_bytes(PROJECT.read_bytes())
    with h5py.File(changed, "a") as h5:
        matrix = h5["FeatureSelections/SelectionMatrix"]
        data = matrix[()]
        data[0, 2] = False  # drop Gaussian Smoothing at sigma 1.0
        matrix[...] = data
    ok, reason = supports_project(changed)
    assert not ok and "do not match" in reason and "--engine ilastik" in reason
