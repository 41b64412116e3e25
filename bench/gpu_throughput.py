"""STKD training throughput on one GPU: the classic CIFAR KD loop against this project's step, same run.

(a) ``classic``, the loop as RepDistiller (``helper/loops.py``, ``dataset/cifar100.py``) and mdistiller
    write it: a Dataset that crops (pad 4), flips, converts and normalizes one image at a time, a
    DataLoader with worker processes (8, RepDistiller's default), fp32, a ``.cuda()`` per batch, the
    teacher's forward under ``no_grad``, mixup drawn as the classic mixup code draws it
    (``np.random.beta``, ``torch.randperm(n).cuda()``), and a ``loss.item()`` per step for the meters.
    The per-image transforms are NumPy stand-ins for torchvision's RandomCrop(32, 4),
    RandomHorizontalFlip, ToTensor and Normalize (torchvision does not import beside this project's
    torch); they skip the PIL round trip RepDistiller makes, so if anything they flatter (a).
(b) ``classic_bf16_cl``, the same classic data path (per-image DataLoader, ``.cuda()``, ``loss.item()``) with
    the project's arithmetic: bf16 autocast and channels_last models and inputs. Set beside (a) and (c), it
    splits the speed-up into what precision and memory format give and what the data path gives.
(c) ``project``, this project's worker step: the training images as uint8 in GPU memory
    (``pipeline.data.feeds.InMemoryFeed``), batched crop/flip and normalization (``pipeline.train.worker_loop.InputTransform``)
    with generators on the GPU, bf16 autocast, channels_last, and ``pipeline.train.worker_loop.train_batch`` (sums
    kept on the device, no host sync per step). With ``--compile`` also ``project_compile`` (the student
    under ``torch.compile``, default mode) and, on CUDA, ``project_compile_cudagraphs``
    (``mode="reduce-overhead"``: CUDA graphs replay the student's kernels without launching each one).

Fairness: ``torch.backends.cudnn.benchmark = True`` for every variant (the batch shape is fixed, so cuDNN's
autotuner picks each loop's fastest convolutions); the variants run in turn, ``--repeats`` rounds, the
order reversed every other round (so none always runs first, on a cold GPU, or last, on a hot one), and
each variant's figure is the median of its rounds, its every round kept beside it.

Both train STKD (T 4, CE weight 0.1, KD weight 0.9, mixup alpha 1) with SGD (lr 0.05, momentum 0.9,
wd 5e-4), batch 64, on synthetic CIFAR-100-shaped data (50,000 uint8 32x32x3 images, 100 classes:
the cost of a step does not depend on the pixels) with an untrained teacher, for resnet56 -> resnet20
and resnet32x4 -> resnet8x4. Each loop runs ``--warmup`` steps, then ``--steps`` timed steps between two
``torch.cuda.synchronize()``; reported: images/s, peak GPU memory of the loop (``max_memory_allocated``;
for (c) it includes the dataset held on the GPU), and the ratios project / classic (goal: >= 5x),
classic_bf16_cl / classic (precision and layout) and project / classic_bf16_cl (the data path).

    python bench/gpu_throughput.py [--steps 300] [--warmup 30] [--repeats 3] [--compile] [--workers 8]
    python bench/gpu_throughput.py --cpu-smoke      # a few tiny steps on the CPU: checks the script only

Writes ``bench/results/gpu_throughput.json`` (``gpu_throughput_cpu_smoke.json`` for the smoke mode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.feeds import InMemoryFeed
from pipeline.train.worker_loop import EpochSums, InputTransform, train_batch
from stkd import methods, models
from stkd.losses import kd_loss, mixed_cross_entropy
from stkd.precision import Precision

PAIRS = [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")]
STKD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "mixup_alpha": 1.0}
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # CIFAR-100, as RepDistiller writes them


class PerImageCIFAR(Dataset):
    """uint8 NHWC images through per-image RandomCrop(pad) + RandomHorizontalFlip + ToTensor + Normalize."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, padding: int = 4) -> None:
        self.images, self.labels, self.padding = images, labels, padding
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img, p = self.images[i], self.padding
        h, w = img.shape[:2]
        top, left = np.random.randint(0, 2 * p + 1, size=2)
        img = np.pad(img, ((p, p), (p, p), (0, 0)))[top:top + h, left:left + w]
        if np.random.rand() < 0.5:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255)
        return (x - self.mean) / self.std, int(self.labels[i])


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[torch.Tensor]:
    """RepDistiller's ``helper/util.accuracy``: top-k hit rates (%) of a batch."""
    with torch.no_grad():
        _, pred = output.topk(max(topk), 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)) for k in topk]


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def classic_loop(student, teacher, images, labels, device, batch_size, workers, bf16: bool = False,
                 channels_last: bool = False) -> Callable[[], None]:
    """One step of (a) per call: the next batch from the DataLoader, to the GPU, STKD, meters. With ``bf16``
    and ``channels_last``, variant (b): the same data path, the project's arithmetic."""
    loader = DataLoader(PerImageCIFAR(images, labels), batch_size=batch_size, shuffle=True, num_workers=workers)
    batches = endless(loader)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), **SGD)
    student.train()
    teacher.eval()
    meters = {"loss": 0.0, "top1": 0.0, "seen": 0}
    amp = Precision.create("bf16" if bf16 else "fp32", device.type)

    def step() -> None:
        x, y = next(batches)
        x, y = x.float().to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lam = np.random.beta(STKD["mixup_alpha"], STKD["mixup_alpha"])
        index = torch.randperm(x.size(0)).to(device)
        mixed = lam * x + (1 - lam) * x[index]
        with amp.autocast():
            logit_s = student(mixed)
            with torch.no_grad():
                logit_t = teacher(mixed)
        logit_s, logit_t = logit_s.float(), logit_t.float()
        loss = (STKD["ce_weight"] * mixed_cross_entropy(logit_s, y, y[index], lam)
                + STKD["kd_weight"] * kd_loss(logit_s, logit_t, STKD["temperature"]))
        acc1, _ = accuracy(logit_s, y)
        meters["loss"] += loss.item() * x.size(0)
        meters["top1"] += acc1[0] * x.size(0)
        meters["seen"] += x.size(0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def project_loop(student, teacher, images, labels, device, batch_size, bf16, channels_last,
                 compile_mode: str | None = None) -> Callable[[], None]:
    """One step of (c) per call: this project's worker step on a batch already in GPU memory.
    ``compile_mode``: None (eager), ``"default"`` or ``"reduce-overhead"`` (CUDA graphs) for ``torch.compile``."""
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    cudagraphs = compile_mode == "reduce-overhead"
    if compile_mode is not None:
        student = torch.compile(student, mode=compile_mode)
    augment, draws = (torch.Generator(device=device).manual_seed(s) for s in (1, 2))
    method = methods.create("stkd", student, teacher, generator=draws, **STKD)
    method.train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), **SGD)
    feed = InMemoryFeed(images, labels, batch_size, 0, 1, device, shuffle=True, seed=0)
    step_input = InputTransform(MEAN, STD, 4, True, channels_last, augment)
    sums = EpochSums(method.term_names(), device)

    amp = Precision.create("bf16" if bf16 else "fp32", device.type)

    def epochs() -> Iterator:
        epoch = 0
        while True:
            yield from feed.batches(epoch)
            epoch += 1

    batches = epochs()

    def step() -> None:
        x, y = next(batches)
        if cudagraphs:
            # A new iteration: the graphs may overwrite the previous step's outputs (none is kept across steps).
            torch.compiler.cudagraph_mark_step_begin()
        train_batch(method, optimizer, step_input, x, y, amp, sums)

    return step


