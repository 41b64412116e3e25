"""stkd.calibration: ECE from summable per-bin sums, and NLL, on toy sets whose answers are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from stkd.calibration import (calibration_bins, ece_from_bins, expected_calibration_error,
                              negative_log_likelihood)


def two_class(confidence: float, n: int, n_correct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` two-class samples whose max softmax probability is exactly ``confidence`` (> 0.5): logits
    ``[0, log(p / (1 - p))]`` give softmax ``[1 - p, p]``; the first ``n_correct`` are labelled 1 (right)."""
    logits = torch.tensor([[0.0, math.log(confidence / (1 - confidence))]] * n, dtype=torch.float64)
    labels = torch.tensor([1] * n_correct + [0] * (n - n_correct))
    return logits, labels


def joined(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_the_toy_logits_give_the_confidences_asked_for():
    logits, _ = two_class(0.9, 3, 3)
    assert torch.softmax(logits, 1).max(1).values.tolist() == pytest.approx([0.9] * 3, abs=1e-15)


def test_a_perfectly_calibrated_set_has_zero_ece():
    # Bin (0.867, 0.933]: 10 samples at 0.9, 9 right; bin (0.667, 0.733]: 10 at 0.7, 7 right.
    logits, labels = joined(two_class(0.9, 10, 9), two_class(0.7, 10, 7))
    bins = calibration_bins(logits, labels)
    assert bins.dtype == torch.float64 and bins.shape == (15, 3)
    assert bins[13].tolist() == pytest.approx([10, 9.0, 9]) and bins[10].tolist() == pytest.approx([10, 7.0, 7])
    assert bins[:, 0].sum() == 20 and bins[[b for b in range(15) if b not in (10, 13)]].abs().sum() == 0
    assert ece_from_bins(bins) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)


def test_an_over_confident_set_matches_the_hand_computation():
    # 10 samples at confidence 0.9 with 6 right (bin 13: accuracy 0.6), 4 at 0.65 with 2 right (bin 9,
    # (0.6, 0.667]: accuracy 0.5). N = 14:
    # ECE = 10/14 * |0.6 - 0.9| + 4/14 * |0.5 - 0.65| = (3.0 + 0.6) / 14 = 0.2571428...
    logits, labels = joined(two_class(0.9, 10, 6), two_class(0.65, 4, 2))
    expected = 10 / 14 * abs(0.6 - 0.9) + 4 / 14 * abs(0.5 - 0.65)
    assert expected == pytest.approx(3.6 / 14)
    bins = calibration_bins(logits, labels)
    assert bins[13].tolist() == pytest.approx([10, 9.0, 6]) and bins[9].tolist() == pytest.approx([4, 2.6, 2])
    assert ece_from_bins(bins) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-12)
    # With 2 bins, (0.5, 1] holds all 14: accuracy 8/14, mean confidence (9 + 2.6)/14.
    assert expected_calibration_error(logits, labels, bins=2) == pytest.approx(abs(8 - 11.6) / 14, abs=1e-12)


def test_bins_of_two_halves_sum_to_the_bins_of_the_whole():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (1000,), generator=generator)
    whole = calibration_bins(logits, labels)
    halves = calibration_bins(logits[:400], labels[:400]) + calibration_bins(logits[400:], labels[400:])
    assert torch.allclose(halves, whole, rtol=0, atol=1e-9)
    assert ece_from_bins(halves) == pytest.approx(expected_calibration_error(logits, labels), abs=1e-12)
    assert whole[:, 0].sum() == 1000
    assert whole[:, 2].sum() == (logits.argmax(1) == labels).sum()


def test_edges_zero_and_one_and_float32_logits():
    # Confidence 1.0 (a saturated softmax) is in the last bin; float32 and bf16 logits are accepted.
    logits = torch.tensor([[0.0, 200.0], [0.0, 200.0]], dtype=torch.bfloat16)
    bins = calibration_bins(logits, torch.tensor([1, 0]))
    assert bins[-1].tolist() == pytest.approx([2, 2.0, 1])
    assert ece_from_bins(bins) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        ece_from_bins(torch.zeros(15, 3, dtype=torch.float64))


def test_nll_matches_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 7, generator=generator) * 2
    labels = torch.randint(0, 7, (64,), generator=generator)
    assert negative_log_likelihood(logits, labels) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    # By hand for one two-class sample at confidence 0.8, wrong: -log(0.2) nats.
    logits, labels = two_class(0.8, 1, 0)
    assert negative_log_likelihood(logits, labels) == pytest.approx(-math.log(0.2), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_bins_stay_on_the_device_and_agree_with_the_cpu():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4096, 100, generator=generator) * 4
    labels = torch.randint(0, 100, (4096,), generator=generator)
    on_gpu = calibration_bins(logits.cuda(), labels.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), calibration_bins(logits, labels), rtol=0, atol=1e-9)
