"""Loss values pinned against independent NumPy formulas and hand-computed numbers."""

import math

import numpy as np
import pytest
import torch

from stkd.losses import dkd_loss, kd_loss, mixed_cross_entropy

S = torch.tensor([[2.0, 1.0, 0.1], [0.5, -1.0, 3.0]])
T = torch.tensor([[1.5, 0.2, 0.3], [0.0, 0.0, 2.0]])
Y = torch.tensor([0, 2])


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(p, q):
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())


def test_kd_loss_matches_numpy_formula():
    for temperature in (1.0, 4.0):
        p_t = np_softmax(T.numpy() / temperature)
        p_s = np_softmax(S.numpy() / temperature)
        expected = temperature**2 * np_kl(p_t, p_s)
        assert kd_loss(S, T, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_hand_computed_value():
    # Two classes, T=1: p_t = (0.5, 0.5), p_s = softmax(0, ln 3) = (0.25, 0.75).
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.zeros(1, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_zero_for_equal_logits():
    assert kd_loss(S, S.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_temperature_scaling_is_t_squared_times_kl():
    # Scaling both logits by T and dividing inside by T leaves the KL unchanged: only T^2 remains.
    base = kd_loss(S, T, 1.0).item()
    assert kd_loss(S * 3.0, T * 3.0, 3.0).item() == pytest.approx(9.0 * base, rel=1e-5)


def test_mixed_cross_entropy():
    lam = 0.3
    logp = np.log(np_softmax(S.numpy()))
    y_b = torch.tensor([1, 0])
    expected = lam * -logp[[0, 1], [0, 2]].mean() + (1 - lam) * -logp[[0, 1], [1, 0]].mean()
    assert mixed_cross_entropy(S, Y, y_b, lam).item() == pytest.approx(expected, rel=1e-5)


def np_dkd(s, t, y, alpha, beta, temperature):
    """DKD written out per sample, independently of the implementation's masking tricks."""
    total_tckd, total_nckd = 0.0, 0.0
    for i in range(len(y)):
        ps = np_softmax(s[i : i + 1] / temperature)[0]
        pt = np_softmax(t[i : i + 1] / temperature)[0]
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        total_tckd += (bt * np.log(bt / bs)).sum()
        rest = [c for c in range(s.shape[1]) if c != y[i]]
        ns = np_softmax(s[i : i + 1, rest] / temperature)[0]
        nt = np_softmax(t[i : i + 1, rest] / temperature)[0]
        total_nckd += (nt * np.log(nt / ns)).sum()
    n = len(y)
    return (alpha * total_tckd / n + beta * total_nckd / n) * temperature**2


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 2.0)])
def test_dkd_matches_independent_tckd_nckd(alpha, beta, temperature):
    expected = np_dkd(S.numpy(), T.numpy(), Y.numpy(), alpha, beta, temperature)
    got = dkd_loss(S, T, Y, alpha, beta, temperature).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_dkd_zero_for_equal_logits():
    assert dkd_loss(S, S.clone(), Y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)
