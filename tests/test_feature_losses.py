"""Feature losses (stkd/feature_losses.py) pinned on tensors small enough to work out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from stkd import feature_losses as fl


def test_attention_map_is_the_normalised_channel_mean_of_squares():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2 channels, 1, 2)
    # channel means of squares: (1 + 9) / 2 = 5 and (4 + 0) / 2 = 2; L2 norm sqrt(29)
    torch.testing.assert_close(fl.attention_map(f), torch.tensor([[5.0, 2.0]]) / math.sqrt(29))
    torch.testing.assert_close(fl.attention_map(3 * f), fl.attention_map(f)), "scale-free"
    torch.testing.assert_close(fl.attention_map(f, p=1), torch.tensor([[2.0, 1.0]]) / math.sqrt(5))


def test_attention_transfer_loss_by_hand():
    student = torch.tensor([[[[1.0, 2.0]]]])  # maps [1, 4] / sqrt(17)
    teacher = torch.tensor([[[[2.0, 1.0]]]])  # maps [4, 1] / sqrt(17)
    assert fl.attention_transfer_loss(student, teacher).item() == pytest.approx(9 / 17)  # ((3^2 + 3^2)/17)/2
    assert fl.attention_transfer_loss(student, 5 * student).item() == pytest.approx(0.0, abs=1e-12)


def test_the_larger_map_is_average_pooled_to_the_smaller():
    student = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])  # the means of its 2x2 blocks
    teacher = torch.rand(1, 3, 2, 2)
    expected = fl.attention_transfer_loss(pooled, teacher)
    torch.testing.assert_close(fl.attention_transfer_loss(student, teacher), expected)
    torch.testing.assert_close(fl.attention_transfer_loss(teacher, student), expected)


def test_attention_transfer_sums_its_stages_and_refuses_unpaired_ones():
    pairs = [(torch.rand(2, 4, 8, 8), torch.rand(2, 6, 8, 8)), (torch.rand(2, 8, 4, 4), torch.rand(2, 3, 2, 2))]
    total = fl.attention_transfer([s for s, _ in pairs], [t for _, t in pairs])
    torch.testing.assert_close(total, sum(fl.attention_transfer_loss(s, t) for s, t in pairs))
    with pytest.raises(ValueError, match="pairs stages one to one, got 2 student and 1 teacher"):
        fl.attention_transfer([s for s, _ in pairs], [pairs[0][1]])


def test_hint_loss_is_the_mean_squared_error():
    regressed, teacher = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert fl.hint_loss(regressed, teacher).item() == pytest.approx((0 + 4 + 9 + 0) / 4)


@pytest.mark.parametrize("student, teacher, conv, kernel", [
    ((16, 32, 32), (64, 16, 16), torch.nn.Conv2d, (3, 3)),           # halve: stride 2
    ((16, 8, 8), (64, 16, 16), torch.nn.ConvTranspose2d, (4, 4)),    # double
    ((32, 8, 8), (64, 8, 8), torch.nn.Conv2d, (1, 1)),               # same size
    ((32, 10, 10), (64, 7, 7), torch.nn.Conv2d, (4, 4)),             # shrink by 3
])
def test_the_hint_regressor_maps_the_student_stage_to_the_teacher_shape(student, teacher, conv, kernel):
    regressor = fl.HintRegressor(student, teacher)
    assert type(regressor.conv) is conv and regressor.conv.kernel_size == kernel
    out = regressor(torch.randn(2, *student))
    assert out.shape == (2, *teacher) and (out >= 0).all()


def test_a_hint_regressor_that_would_have_to_grow_other_than_double_is_refused():
    with pytest.raises(ValueError, match="student stage at 8x8 to a teacher stage at 12x12"):
        fl.HintRegressor((16, 8, 8), (32, 12, 12))
