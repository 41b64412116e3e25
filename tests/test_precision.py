"""Precision by hardware: what ``auto`` resolves to on every device kind, the refusals, the fp16 loss-scaled
step (skips counted, scaler state through a checkpoint) and a bf16 CPU step. The resolvers take the
device's facts as arguments, so every CUDA generation is checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint
from pipeline.train.worker_loop import EpochSums, InputTransform, train_batch
from stkd import methods, models
from stkd.precision import (Precision, PrecisionError, cpu_has_native_bf16, resolve_channels_last,
                            resolve_precision)
from stkd.training import scaled_train_step


@pytest.mark.parametrize("device_type,capability,cpu_bf16,expected", [
    ("cpu", None, True, "bf16"),     # AVX512-BF16 / AMX
    ("cpu", None, False, "fp32"),    # bf16 would be emulated: slower than fp32
    ("cuda", (7, 0), False, "fp16"),  # V100
    ("cuda", (7, 5), False, "fp16"),  # T4, RTX 20xx
    ("cuda", (8, 0), False, "bf16"),  # A100
    ("cuda", (9, 0), False, "bf16"),  # H100 / H200
    ("mps", None, False, "fp32"),
])
def test_auto_resolves_by_hardware(device_type, capability, cpu_bf16, expected):
    assert resolve_precision("auto", device_type, capability, cpu_native_bf16=cpu_bf16) == expected


@pytest.mark.parametrize("requested,device_type,capability,cpu_bf16,needle", [
    ("bf16", "cuda", (7, 5), False, "bf16 needs compute capability 8.0 or newer, and Tesla T4 has 7.5"),
    ("bf16", "cpu", None, False, "Tesla T4 has no native bf16"),
    ("fp16", "cpu", None, True, "fp16 trains on CUDA devices only"),
    ("fp8", "cuda", (9, 0), False, "expected one of auto, bf16, fp16, fp32"),
])
def test_what_a_device_cannot_run_is_refused_naming_it(requested, device_type, capability, cpu_bf16, needle):
    with pytest.raises(PrecisionError, match="train.precision") as info:
        resolve_precision(requested, device_type, capability, cpu_native_bf16=cpu_bf16, device_name="Tesla T4")
    assert needle in str(info.value)


@pytest.mark.parametrize("requested,device_type,capability", [
    ("fp32", "cuda", (9, 0)), ("fp16", "cuda", (9, 0)), ("bf16", "cuda", (8, 6)), ("fp32", "cpu", None)])
def test_an_explicit_choice_the_device_runs_is_kept(requested, device_type, capability):
    assert resolve_precision(requested, device_type, capability, cpu_native_bf16=False) == requested


def test_channels_last_auto_follows_the_device_and_precision():
    assert resolve_channels_last("auto", "cuda", "fp16") is True
    assert resolve_channels_last("auto", "cpu", "bf16") is True
    assert resolve_channels_last("auto", "cpu", "fp32") is False
    assert resolve_channels_last(False, "cuda", "bf16") is False
    assert resolve_channels_last(True, "cpu", "fp32") is True


def test_this_cpus_bf16_is_read_from_torch_or_cpuinfo(monkeypatch):
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if hasattr(torch.cpu, "get_capabilities"):
        caps = torch.cpu.get_capabilities()
        assert cpu_has_native_bf16() == any(v is True for k, v in caps.items() if "bf16" in k)
        monkeypatch.delattr(torch.cpu, "get_capabilities")  # as on a torch without it
    if flags:
        assert cpu_has_native_bf16() == any("bf16" in word for line in flags.splitlines()
                                            if line.startswith(("flags", "Features")) for word in line.split())


def tiny_method(name: str = "kd"):
    torch.manual_seed(0)
    student = models.create("resnet8", 10)
    teacher = None if name == "ce" else methods.freeze(models.create("resnet8", 10))
    method = methods.create(name, student, teacher, generator=torch.Generator().manual_seed(0))
    method.train()
    return method, torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9)


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_fp16_step_counts_a_skipped_step_and_leaves_the_weights(tmp_path):
    # fp16 autocast with a GradScaler runs on the CPU too (a stand-in for a pre-Ampere GPU's path).
    method, optimizer = tiny_method()
    amp = Precision.create("fp16", "cpu")
    x, y = batch()
    logits, terms, skipped = scaled_train_step(method, optimizer, x, y, amp.autocast, amp.scaler)
    assert float(skipped) == 0.0 and all(torch.isfinite(v) for v in terms.values())
    scale = amp.scaler.get_scale()
    before = [p.detach().clone() for p in method.student.parameters()]
    # 1e6 overflows fp16 (max 65504): inf activations, inf gradients, the scaler skips the step.
    _, _, skipped = scaled_train_step(method, optimizer, x * 1e6, y, amp.autocast, amp.scaler)
    assert float(skipped) == 1.0
    assert amp.scaler.get_scale() == scale * 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, method.student.parameters()))


def test_fp16_terms_are_the_unscaled_loss():
    method, optimizer = tiny_method("ce")
    amp = Precision.create("fp16", "cpu")
    x, y = batch()
    _, terms, _ = scaled_train_step(method, optimizer, x, y, amp.autocast, amp.scaler)
    # An untrained 10-class net: cross-entropy near ln 10 = 2.3, nowhere near 65536 x that.
    assert 1.0 < float(terms["ce"].detach()) < 5.0


def test_the_scaler_state_goes_through_a_checkpoint(tmp_path):
    amp = Precision.create("fp16", "cpu")
    method, optimizer = tiny_method()
    x, y = batch()
    scaled_train_step(method, optimizer, x * 1e6, y, amp.autocast, amp.scaler)  # scale halves
    checkpoint.save({"model": checkpoint.model_spec("resnet8", 10, 3), "student": method.student.state_dict(),
                     "scaler": amp.scaler.state_dict()}, tmp_path)
    restored = Precision.create("fp16", "cpu")
    restored.scaler.load_state_dict(checkpoint.load(tmp_path)["scaler"])
    assert restored.scaler.get_scale() == amp.scaler.get_scale() == 65536.0 * 0.5


def test_train_batch_sums_skipped_steps_under_fp16():
    method, optimizer = tiny_method()
    amp = Precision.create("fp16", "cpu")
    step = InputTransform([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 2, True, False, torch.Generator().manual_seed(0))
    sums = EpochSums(method.term_names(), torch.device("cpu"))
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    train_batch(method, optimizer, step, images, labels, amp, sums)
    step.std = step.std * 1e-7  # normalization blows the inputs up past fp16's range
    train_batch(method, optimizer, step, images, labels, amp, sums)
    *terms, skipped, correct, seen = sums.totals()
    assert skipped == 1.0 and seen == 16


@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "stkd"])
def test_a_bf16_cpu_step_has_finite_terms(name):
    method, optimizer = tiny_method(name)
    amp = Precision.create("bf16", "cpu")
    step = InputTransform([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 2, True, True, torch.Generator().manual_seed(0))
    sums = EpochSums(method.term_names(), torch.device("cpu"))
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    train_batch(method, optimizer, step, images, torch.randint(0, 10, (8,)), amp, sums)
    totals = sums.totals()
    assert all(torch.isfinite(torch.tensor(totals))) and totals[-1] == 8
