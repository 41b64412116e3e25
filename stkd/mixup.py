"""Mixup virtual samples: ``x~ = lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``."""

from __future__ import annotations

import torch


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)``; ``alpha == 0`` means no mixing (``lam = 1``)."""
    if alpha < 0:
        raise ValueError(f"mixup_alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return 1.0
    # Beta(a, a) from two Gamma draws, so a torch.Generator (not NumPy's global state) decides it.
    conc = torch.tensor([alpha, alpha], dtype=torch.float64)
    if generator is None:
        g = torch._standard_gamma(conc)
    else:
        g = torch._standard_gamma(conc, generator=generator)
    return float(g[0] / g.sum())


def mix(
    x: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a random permutation of itself.

    Returns ``(mixed, permutation, lam)``. The permutation is drawn on the CPU generator and
    moved to ``x``'s device, so the same generator gives the same result on any device.
    """
    lam = sample_lambda(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    if lam == 1.0:
        return x, perm, lam
    mixed = x.mul(lam).add_(x.index_select(0, perm), alpha=1.0 - lam)
    return mixed, perm, lam


__all__ = ["mix", "sample_lambda"]
