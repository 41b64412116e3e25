import pytest
import torch

from stkd.mixup import mix, sample_lambda


def test_alpha_zero_means_no_mixing():
    x = torch.randn(5, 3, 4, 4)
    mixed, perm, lam = mix(x, 0.0)
    assert lam == 1.0
    assert torch.equal(mixed, x)
    assert sorted(perm.tolist()) == list(range(5))


def test_mix_is_convex_combination_with_permutation():
    x = torch.randn(6, 3, 4, 4)
    mixed, perm, lam = mix(x, 1.0, torch.Generator().manual_seed(1))
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6)


def test_generator_makes_draws_reproducible():
    x = torch.randn(8, 2)
    a = mix(x, 0.4, torch.Generator().manual_seed(7))
    b = mix(x, 0.4, torch.Generator().manual_seed(7))
    assert a[2] == b[2] and torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_lambda_distribution_mean_and_spread():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_lambda(0.2, g) for _ in range(4000)])
    # Beta(0.2, 0.2): mean 0.5, variance 1 / (4 * (2 * 0.2 + 1)) = 0.1786.
    assert draws.mean().item() == pytest.approx(0.5, abs=0.03)
    assert draws.var().item() == pytest.approx(0.1786, abs=0.02)


def test_negative_alpha_refused():
    with pytest.raises(ValueError, match="mixup_alpha"):
        sample_lambda(-0.1)
