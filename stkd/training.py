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
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``forward_train`` (under ``autocast``), the summed loss terms backpropagated, one optimizer
    step. Returns the student's logits and the weighted loss terms, for logging. ``indices``: the batch's
    indices in the training set, for a method that needs them (``Method.needs_indices``, CRD)."""
    with autocast():
        logits, terms = forward_train(method, x, y, indices)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, terms


def scaled_train_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], ContextManager],
    scaler: torch.amp.GradScaler,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """:func:`train_step` for fp16: the loss is scaled for the backward pass, the gradients unscaled before
    the optimizer step, and a step whose gradients hold inf/nan is skipped by the scaler. The returned
    terms are the unscaled ones; the third value is a 0-d device tensor, 1.0 when the step was skipped.

    A skipped step is read from the scale shrinking in ``update()`` (it backs off only on inf/nan), on
    the device: ``GradScaler.step`` already waits for the GPU once per step (it reads ``found_inf`` on the
    host), and ``get_scale()`` would add a second wait.
    """
    with autocast():
        logits, terms = forward_train(method, x, y, indices)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    scaled = scaler.scale(loss)
    scale_before = scaler._scale.clone()  # private: the public get_scale() syncs with the host
    scaled.backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, terms, (scaler._scale < scale_before).float()


def forward_train(method: Method, x: torch.Tensor, y: torch.Tensor,
                  indices: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``method.forward_train``, given the batch's indices only when there are some: the methods that need
    none keep the two-argument signature of the "Adding a method" contract."""
    if indices is None:
        return method.forward_train(x, y)
    return method.forward_train(x, y, indices=indices)


def eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits with autocast switched off.

    The project's one precision policy for accuracy: teachers and students are evaluated in fp32,
    whatever precision trained them (bf16 autocast is a training-speed setting only), so a student's
    accuracy and its teacher's are measured the same way and match fp32 published numbers.
    """
    with torch.autocast(x.device.type, enabled=False):
        return model(x).float()
