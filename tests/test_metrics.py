"""Tests for sklearn_bayes_transfer.metrics against hand-computed values and independent references."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    StratifiedKFold,
    cross_val_score,
)

from sklearn_bayes_transfer.exceptions import ConfigError, DataError, OutputExistsError
from sklearn_bayes_transfer.metrics import (
    SCORERS,
    accuracy,
    brier_score,
    brier_scorer,
    calibration_bins,
    ece_scorer,
    expected_calibration_error,
    get_scorer,
    mean_iou,
    miou_scorer,
    negative_log_likelihood,
    nll_scorer,
    per_class_iou,
    pixel_accuracy,
    pixel_accuracy_scorer,
    reliability_diagram,
    segmentation_confusion_matrix,
)

# ---------------------------------------------------------------------------------------------
# a fixed tiny classification example: 6 samples, 3 classes
# ---------------------------------------------------------------------------------------------

PROBA = np.array([
    [0.90, 0.05, 0.05],  # y=0: top 0 (conf 0.90) correct
    [0.10, 0.70, 0.20],  # y=1: top 1 (conf 0.70) correct
    [0.30, 0.25, 0.45],  # y=0: top 2 (conf 0.45) wrong
    [0.20, 0.20, 0.60],  # y=2: top 2 (conf 0.60) correct; 0.6 is a bin edge
    [0.50, 0.30, 0.20],  # y=1: top 0 (conf 0.50) wrong
    [0.35, 0.33, 0.32],  # y=2: top 0 (conf 0.35) wrong
])
Y_IDX = np.array([0, 1, 0, 2, 1, 2])
CLASSES = np.array(["cat", "dog", "eel"])
Y_LABELS = CLASSES[Y_IDX]


def test_ece_hand_computed():
    # n_bins=5: bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1].
    #   bin 1: conf .35 (wrong)                 -> n=1, acc 0,   conf .35           |gap| = .35
    #   bin 2: conf .45 (wrong), .60 (right; on the upper edge, so in this bin), .50 (wrong)
    #                                           -> n=3, acc 1/3, conf 1.55/3        |gap| = .55/3
    #   bin 3: conf .70 (right)                 -> n=1, acc 1,   conf .70           |gap| = .30
    #   bin 4: conf .90 (right)                 -> n=1, acc 1,   conf .90           |gap| = .10
    # ECE = (1*.35 + 3*(.55/3) + 1*.30 + 1*.10) / 6 = 1.30 / 6
    expected = 1.30 / 6
    assert expected_calibration_error(Y_IDX, PROBA, n_bins=5) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(Y_LABELS, PROBA, classes=CLASSES, n_bins=5) == pytest.approx(expected, abs=1e-12)

    bins = calibration_bins(Y_IDX, PROBA, n_bins=5)
    np.testing.assert_array_equal(bins.count, [0, 1, 3, 1, 1])
    np.testing.assert_allclose(bins.accuracy[1:], [0.0, 1 / 3, 1.0, 1.0])
    np.testing.assert_allclose(bins.confidence[1:], [0.35, 1.55 / 3, 0.70, 0.90])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.confidence[0])
    np.testing.assert_allclose(bins.edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_ece_bin_edges_and_single_bin():
    # Confidence exactly 0.5 (a tie, top label = first column) goes to the lower bin (0, .5];
    # confidence 1.0 to the last bin; with one bin ECE is |accuracy - mean confidence|.
    proba = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    y = np.array([1, 0, 0])
    bins = calibration_bins(y, proba, n_bins=2)
    np.testing.assert_array_equal(bins.count, [1, 2])
    # bin 0: conf .5, acc 0 -> .5; bin 1: conf 1, acc 1/2 -> .5. ECE = (1*.5 + 2*.5)/3 = .5
    assert expected_calibration_error(y, proba, n_bins=2) == pytest.approx(0.5)
    # one bin: accuracy 1/3, mean confidence 2.5/3
    assert expected_calibration_error(y, proba, n_bins=1) == pytest.approx(abs(1 / 3 - 2.5 / 3))


def test_ece_perfectly_calibrated_is_zero():
    proba = np.array([[0.75, 0.25]] * 4)
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(y, proba, n_bins=10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True, "15"])
def test_ece_rejects_bad_n_bins(n_bins):
    with pytest.raises(ConfigError, match="n_bins"):
        expected_calibration_error(Y_IDX, PROBA, n_bins=n_bins)


def test_nll_matches_sklearn_log_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, size=50)
    classes = np.array([3, 7, 11, 20])
    expected = log_loss(classes[y], proba, labels=classes)
    assert negative_log_likelihood(y, proba) == pytest.approx(expected, rel=1e-10)
    assert negative_log_likelihood(classes[y], proba, classes=classes) == pytest.approx(expected, rel=1e-10)
    # torch inputs, float32 probabilities
    got = negative_log_likelihood(torch.from_numpy(y), torch.from_numpy(proba).float())
    assert got == pytest.approx(expected, rel=1e-5)


def test_nll_clips_to_eps():
    proba = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert negative_log_likelihood([1, 0], proba, eps=1e-6) == pytest.approx((-math.log(1e-6) + math.log(2)) / 2)
    with pytest.raises(ConfigError, match="eps"):
        negative_log_likelihood([1, 0], proba, eps=0.0)


def test_brier_matches_numpy_formula_and_sklearn():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(5), size=40)
    y = rng.integers(0, 5, size=40)
    direct = np.mean([sum((proba[i, k] - (k == y[i])) ** 2 for k in range(5)) for i in range(40)])
    assert brier_score(y, proba) == pytest.approx(direct, rel=1e-12)
    labels = np.array(list("abcde"))
    assert brier_score(labels[y], proba, classes=labels) == pytest.approx(direct, rel=1e-12)
    # For >= 3 classes sklearn's multi-class Brier uses the same definition.
    assert brier_score(y, proba) == pytest.approx(brier_score_loss(y, proba, labels=np.arange(5)), rel=1e-12)


def test_brier_binary_is_twice_the_binary_definition():
    p1 = np.array([0.9, 0.2, 0.6, 0.4])
    y = np.array([1, 0, 0, 1])
    proba = np.stack([1 - p1, p1], axis=1)
    assert brier_score(y, proba) == pytest.approx(2 * np.mean((p1 - y) ** 2))


def test_accuracy():
    assert accuracy(Y_LABELS, CLASSES[PROBA.argmax(axis=1)]) == pytest.approx(3 / 6)
    assert accuracy(torch.tensor([1, 2, 3]), np.array([1, 2, 0])) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match=r"\(3,\).*\(2,\)"):
        accuracy([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------
# classification input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [negative_log_likelihood, brier_score, expected_calibration_error])
def test_classification_validation(metric):
    with pytest.raises(DataError, match=r"\(5,\).*\(6, 3\)"):
        metric(Y_IDX[:5], PROBA)
    bad_sum = PROBA.copy()
    bad_sum[2] = [0.5, 0.5, 0.5]
    with pytest.raises(DataError, match="row 2 sums to 1.5"):
        metric(Y_IDX, bad_sum)
    negative = PROBA.copy()
    negative[4] = [1.2, -0.1, -0.1]
    with pytest.raises(DataError, match="negative.*row 4"):
        metric(Y_IDX, negative)
    with pytest.raises(DataError, match="'fox'"):
        metric(np.array(["cat", "fox", "dog", "ant", "eel", "cat"]), PROBA, classes=CLASSES)
    with pytest.raises(DataError, match="label 3 "):
        metric(np.array([0, 1, 3, 2, 1, 0]), PROBA)
    with pytest.raises(DataError, match="2 labels but proba has 3 columns"):
        metric(Y_IDX, PROBA, classes=["a", "b"])
    with pytest.raises(DataError, match="2-D"):
        metric(Y_IDX, PROBA[:, 0])
    with pytest.raises(DataError, match="repeat"):
        metric(Y_IDX, PROBA, classes=["a", "b", "a"])


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------

SEG_TRUE = np.array([[0, 0, 1, 255],
                     [1, 2, 2, 255]])
SEG_PRED = np.array([[0, 1, 1, 3],   # the 3 sits on an ignored pixel: class 3 is absent after ignoring
                     [1, 2, 0, 0]])


def test_iou_hand_computed():
    # Counted pixels (truth, prediction): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
    #   class 0: TP 1, FN 1 (0->1), FP 1 (2->0)  -> IoU 1/3
    #   class 1: TP 2, FN 0,        FP 1 (0->1)  -> IoU 2/3
    #   class 2: TP 1, FN 1 (2->0), FP 0         -> IoU 1/2
    #   class 3: absent from both                -> NaN, excluded from the mean
    # mIoU = (1/3 + 2/3 + 1/2) / 3 = 0.5; pixel accuracy = 4/6
    iou = per_class_iou(SEG_TRUE, SEG_PRED, 4)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(iou[3])
    assert mean_iou(SEG_TRUE, SEG_PRED, 4) == pytest.approx(0.5)
    assert pixel_accuracy(SEG_TRUE, SEG_PRED, 4) == pytest.approx(4 / 6)
    cm = segmentation_confusion_matrix(SEG_TRUE, SEG_PRED, 4)
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    # (H, W) and (N, H, W) pool the same pixels; torch masks work too
    batch = torch.from_numpy(np.stack([SEG_TRUE, SEG_TRUE]))
    assert mean_iou(batch, torch.from_numpy(np.stack([SEG_PRED, SEG_PRED])), 4) == pytest.approx(0.5)


def test_iou_matches_loop_reference():
    rng = np.random.default_rng(2)
    n_classes = 5
    truth = rng.integers(0, n_classes, size=(3, 7, 9))
    truth[rng.random(truth.shape) < 0.1] = 255
    pred = rng.integers(0, n_classes - 1, size=truth.shape)  # class 4 never predicted
    t, p = truth.ravel(), pred.ravel()
    expected = []
    for c in range(n_classes):
        inter = union = 0
        for ti, pi in zip(t, p):
            if ti == 255:
                continue
            inter += (ti == c) and (pi == c)
            union += (ti == c) or (pi == c)
        expected.append(inter / union if union else np.nan)
    np.testing.assert_allclose(per_class_iou(truth.astype(np.uint8), pred.astype(np.uint8), n_classes), expected)
    assert mean_iou(truth, pred, n_classes) == pytest.approx(np.nanmean(expected))
    counted = t != 255
    assert pixel_accuracy(truth, pred, n_classes) == pytest.approx(np.mean(t[counted] == p[counted]))


def test_segmentation_validation():
    with pytest.raises(DataError, match=r"\(2, 4\).*\(2, 3\)"):
        mean_iou(SEG_TRUE, SEG_PRED[:, :3], 4)
    truth = SEG_TRUE.copy()
    truth[0, 0] = 7
    with pytest.raises(DataError, match="y_true contains value 7"):
        mean_iou(truth, SEG_PRED, 4)
    pred = SEG_PRED.copy()
    pred[1, 1] = -2
    with pytest.raises(DataError, match="y_pred contains value -2"):
        mean_iou(SEG_TRUE, pred, 4)
    # without ignore_index, 255 is an ordinary (out-of-range) value
    with pytest.raises(DataError, match="value 255"):
        mean_iou(SEG_TRUE, SEG_PRED, 4, ignore_index=None)
    with pytest.raises(DataError, match="integer"):
        mean_iou(SEG_TRUE.astype(float), SEG_PRED, 4)
    with pytest.raises(DataError, match="every pixel"):
        mean_iou(np.full((2, 2), 255), np.zeros((2, 2), dtype=int), 2)
    with pytest.raises(ConfigError, match="ignore_index=1"):
        mean_iou(SEG_TRUE, SEG_PRED, 4, ignore_index=1)
    with pytest.raises(ConfigError, match="n_classes"):
        mean_iou(SEG_TRUE, SEG_PRED, 0)


# ---------------------------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris_strings():
    X, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])
    return X, names[y]


def test_classification_scorers_in_grid_search_match_sklearn(iris_strings):
    X, y = iris_strings
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(
        LogisticRegression(max_iter=500),
        {"C": [0.01, 1.0]},
        scoring={"nll": nll_scorer, "ece": ece_scorer, "brier": brier_scorer,
                 "sk_nll": "neg_log_loss", "sk_brier": "neg_brier_score", "acc": SCORERS["accuracy"],
                 "sk_acc": "accuracy"},
        refit="nll",
        cv=cv,
    ).fit(X, y)
    res = search.cv_results_
    np.testing.assert_allclose(res["mean_test_nll"], res["mean_test_sk_nll"], rtol=1e-8)
    np.testing.assert_allclose(res["mean_test_brier"], res["mean_test_sk_brier"], rtol=1e-8)
    np.testing.assert_allclose(res["mean_test_acc"], res["mean_test_sk_acc"])
    assert np.all(res["mean_test_ece"] <= 0) and np.all(np.isfinite(res["mean_test_ece"]))
    assert search.best_params_ == {"C": 1.0}  # weak regularisation fits iris far better
    # the ECE scorer is minus the ECE of the refitted model's probabilities
    est = search.best_estimator_
    assert ece_scorer(est, X, y) == pytest.approx(-expected_calibration_error(y, est.predict_proba(X),
                                                                              classes=est.classes_))


def test_proba_scorers_binary_use_both_columns(iris_strings):
    # make_scorer would pass only the positive column for a binary problem; ours keeps both.
    X, y = iris_strings
    keep = y != "setosa"
    X, y = X[keep], y[keep]
    scores = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=KFold(3, shuffle=True, random_state=0),
                             scoring=nll_scorer)
    reference = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=KFold(3, shuffle=True, random_state=0),
                                scoring="neg_log_loss")
    np.testing.assert_allclose(scores, reference, rtol=1e-8)
    clf = LogisticRegression(max_iter=500).fit(X, y)
    p1 = clf.predict_proba(X)[:, 1]
    assert brier_scorer(clf, X, y) == pytest.approx(-2 * np.mean((p1 - (y == clf.classes_[1])) ** 2))


class ThresholdSegmenter(BaseEstimator):
    """Predicts label ``classes_[1]`` where ``X + offset > 0.5``, else ``classes_[0]``."""

    def __init__(self, offset=0.0, ignore_index=255):
        self.offset = offset
        self.ignore_index = ignore_index

    def fit(self, X, y):
        y = np.asarray(y)
        self.classes_ = np.unique(y[y != self.ignore_index])
        return self

    def predict(self, X):
        return self.classes_[(np.asarray(X) + self.offset > 0.5).astype(int)]


def _segmentation_data(seed=0):
    rng = np.random.default_rng(seed)
    idx = (rng.random((12, 6, 6)) < 0.4).astype(int)
    X = idx + rng.normal(scale=0.1, size=idx.shape)
    labels = np.array([10, 20])
    y = labels[idx]
    y[:, 0, :] = 255  # a border of ignored pixels
    return X, y


def test_segmentation_scorers_in_grid_search():
    X, y = _segmentation_data()
    cv = KFold(3)
    search = GridSearchCV(
        ThresholdSegmenter(),
        {"offset": [0.0, 0.45]},
        scoring={"miou": miou_scorer, "pix": pixel_accuracy_scorer},
        refit="miou",
        cv=cv,
    ).fit(X, y)
    assert search.best_params_ == {"offset": 0.0}
    # independent reference: per fold, IoU of each label over pixels whose truth is not 255
    for cand, offset in enumerate([0.0, 0.45]):
        for fold, (_, test) in enumerate(cv.split(X)):
            t = y[test]
            p = np.where(X[test] + offset > 0.5, 20, 10)
            counted = t != 255
            ious = [np.sum((t == c) & (p == c) & counted) / np.sum(((t == c) | (p == c)) & counted)
                    for c in (10, 20)]
            assert search.cv_results_[f"split{fold}_test_miou"][cand] == pytest.approx(np.mean(ious))
            assert search.cv_results_[f"split{fold}_test_pix"][cand] == pytest.approx(np.mean(t[counted] == p[counted]))
    assert search.cv_results_["mean_test_miou"][1] < search.cv_results_["mean_test_miou"][0]


def test_segmentation_scorer_errors():
    X, y = _segmentation_data()
    seg = ThresholdSegmenter().fit(X, y)
    y_bad = y.copy()
    y_bad[3, 2, 2] = 30
    with pytest.raises(DataError, match="label 30"):
        miou_scorer(seg, X, y_bad)
    seg.ignore_index = 10
    with pytest.raises(ConfigError, match="ignore_index=10"):
        miou_scorer(seg, X, y)
    with pytest.raises(DataError, match=r"\(12, 6, 6\).*\(4, 6, 6\)"):
        miou_scorer(ThresholdSegmenter().fit(X, y), X[:4], y)


def test_get_scorer():
    assert get_scorer("neg_ece") is ece_scorer
    assert get_scorer("miou") is miou_scorer
    assert set(SCORERS) == {"accuracy", "neg_nll", "neg_ece", "neg_brier", "miou", "pixel_accuracy"}
    with pytest.raises(ConfigError, match="'nll'.*'neg_nll'"):
        get_scorer("nll")
    with pytest.raises(TypeError):
        SCORERS["x"] = nll_scorer  # read-only


# ---------------------------------------------------------------------------------------------
# reliability diagram
# ---------------------------------------------------------------------------------------------


def test_reliability_diagram_writes_png(tmp_path):
    out = tmp_path / "rel.png"
    written = reliability_diagram(Y_LABELS, PROBA, out, classes=CLASSES, n_bins=5, title="tiny")
    assert written == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]  # no temporary file left
    with pytest.raises(OutputExistsError):
        reliability_diagram(Y_LABELS, PROBA, out, classes=CLASSES, overwrite=False)
    # invalid input fails before anything is written
    with pytest.raises(DataError):
        reliability_diagram(Y_IDX, PROBA * 2, tmp_path / "bad.png")
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]


def test_reliability_diagram_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r'pip install "sklearn-bayes-transfer\[plot\]"'):
        reliability_diagram(Y_IDX, PROBA, tmp_path / "rel.png")
    assert list(tmp_path.iterdir()) == []

