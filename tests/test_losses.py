"""Loss values pinned against independent NumPy formulas and hand-computed numbers."""

import math

import numpy as np
import pytest
import torch

from stkd.losses import dkd_loss, kd_loss, mixed_cross_entropy, standardize

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


def np_standardize(z):
    """Per-row z-score with the unbiased std, as in the logit standardization reference code."""
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def test_standardize_matches_numpy_zscore():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 10, generator=g) * torch.tensor([[0.1], [1.0], [5.0], [30.0]]) + 3.0
    got = standardize(z)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_standardize(z.numpy()), rtol=1e-5, atol=1e-5)
    # Unbiased std: every row of the result has std 1 with ddof=1 (and not with ddof=0).
    np.testing.assert_allclose(got.numpy().std(axis=1, ddof=1), 1.0, rtol=1e-5)


def test_standardize_computes_in_float32():
    assert standardize(S.to(torch.bfloat16)).dtype == torch.float32


def test_standardized_kd_loss_matches_numpy_formula():
    for temperature in (1.0, 4.0):
        p_t = np_softmax(np_standardize(T.numpy()) / temperature)
        p_s = np_softmax(np_standardize(S.numpy()) / temperature)
        expected = temperature**2 * np_kl(p_t, p_s)
        got = kd_loss(standardize(S), standardize(T), temperature).item()
        assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("scale,shift", [(0.5, 0.0), (3.0, -2.0), (1.0, 7.0)])
def test_standardize_is_invariant_to_shift_and_positive_scale(scale, shift):
    # The property the paper relies on: the student need not match the teacher's logit range.
    assert torch.allclose(standardize(S * scale + shift), standardize(S), atol=1e-5)
    # Per-sample factors too: each row is standardized on its own.
    per_row_scale, per_row_shift = torch.tensor([[scale], [2.0]]), torch.tensor([[shift], [-1.0]])
    assert torch.allclose(standardize(S * per_row_scale + per_row_shift), standardize(S), atol=1e-5)
    expected = kd_loss(standardize(S), standardize(T), 4.0).item()
    got = kd_loss(standardize(S * scale + shift), standardize(T), 4.0).item()
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_plain_kd_loss_is_not_scale_invariant():
    # Contrast for the test above: without standardization a scaled student changes the loss.
    assert kd_loss(S * 3.0, T, 4.0).item() != pytest.approx(kd_loss(S, T, 4.0).item(), rel=1e-3)
