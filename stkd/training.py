"""One optimisation step of a method, and evaluation logits: the pieces every training loop (and
benchmark) shares."""

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


def eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits with autocast switched off.

    The project's one precision policy for accuracy: teachers and students are evaluated in fp32,
    whatever precision trained them (bf16 autocast is a training-speed setting only), so a student's
    accuracy and its teacher's are measured the same way and match fp32 published numbers.
    """
    with torch.autocast(x.device.type, enabled=False):
        return model(x).float()
