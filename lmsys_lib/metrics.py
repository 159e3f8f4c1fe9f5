"""Log loss and friends, numpy only.

``log_loss`` is the competition metric as Kaggle scores it: each row of probabilities is divided by its
sum ("rescaled prior to being scored"), clipped to [1e-15, 1 − 1e-15], and the mean negative
log-probability of the true class is returned. On rows that already sum to 1 with every probability inside
that range it equals ``sklearn.metrics.log_loss``; recent sklearn no longer rescales rows and clips at
float64 eps instead, so the two differ on unnormalised rows and on exact zeros. Uniform scores ln 3 ≈ 1.0986.

This module never imports torch.
"""

from __future__ import annotations

import numpy as np

UNIFORM_LOG_LOSS = float(np.log(3))


def _as_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim == 2:  # one-hot rows
        if not np.allclose(y.sum(axis=1), 1) or not np.isin(y, (0, 1)).all():
            raise ValueError("one-hot labels must have exactly one 1 per row")
        y = y.argmax(axis=1)
    if not np.all(np.mod(y, 1) == 0):
        raise ValueError("labels must be integer class indices")
    y = y.astype(np.int64)
    if ((y < 0) | (y >= n_classes)).any():
        raise ValueError(f"labels must be class indices in [0, {n_classes})")
    return y


def _checked(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) after every check the metrics share."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must be a non-empty (n, k) array, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if (p.sum(axis=1) <= 0).any():
        raise ValueError(f"probability rows sum to 0 at rows {np.flatnonzero(p.sum(axis=1) <= 0)[:10].tolist()}")
    y = _as_labels(y_true, p.shape[1])
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels for {len(p)} rows of probabilities")
    return y, p


def log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    """Mean multi-class log loss.

    Args:
        y_true: class indices (n,) or one-hot (n, k).
        probs: (n, k) non-negative scores; rows are normalised to sum 1, then clipped to [eps, 1 − eps].
    Returns:
        The mean negative log-likelihood (natural log).
    """
    return float(row_log_loss(y_true, probs, eps).mean())


def row_log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    """Per-row log loss (its mean is ``log_loss``), for segment reports."""
    y, p = _checked(y_true, probs)
    p = np.clip(p / p.sum(axis=1, keepdims=True), eps, 1 - eps)
    return -np.log(p[np.arange(len(y)), y])


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Share of rows whose most probable class is the true one (ties go to the lowest class index)."""
    y, p = _checked(y_true, probs)
    return float((p.argmax(axis=1) == y).mean())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
