"""Calibration of a classifier's confidences: expected calibration error (ECE) and negative log-likelihood.

Distillation changes how confident a student is as much as how often it is right (a temperature-softened
teacher is a target with calibrated mass on the wrong classes), so accuracy alone hides half the effect.
ECE (Guo et al., ICML 2017) with 15 equal-width confidence bins is the figure the literature reports.

The binned statistics are kept as a small tensor of *sums* (count, sum of confidences, number correct per
bin) rather than as per-sample values, so that:

- a training loop can accumulate them batch by batch on the device, without a host sync per batch;
- data-parallel workers can ``all_reduce`` (sum) them, after which :func:`ece_from_bins` gives the ECE of
  the whole evaluation set, exactly as if one process had seen every sample.

Pure PyTorch: nothing here imports Ray, MLflow or the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BINS = 15  # Guo et al.'s choice, used by most distillation and calibration papers

COUNT, CONFIDENCE, CORRECT = 0, 1, 2  # the columns of a calibration_bins tensor


def calibration_bins(logits: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> Tensor:
    """Per confidence bin: ``[count, sum of confidences, number correct]``, a float64 ``(bins, 3)`` tensor.

    The confidence of a sample is its maximum softmax probability; its prediction the argmax. Bins are
    equal-width over [0, 1]: bin ``b`` holds confidences in ``(b / bins, (b + 1) / bins]``, the first
    bin also holds 0. Sums rather than means, so tensors of several batches or workers add up to the
    tensor of their union (``torch.distributed.all_reduce`` then :func:`ece_from_bins`).

    Computed on ``logits``' device with no host synchronization (``bucketize`` + ``index_add_``), so a
    training loop may call it every batch. The softmax runs in float64 (logits of any dtype are upcast), so
    which bin a confidence falls in does not hang on float32 rounding, and sums over many batches stay exact.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    probs = torch.softmax(logits.detach().to(torch.float64), dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels.to(prediction.device)).to(torch.float64)
    # Interior edges only: bucketize(right=False) puts x <= edge[0] (0 included) in bin 0,
    # edge[b-1] < x <= edge[b] in bin b, and x > edge[-1] (up to 1) in the last bin.
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=logits.device)[1:-1]
    index = torch.bucketize(confidence, edges, right=False)
    values = torch.stack([torch.ones_like(confidence), confidence, correct], dim=1)
    return torch.zeros(bins, 3, dtype=torch.float64, device=logits.device).index_add_(0, index, values)


def ece_from_bins(bins: Tensor) -> float:
    """Expected calibration error as a fraction in [0, 1] (not percent), from :func:`calibration_bins` sums.

    ``sum_b (n_b / N) * |accuracy_b - confidence_b|``, which is ``sum_b |correct_b - confidence_sum_b| / N``:
    empty bins contribute nothing. Reads one number back to the host. Raises ValueError for no samples,
    whose ECE is undefined (0 would read as perfectly calibrated).
    """
    bins = bins.to(torch.float64)
    total = bins[:, COUNT].sum()
    if float(total) <= 0:
        raise ValueError("no samples: the ECE of an empty set is undefined")
    return float((bins[:, CORRECT] - bins[:, CONFIDENCE]).abs().sum() / total)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> float:
    """ECE (fraction in [0, 1]) of ``logits`` against ``labels`` with ``bins`` equal-width confidence bins."""
    return ece_from_bins(calibration_bins(logits, labels, bins))


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats: cross-entropy of the softmax, in float32.

    Unlike ECE it is a proper scoring rule, so it also rewards confidence that is both calibrated and
    sharp; it is reported beside ECE for that reason.
    """
    return float(F.cross_entropy(logits.detach().float(), labels.to(logits.device).long(), reduction="mean"))
