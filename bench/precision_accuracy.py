"""Does CPU bf16 training cost accuracy? CE and KD resnet8 students in fp32 and in bf16 (+ channels_last, as
``train.precision=auto`` trains on a CPU with native bf16), 3 seeds each, the same budget, real CIFAR-10.

The worker's own pieces without Ray (``InMemoryFeed``, ``InputTransform``, ``train_batch``, ``evaluate``, the
schedule): what a one-worker run does per epoch. Data: a class-balanced subset of the JPEG CIFAR-10
(``--per-class`` train images per class; the whole 10,000-image test split). The teacher (resnet20, fp32)
is trained once on the same subset and shared by every KD student. Selection is not the question here:
test top-1 at the last epoch is compared, fp32 mean against bf16 mean, with the fp32 seed spread.

    python bench/precision_accuracy.py [--per-class 1000] [--epochs 15] [--seeds 0 1 2] [--threads 1]

Writes ``bench/results/precision_accuracy.json``; prints one line per run as it finishes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

from pipeline.data.feeds import InMemoryFeed
from pipeline.data.dataset import PreparedDataset
from pipeline.train.worker_loop import EpochSums, InputTransform, evaluate, make_generators, make_scheduler, train_batch
from stkd import methods, models
from stkd.precision import Precision

OPTIM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "schedule": "cosine",
         "milestones": [], "gamma": 0.1, "warmup_epochs": 0}
KD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}


def train(dataset: PreparedDataset, model: str, method_name: str, precision: str, seed: int, epochs: int,
          teacher: torch.nn.Module | None = None, batch_size: int = 64) -> tuple[torch.nn.Module, dict]:
    device = torch.device("cpu")
    channels_last = precision == "bf16"
    torch.manual_seed(seed)
    student = models.create(model, dataset.num_classes, in_channels=dataset.image_shape[2])
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    generators = make_generators(device, seed, 0)
    method = methods.create(method_name, student, teacher, generator=generators["method"],
                            **(KD if method_name == "kd" else {}))
    optim = {**OPTIM, "epochs": epochs}
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=optim["lr"], momentum=optim["momentum"],
                                weight_decay=optim["weight_decay"])
    scheduler = make_scheduler(optimizer, optim)
    step = InputTransform(dataset.mean, dataset.std, 4, True, channels_last, generators["augment"])
    amp = Precision.create(precision, "cpu")
    feed = InMemoryFeed.from_split(dataset, "train", batch_size, 0, 1, device, shuffle=True, seed=seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        method.set_epoch(epoch)
        method.train()
        sums = EpochSums(method.term_names(), device)
        for images, labels in feed.batches(epoch):
            train_batch(method, optimizer, step, images, labels, amp, sums)
        scheduler.step()
    train_s = time.perf_counter() - start
    test = InMemoryFeed.from_split(dataset, "test", 512, 0, 1, device, shuffle=False)
    metrics = evaluate(student, test, step)
    return student, {"test_top1": metrics["test/top1"], "train_s": train_s}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = PreparedDataset.open(common.prepare_subset(args.per_class), verify=False)
    teacher, teacher_result = train(dataset, "resnet20", "ce", "fp32", 100, args.teacher_epochs)
    teacher = methods.freeze(teacher)
    print(f"teacher resnet20 fp32: test top-1 {teacher_result['test_top1']:.2f} "
          f"({teacher_result['train_s']:.0f} s)", flush=True)
    runs = []
    for seed in args.seeds:
        for method_name in ("ce", "kd"):
            for precision in ("fp32", "bf16"):  # interleaved: machine load hits both alike
                _, result = train(dataset, "resnet8", method_name, precision, seed, args.epochs,
                                  teacher if method_name == "kd" else None)
                runs.append({"method": method_name, "precision": precision, "seed": seed, **result})
                print(f"{method_name} {precision} seed {seed}: test top-1 {result['test_top1']:.2f} "
                      f"({result['train_s']:.0f} s)", flush=True)
    table = {}
    for method_name in ("ce", "kd"):
        cell = {p: summary([r["test_top1"] for r in runs if r["method"] == method_name and r["precision"] == p])
                for p in ("fp32", "bf16")}
        time_ratio = (statistics.mean(r["train_s"] for r in runs if r["method"] == method_name
                                      and r["precision"] == "bf16")
                      / statistics.mean(r["train_s"] for r in runs if r["method"] == method_name
                                        and r["precision"] == "fp32"))
        fp32 = cell["fp32"]["values"]
        within = min(fp32) <= cell["bf16"]["mean"] <= max(fp32)
        table[method_name] = {**cell, "bf16_mean_within_fp32_seed_range": within, "bf16_time_over_fp32": time_ratio}
        print(f"{method_name}: fp32 {cell['fp32']['mean']:.2f} ± {cell['fp32']['std']:.2f}, bf16 "
              f"{cell['bf16']['mean']:.2f} ± {cell['bf16']['std']:.2f}; bf16 mean within the fp32 seed range: "
              f"{within}; bf16 time / fp32 time {time_ratio:.2f}", flush=True)
    common.write_result("precision_accuracy", {
        "description": "CE and KD resnet8 students (teacher resnet20, fp32) trained in fp32 and in CPU bf16 "
                       "autocast + channels_last, same budget, several seeds; test top-1 at the last epoch",
        "settings": {**vars(args), "optim": OPTIM, "kd": KD, "batch_size": 64, "dataset": str(dataset.root)},
        "teacher": teacher_result, "runs": runs, "table": table,
        "verdict": "bf16 keeps accuracy" if all(t["bf16_mean_within_fp32_seed_range"] for t in table.values())
                   else "bf16 mean outside the fp32 seed range for at least one method",
    })


if __name__ == "__main__":
    main()
