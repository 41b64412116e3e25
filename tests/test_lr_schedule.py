"""The learning rates the README promises: multistep (milestones x gamma) and cosine, each after an optional
linear warm-up, as the optimizer sees them epoch by epoch (pinned values, worked by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.worker_loop import make_scheduler


def rates(schedule: str, warmup: int, epochs: int = 10, lr: float = 0.1) -> list[float]:
    """The optimizer's learning rate during each epoch (the scheduler steps once per epoch)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=lr)
    scheduler = make_scheduler(optimizer, {"epochs": epochs, "warmup_epochs": warmup, "milestones": [5, 8],
                                           "gamma": 0.1, "schedule": schedule})
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_multistep_drops_by_gamma_at_each_milestone():
    assert rates("multistep", warmup=0) == pytest.approx([0.1] * 5 + [0.01] * 3 + [0.001] * 2)


def test_multistep_after_a_linear_warm_up():
    assert rates("multistep", warmup=2) == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001])


def test_cosine_falls_from_the_full_rate_over_the_epochs_after_warm_up():
    expected = [0.1 / 3, 0.2 / 3, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 7)) for k in range(7)]
    got = rates("cosine", warmup=3)
    assert got == pytest.approx(expected)
    assert got[3 + 4] < 0.05 < got[3 + 3]  # half the rate at the middle of the cosine part's 7 epochs
    assert got[:3] == sorted(got[:3]) and got[3:] == sorted(got[3:], reverse=True)


def test_cosine_without_warm_up_starts_at_the_full_rate():
    got = rates("cosine", warmup=0)
    assert got[0] == pytest.approx(0.1) and got[5] == pytest.approx(0.05) and got[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.9)))
