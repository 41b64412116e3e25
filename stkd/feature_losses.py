"""Feature-based distillation losses as pure functions of stage outputs (:mod:`stkd.features`), and
FitNet's regressor, with the settings of the reference code (RepDistiller's ``distiller_zoo``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: the channel mean of ``|f|^p`` at each position,
    flattened and L2-normalised per sample: (N, C, H, W) -> (N, H*W)."""
    return F.normalize(feature.float().pow(p).mean(1).flatten(1))


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean squared difference of the two attention maps. The larger map is first average-pooled to the
    smaller one's size, as the reference does (student and teacher stages may differ in resolution)."""
    s_size, t_size = student.shape[2], teacher.shape[2]
    if s_size > t_size:
        student = F.adaptive_avg_pool2d(student, (t_size, t_size))
    elif t_size > s_size:
        teacher = F.adaptive_avg_pool2d(teacher, (s_size, s_size))
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def attention_transfer(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                       p: int = 2) -> torch.Tensor:
    """AT over several stages: the sum of each stage pair's loss (the reference weighs it by beta = 1000)."""
    if len(students) != len(teachers) or not students:
        raise ValueError(f"attention transfer pairs stages one to one, got {len(students)} student and "
                         f"{len(teachers)} teacher stage(s)")
    return sum(attention_transfer_loss(s, t, p) for s, t in zip(students, teachers))


def hint_loss(regressed: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNet's hint: the mean squared error between the regressed student stage and the teacher's."""
    return F.mse_loss(regressed.float(), teacher.float())


class HintRegressor(nn.Module):
    """FitNet's regressor from a student stage to a teacher stage's shape: a convolution chosen by
    their spatial sizes (3x3 stride 2 to halve, a 4x4 transposed one to double, otherwise a kernel of
    ``1 + s - t``: 1x1 for equal sizes), then batch norm and ReLU, as in the reference's ConvReg."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        (s_channels, s_size, s_width), (t_channels, t_size, t_width) = student_shape, teacher_shape
        if s_size == 2 * t_size:
            self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
        elif 2 * s_size == t_size:
            self.conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
        elif s_size >= t_size:
            self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=(1 + s_size - t_size, 1 + s_width - t_width))
        else:
            raise ValueError(f"a hint regressor maps a student stage at {s_size}x{s_width} to a teacher stage "
                             f"at {t_size}x{t_width}: only to half, double or a smaller size")
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))
