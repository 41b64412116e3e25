"""Mixup virtual samples: ``x~ = lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``."""

from __future__ import annotations

import torch


def sample_lambda(
    alpha: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Draw ``lam ~ Beta(alpha, alpha)`` as a 0-dim float32 tensor on ``device`` (default: the
    generator's device, else the CPU); ``alpha == 0`` means no mixing (``lam = 1``).

    ``lam`` stays a tensor so a training step on a GPU never waits to read it on the host.
    """
    if alpha < 0:
        raise ValueError(f"mixup_alpha must be >= 0, got {alpha}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if alpha == 0:
        return torch.ones((), device=device)
    # Beta(a, a) from two Gamma draws, so a torch.Generator (not NumPy's global state) decides it.
    conc = torch.full((2,), alpha, dtype=torch.float64, device=device)
    g = torch._standard_gamma(conc, generator=generator)
    return (g[0] / g.sum()).float()


def mix(
    x: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix a batch with a random permutation of itself.

    Returns ``(mixed, permutation, lam)``, all on ``x``'s device. ``lam`` and the permutation are
    drawn there, from ``generator`` (a generator of ``x``'s device, or None for the device's default
    one): no host round trip. ``alpha == 0`` returns ``x`` itself and ``lam = 1``.
    """
    lam = sample_lambda(alpha, generator, x.device)
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    if alpha == 0:
        return x, perm, lam
    mixed = x.mul(lam).add_(x.index_select(0, perm).mul_(1.0 - lam))
    return mixed, perm, lam


__all__ = ["mix", "sample_lambda"]
