"""log loss as Kaggle computes it (sklearn's definition), accuracy, softmax."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from lmsys_lib.metrics import UNIFORM_LOG_LOSS, accuracy, log_loss, row_log_loss, softmax


def test_equals_sklearn_on_random_input():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 300))
        probs = rng.dirichlet(np.ones(3) * rng.uniform(0.2, 5), size=n)
        y = rng.integers(0, 3, size=n)
        assert np.isclose(log_loss(y, probs), sk_log_loss(y, probs, labels=[0, 1, 2]), rtol=1e-12)


def test_unnormalised_rows_are_normalised_like_sklearn():
    probs = np.array([[2.0, 1.0, 1.0], [0.1, 0.1, 0.3]])
    y = np.array([0, 2])
    assert np.isclose(log_loss(y, probs), sk_log_loss(y, probs / probs.sum(1, keepdims=True), labels=[0, 1, 2]))
    assert np.isclose(log_loss(y, probs), -(np.log(0.5) + np.log(0.6)) / 2)


def test_clipping_like_kaggle():
    probs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    y = np.array([0, 1])
    assert np.isclose(log_loss(y, probs), (-np.log(1 - 1e-15) - np.log(1e-15)) / 2)
    assert np.isfinite(log_loss(y, probs))


def test_uniform_and_onehot_labels():
    y = np.array([0, 1, 2, 2])
    uniform = np.full((4, 3), 1 / 3)
    assert np.isclose(log_loss(y, uniform), UNIFORM_LOG_LOSS) and np.isclose(UNIFORM_LOG_LOSS, 1.0986, atol=1e-4)
    assert log_loss(np.eye(3)[y], uniform) == log_loss(y, uniform)
    assert np.isclose(row_log_loss(y, uniform).mean(), log_loss(y, uniform))


def test_every_metric_checks_lengths():
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        row_log_loss(np.array([0, 1, 2]), np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        accuracy(np.array([0, 1, 2]), np.full((4, 3), 1 / 3))


def test_accuracy_and_softmax():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    assert accuracy(np.array([0, 1, 0]), probs) == pytest.approx(2 / 3)
    z = np.array([[1000.0, 0.0, -1000.0]])
    assert np.allclose(softmax(z), [[1, 0, 0]]) and np.isclose(softmax(np.zeros((1, 3)))[0, 0], 1 / 3)


@pytest.mark.parametrize("y, probs, message", [
    (np.array([0, 3]), np.full((2, 3), 1 / 3), "class indices"),
    (np.array([0]), np.full((2, 3), 1 / 3), "1 labels for 2 rows"),
    (np.array([0]), np.array([[np.nan, 0.5, 0.5]]), "finite"),
    (np.array([0]), np.array([[-0.1, 0.5, 0.6]]), "non-negative"),
    (np.array([[1, 1, 0]]), np.full((1, 3), 1 / 3), "exactly one 1"),
    (np.array([0, 1]), np.array([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]]), "sum to 0 at rows \\[0\\]"),
    (np.array([1.5]), np.full((1, 3), 1 / 3), "integer class indices"),
])
def test_bad_input_raises(y, probs, message):
    with pytest.raises(ValueError, match=message):
        log_loss(y, probs)