def measure(step: Callable[[], None], device: torch.device, warmup: int, steps: int, batch_size: int) -> dict[str, Any]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    out = {"images": steps * batch_size, "seconds": seconds, "images_per_s": steps * batch_size / seconds}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def fresh_pair(teacher_name: str, student_name: str, classes: int, device: torch.device):
    torch.manual_seed(0)
    teacher = models.create(teacher_name, classes).to(device)
    student = models.create(student_name, classes).to(device)
    return student, teacher


def variants(compile_student: bool, device: torch.device) -> list[str]:
    names = ["classic", "classic_bf16_cl", "project"]
    if compile_student:
        names.append("project_compile")
        if device.type == "cuda":  # CUDA graphs exist on CUDA only
            names.append("project_compile_cudagraphs")
    return names


def round_orders(names: list[str], repeats: int) -> list[list[str]]:
    """The variants' order in each round: as listed, then reversed, alternately."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(repeats)]


def make_step(variant: str, student, teacher, images, labels, device, args, bf16: bool) -> Callable[[], None]:
    if variant == "classic":
        return classic_loop(student, teacher, images, labels, device, args.batch_size, args.workers)
    if variant == "classic_bf16_cl":
        return classic_loop(student, teacher, images, labels, device, args.batch_size, args.workers, bf16=bf16,
                            channels_last=True)
    mode = {"project": None, "project_compile": "default", "project_compile_cudagraphs": "reduce-overhead"}[variant]
    return project_loop(student, teacher, images, labels, device, args.batch_size, bf16, True, mode)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["images_per_s"] for r in rounds]
    out: dict[str, Any] = {"images_per_s": statistics.median(rates), "images_per_s_rounds": rates,
                           "spread": (max(rates) - min(rates)) / statistics.median(rates)}
    if "peak_gpu_mib" in rounds[0]:
        out["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per loop before timing")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants, order reversed every other")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=50_000, help="synthetic training images")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes of the classic loops")
    parser.add_argument("--compile", action="store_true",
                        help="also the project loop with torch.compile, without and (CUDA) with CUDA graphs")
    parser.add_argument("--no-bf16", action="store_true", help="bf16 variants in fp32 (default: bf16 autocast)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a few tiny steps on the CPU: checks that the script runs, measures nothing")
    parser.add_argument("--result-name", default=None)
    args = parser.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        # Tiny and fp32 (CPU bf16 convolutions are slow): this mode keeps the script from rotting, no more.
        args.steps, args.warmup, args.batch_size, args.images, args.workers = 2, 0, 8, 64, 1
        args.repeats = min(args.repeats, 2)
        args.no_bf16, size = True, 16
        result_name = args.result_name or "gpu_throughput_cpu_smoke"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        size = 32
        result_name = args.result_name or "gpu_throughput"
        # Every variant's batch shape is fixed: let cuDNN time its algorithms once per shape and keep the fastest.
        torch.backends.cudnn.benchmark = True
    else:
        sys.exit("bench/gpu_throughput.py needs a CUDA GPU; --cpu-smoke checks the script on the CPU")
    bf16 = not args.no_bf16
    names = variants(args.compile, device)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, args.classes, args.images).astype(np.int64)

    results = {}
    for teacher_name, student_name in PAIRS:
        pair = f"{teacher_name}->{student_name}"
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r, order in enumerate(round_orders(names, args.repeats)):
            for variant in order:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                student, teacher = fresh_pair(teacher_name, student_name, args.classes, device)
                step = make_step(variant, student, teacher, images, labels, device, args, bf16)
                result = measure(step, device, args.warmup, args.steps, args.batch_size)
                rounds[variant].append(result)
                del step, student, teacher
                print(f"{pair} round {r + 1} {variant}: {result['images_per_s']:.0f} images/s"
                      + (f", peak {result['peak_gpu_mib']:.0f} MiB" if device.type == "cuda" else ""), flush=True)
        results[pair] = {name: summarize(rounds[name]) for name in names}
        rate = {name: results[pair][name]["images_per_s"] for name in names}
        results[pair]["speedup"] = rate["project"] / rate["classic"]
        results[pair]["speedup_precision_layout"] = rate["classic_bf16_cl"] / rate["classic"]
        results[pair]["speedup_data_path"] = rate["project"] / rate["classic_bf16_cl"]
        for name in names[3:]:
            results[pair][f"speedup_{name}"] = rate[name] / rate["classic"]
        print(f"{pair}: project / classic = {results[pair]['speedup']:.2f}x (precision and layout "
              f"{results[pair]['speedup_precision_layout']:.2f}x, data path {results[pair]['speedup_data_path']:.2f}x)",
              flush=True)

    precision_name = "bf16 autocast" if bf16 else "fp32"
    settings = {"device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "smoke": args.cpu_smoke, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                "repeats": args.repeats, "order": "as listed, reversed every other round", "variants": names,
                "images": args.images, "image_size": size, "classes": args.classes, "classic_workers": args.workers,
                "precision": {"classic": "fp32", "classic_bf16_cl": precision_name, "project": precision_name},
                "channels_last": {"classic": False, "classic_bf16_cl": True, "project": True},
                "cudnn_benchmark": device.type == "cuda", "compile": args.compile, "stkd": STKD, "sgd": SGD}
    payload: dict[str, Any] = {
        "description": "STKD training throughput, same device, one run: (a) classic per-image DataLoader loop "
                       "(RepDistiller/mdistiller style, fp32), (b) the same data path in bf16 + channels_last, (c) "
                       "this project's step (uint8 data in device memory, batched augmentation, bf16 autocast, "
                       "channels_last), optionally compiled; medians over alternating rounds; synthetic "
                       "CIFAR-100-shaped data",
        "settings": settings, "results": results}
    if not args.cpu_smoke:
        payload["target"] = {"speedup_min": 5.0, "met": all(r["speedup"] >= 5.0 for r in results.values())}
    common.write_result(result_name, payload)


if __name__ == "__main__":
    main()
