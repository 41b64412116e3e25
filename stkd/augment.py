"""Batched data augmentation on the training device: no per-image Python loop."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop (zero padding ``padding`` on each side) and horizontal flip.

    ``images`` is a uint8 (or any dtype) NCHW batch on any device. The offsets and flips are drawn
    on that device from ``generator`` (a generator of the same device, or None for the device's
    default one), so nothing is copied from the host and the CPU never waits for the GPU. A seeded
    generator makes the draws reproducible on one device type; CPU and CUDA draw different streams.
    """
    n, _, h, w = images.shape
    device = images.device
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
        rows = (offsets[0][:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (offsets[1][:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
        out = padded[batch, channels, rows, cols]
    if flip:
        flips = torch.rand(n, generator=generator, device=device) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NCHW in 0..255 to ``(x / 255 - mean) / std`` as ``dtype``; mean/std in 0..1 units.

    Pass ``mean``/``std`` as float32 tensors already on ``images``' device (``channel_stats``) in a
    training loop: from Python lists they are copied from the host on every call, and on a GPU that
    copy synchronizes.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    # Fold /255 into the affine map: one multiply-add over the batch.
    scale = 1.0 / (255.0 * std_t)
    shift = -mean_t / std_t
    out = images.to(torch.float32).mul_(scale).add_(shift).to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def channel_stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 tensors on ``device``, made once for ``normalize``."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def nhwc_to_nchw(images: torch.Tensor) -> torch.Tensor:
    """View a NHWC batch (as stored) as NCHW without copying."""
    return images.permute(0, 3, 1, 2)
