"""Distillation losses as pure functions of logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each sample's logits over the class dimension, in float32.

    Logit standardization (Sun et al., CVPR 2024): ``(z - mean(z)) / (std(z) + 1e-7)``, with the
    unbiased std of the reference code. The result does not depend on a per-sample shift or
    positive scale of the logits, so the student need not match the teacher's logit range.
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + 1e-7)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient scale independent of the temperature.
    """
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    return soft_target_loss(student_logits, target, temperature)


def soft_target_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(target || softmax(s/T))`` for an arbitrary target distribution, batch-mean."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, target_probs.float(), reduction="batchmean")
    return kl * temperature**2


def mixed_cross_entropy(
    logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """Cross-entropy against the mixup label ``lam * y_a + (1 - lam) * y_b``.

    ``lam`` may be a tensor on the logits' device; it is never compared on the host (that would
    wait for the GPU). ``lam = 1`` gives exactly ``CE(logits, y_a)``.
    """
    logits = logits.float()
    return lam * F.cross_entropy(logits, y_a) + (1.0 - lam) * F.cross_entropy(logits, y_b)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the binary KL between the teacher's and student's target-class vs rest
    probabilities; NCKD is the KL between their distributions over the non-target classes.
    Both are scaled by ``T^2`` and averaged over the batch, as in the reference code.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    gt_mask = F.one_hot(target, num_classes=s.shape[1]).bool()

    p_s = F.softmax(s, dim=1)
    p_t = F.softmax(t, dim=1)
    b_s = torch.stack([(p_s * gt_mask).sum(1), (p_s * ~gt_mask).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt_mask).sum(1), (p_t * ~gt_mask).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s.clamp_min(1e-12)), b_t, reduction="sum") / s.shape[0]

    # Masking the target logit with a large negative value leaves a softmax over the other classes.
    s_nt = s.masked_fill(gt_mask, -1e4)
    t_nt = t.masked_fill(gt_mask, -1e4)
    nckd = F.kl_div(F.log_softmax(s_nt, dim=1), F.softmax(t_nt, dim=1), reduction="sum") / s.shape[0]

    return (alpha * tckd + beta * nckd) * temperature**2
