"""The CUDA path without a GPU: resume onto a non-CPU device, device generators that resume exactly,
SyncBatchNorm's switch and the fp32 evaluation policy (the GPU benchmark's CPU mode: tests/test_gpu_check.py). The tests marked
"needs CUDA" are the GPU-only checks: they run wherever CUDA is available and are skipped here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline import config as config_lib
from pipeline.train import checkpoint, teachers
from pipeline.config import ConfigError
from pipeline.data.feeds import InMemoryFeed
from pipeline.train.worker_loop import (EpochSums, InputTransform, build_student, evaluate, gather_rng_states, make_generators,
                                 make_scheduler, resolve_sync_bn, restore, train_batch)
from stkd import methods, models
from stkd.mixup import mix
from stkd.precision import Precision

CPU = torch.device("cpu")
OPTIM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "epochs": 4, "schedule": "multistep",
         "milestones": [2], "gamma": 0.1, "warmup_epochs": 0}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU-only check)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def uint8_batches(count: int, n: int = 8, size: int = 16, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
             torch.randint(0, classes, (n,), generator=g)) for _ in range(count)]


class Run:
    """What a worker builds before its first epoch: student, method, optimizer, scheduler, step."""

    def __init__(self, device: torch.device, name: str = "stkd", channels_last: bool = False, seed: int = 0,
                 **hparams):
        torch.manual_seed(seed)
        self.spec = checkpoint.model_spec("resnet8", 10, 3)
        self.student = build_student(self.spec, device, channels_last, sync_bn=False)
        torch.manual_seed(100)
        teacher = None if name == "ce" else models.create("resnet8", 10).to(device)
        if teacher is not None and channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.generators = make_generators(device, seed, rank=0)
        self.method = methods.create(name, self.student, teacher, generator=self.generators["method"],
                                     architectures=("resnet8", "resnet8"), image_shape=(3, 32, 32), **hparams)
        self.optimizer = torch.optim.SGD(self.method.trainable_parameters(), lr=0.1, momentum=0.9)
        self.scheduler = make_scheduler(self.optimizer, OPTIM)
        self.step = InputTransform([0.5, 0.4, 0.3], [0.25, 0.25, 0.25], 4, True, channels_last, self.generators["augment"])
        self.method.train()

    def train(self, batches, amp: Precision | None = None) -> EpochSums:
        device = next(self.student.parameters()).device
        amp = amp or Precision.create("fp32", device.type)
        sums = EpochSums(self.method.term_names(), device)
        for images, labels in batches:
            train_batch(self.method, self.optimizer, self.step, images, labels, amp, sums)
        return sums

    def state(self) -> dict:
        return {"model": self.spec, "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": 0, "history": [], "selection": {},
                "rng": gather_rng_states(self.generators, 1, self.generators["method"].device),
                "method": self.method.own_state_dict()}


def test_resume_onto_a_non_cpu_device_restores_cpu_generator_states(tmp_path):
    # A checkpoint written by a run; the resuming run's student lives on `meta`, standing in for CUDA.
    run = Run(CPU)
    run.train(uint8_batches(2))
    saved = run.state()
    checkpoint.save(saved, tmp_path)

    # What the loop did before: loading with map_location=<the device> puts the RNG states there too.
    on_device = checkpoint.load(tmp_path, map_location="meta")["rng"]["augment"][0]
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.Generator().set_state(on_device)

    student = models.create("resnet8", 10).to("meta")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer, OPTIM)
    generators = make_generators(CPU, seed=5, rank=0)  # other seeds: the states must come from the file
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        state = restore(str(tmp_path), student, optimizer, scheduler, generators, rank=0)

    for key, generator in generators.items():
        assert torch.equal(generator.get_state(), saved["rng"][key][0])
        assert state["rng"][key][0].device.type == "cpu" and state["rng"][key][0].dtype == torch.uint8
    buffers = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert buffers and all(b.device.type == "meta" for b in buffers)  # moved to the parameters' device
    assert scheduler.last_epoch == saved["scheduler"]["last_epoch"]


@pytest.mark.parametrize("name", ["stkd", "fitnet"])  # fitnet: a regressor trained beside the student
def test_interrupted_and_resumed_training_equals_an_uninterrupted_run(name, tmp_path):
    batches = uint8_batches(4)
    whole = Run(CPU, name)
    whole.train(batches)

    first = Run(CPU, name)
    first.train(batches[:2])
    checkpoint.save(first.state(), tmp_path)
    resumed = Run(CPU, name)  # a fresh worker: same seeds, so only the checkpoint can put it at step 3
    restore(str(tmp_path), resumed.student, resumed.optimizer, resumed.scheduler, resumed.generators, rank=0,
            method=resumed.method)
    resumed.train(batches[2:])

    for (key, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), key
    for (key, a), b in zip(whole.method.own_state_dict().get("regressor", {}).items(),
                           resumed.method.own_state_dict().get("regressor", {}).values()):
        assert torch.equal(a, b), key
    for key in ("augment", "method"):
        assert torch.equal(whole.generators[key].get_state(), resumed.generators[key].get_state())


def test_device_generators_reproduce_augmentation_and_mixup():
    images = uint8_batches(1)[0][0]
    outputs = []
    for _ in range(2):
        run = Run(CPU)
        x = run.step.train_input(images)
        outputs.append((x, *mix(x, 1.0, run.generators["method"])))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    assert outputs[0][0].shape == (8, 3, 16, 16)


def test_epoch_sums_add_up_on_the_device_and_read_once():
    sums = EpochSums(("ce", "kd"), CPU)
    sums.add({"ce": torch.tensor(1.5), "kd": torch.tensor(0.5)}, torch.tensor(3.0), 4)
    sums.add({"ce": torch.tensor(1.0), "kd": torch.tensor(0.25)}, torch.tensor(2.0), 2)
    assert sums.totals() == [1.5 * 4 + 1.0 * 2, 0.5 * 4 + 0.25 * 2, 0.0, 5.0, 6.0]  # terms, skipped, correct, seen


def test_sync_bn_resolution_and_conversion():
    cuda, cpu = torch.device("cuda"), CPU
    assert resolve_sync_bn("auto", cuda, 4) and not resolve_sync_bn("auto", cuda, 1)
    assert not resolve_sync_bn("auto", cpu, 4)
    assert resolve_sync_bn(True, cuda, 1) and not resolve_sync_bn(False, cuda, 4)

    spec = checkpoint.model_spec("resnet8", 10, 3)
    plain = build_student(spec, cpu, channels_last=False, sync_bn=False)
    synced = build_student(spec, cpu, channels_last=False, sync_bn=True)
    bn = [type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and set(bn) == {torch.nn.SyncBatchNorm}
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    # Same parameter and buffer names: a checkpoint loads into either.
    synced.load_state_dict(plain.state_dict())


def resolved(**train) -> dict:
    raw = config_lib.merge(config_lib.DEFAULTS, {"data": {"path": "/data"}, "model": {"student": "resnet8"},
                                                 "train": train})
    return config_lib.validate(raw)


def test_sync_bn_forced_on_the_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.sync_bn: PyTorch's SyncBatchNorm runs on GPUs only"):
        resolved(sync_bn=True)
    with pytest.raises(ConfigError, match="train.sync_bn: expected true, false or 'auto'"):
        resolved(sync_bn="always")
    assert resolved(sync_bn=True, use_gpu=True)["train"]["sync_bn"] is True
    assert resolved()["train"]["sync_bn"] == "auto"


def test_students_and_teachers_are_evaluated_alike_in_fp32():
    torch.manual_seed(0)
    model = models.create("resnet8", 10)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int64)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]
    dtypes = []
    model.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    step = InputTransform(mean, std, 4, True, False, torch.Generator())
    feed = InMemoryFeed(images, labels, 16, 0, 1, CPU, shuffle=False)
    # Even inside a bf16 autocast region (as training runs on a GPU), evaluation runs in fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_top1 = evaluate(model, feed, step, "test")["test/top1"]
        teacher_top1 = teachers.accuracy(model, images, labels, mean, std, batch_size=16)
    assert dtypes and set(dtypes) == {torch.float32}
    assert student_top1 == pytest.approx(teacher_top1, abs=1e-9)


@needs_cuda
@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "stkd"])
def test_a_training_step_on_cuda_never_waits_for_the_gpu(name):
    device = torch.device("cuda")
    run = Run(device, name, channels_last=True)
    batches = [(x.to(device), y.to(device)) for x, y in uint8_batches(4)]

    amp = Precision.create("bf16", "cuda")
    run.train(batches[:1], amp)  # first-call set-up (cuDNN, allocator) is not the steady state
    sums = EpochSums(run.method.term_names(), device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for images, labels in batches[1:]:
            train_batch(run.method, run.optimizer, run.step, images, labels, amp, sums)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    totals = sums.totals()
    assert totals[-1] == 24 and all(np.isfinite(totals))


@needs_cuda
def test_stkd_with_clean_kd_on_cuda_never_waits_for_the_gpu():
    device = torch.device("cuda")
    run = Run(device, "stkd", channels_last=True, clean_kd_weight=0.5, teacher_target="mixed_output")
    images, labels = (t.to(device) for t in uint8_batches(1)[0])
    run.train([(images, labels)])
    sums = EpochSums(run.method.term_names(), device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_batch(run.method, run.optimizer, run.step, images, labels, Precision.create("fp32", "cuda"), sums)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.totals()[-1] == 8


@needs_cuda
def test_resume_on_cuda_equals_an_uninterrupted_cuda_run(tmp_path):
    device = torch.device("cuda")
    batches = [(x.to(device), y.to(device)) for x, y in uint8_batches(4)]
    whole = Run(device)
    whole.train(batches)
    first = Run(device)
    first.train(batches[:2])
    checkpoint.save(first.state(), tmp_path)
    resumed = Run(device)
    restore(str(tmp_path), resumed.student, resumed.optimizer, resumed.scheduler, resumed.generators, rank=0)
    resumed.train(batches[2:])
    # cuDNN's and index_add's atomics may differ in the last bits; a wrong random stream differs entirely.
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

