"""Distillation losses against hand computations (numpy, written out term by term)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmsys_lib import losses

S = np.array([[1.0, -0.5, 0.2], [0.0, 2.0, -1.0], [-1.5, 0.3, 0.9], [0.4, 0.4, 0.4]])
Y = np.array([0, 1, 2, 0])
T1 = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, -1.0, 3.0], [0.0, 1.0, 0.0]])
T2 = np.array([[0.0, 1.0, 0.0], [3.0, -2.0, 0.1], [0.2, 0.2, 0.2], [1.0, 0.0, 2.0]])
TEACHERS = np.stack([T1, T2], axis=1)  # (n, t, 3)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hand_kl(temperature, weights, ce_weight, mask):
    total = 0.0
    for i in range(len(S)):
        ce = -np.log(_softmax(S[i])[Y[i]])
        q = _softmax(S[i] / temperature)
        num = den = 0.0
        for j in range(TEACHERS.shape[1]):
            if mask[i, j]:
                p = _softmax(TEACHERS[i, j] / temperature)
                num += weights[j] * temperature ** 2 * np.sum(p * (np.log(p) - np.log(q)))
                den += weights[j] * 1.0
        total += ce_weight * ce + (1 - ce_weight) * num / den if den > 0 else ce
    return total


def _hand_winner(temperature, mask):
    total = 0.0
    for i in range(len(S)):
        terms = [-np.log(_softmax(S[i])[Y[i]])]
        q = _softmax(S[i] / temperature)
        for j in range(TEACHERS.shape[1]):
            if mask[i, j]:
                p = _softmax(TEACHERS[i, j] / temperature)
                terms.append(temperature ** 2 * np.sum(p * (np.log(p) - np.log(q))))
                terms.append(1 - p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
        total += sum(terms) / len(terms)
    return total


def _loss(**kw):
    return float(losses.distill_sum(torch.tensor(S), torch.tensor(Y), torch.tensor(TEACHERS), **kw))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.3), (0.0, 2.0)])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_kl_mode_equals_the_hand_computation(temperature, weights, ce_weight):
    mask = np.array([[True, True], [True, False], [False, True], [False, False]])
    got = _loss(mask=torch.tensor(mask), weights=weights, temperature=temperature, ce_weight=ce_weight)
    assert got == pytest.approx(_hand_kl(temperature, weights, ce_weight, mask), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_winner_mode_equals_the_hand_computation(temperature):
    mask = np.array([[True, True], [True, False], [True, True], [False, False]])
    got = _loss(mask=torch.tensor(mask), temperature=temperature, mode="winner")
    assert got == pytest.approx(_hand_winner(temperature, mask), rel=1e-6)


def test_reduces_to_cross_entropy_when_the_teacher_weight_is_zero():
    ce = float(losses.cross_entropy_sum(torch.tensor(S), torch.tensor(Y)))
    assert _loss(weights=(0.0, 0.0), ce_weight=0.5) == pytest.approx(ce, rel=1e-7)
    assert _loss(ce_weight=1.0) == pytest.approx(ce, rel=1e-7)


def test_absent_teacher_entries_may_hold_nan_and_gradients_stay_finite():
    teachers = torch.tensor(TEACHERS).clone()
    mask = torch.ones(4, 2, dtype=torch.bool)
    teachers[1, 1] = float("nan")
    mask[1, 1] = False
    logits = torch.tensor(S, requires_grad=True)
    loss = losses.distill_sum(logits, torch.tensor(Y), teachers, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert float(loss) == pytest.approx(_hand_kl(1.0, (1, 1), 0.5, mask.numpy()), rel=1e-6)


def test_sum_reduction_composes_with_the_step_normalisation():
    """Two halves summed and divided by the true row count equal the mean over all rows."""
    s, y, t = torch.tensor(S), torch.tensor(Y), torch.tensor(TEACHERS)
    halves = losses.distill_sum(s[:1], y[:1], t[:1]) + losses.distill_sum(s[1:], y[1:], t[1:])
    assert float(losses.step_loss(halves, 4)) == pytest.approx(float(losses.distill_sum(s, y, t)) / 4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        _loss(mode="mse")
    with pytest.raises(ValueError, match="weights"):
        _loss(weights=(1.0,))
    with pytest.raises(ValueError, match="temperature"):
        _loss(temperature=0.0)
