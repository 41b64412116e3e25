"""One optimisation step of a method: the piece every training loop (and benchmark) shares."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from stkd.methods import Method


def train_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``forward_train`` (under ``autocast``), the summed loss terms backpropagated, one optimizer
    step. Returns the student's logits and the weighted loss terms, for logging."""
    with autocast():
        logits, terms = method.forward_train(x, y)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, terms
