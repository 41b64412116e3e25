"""Size the CPU accuracy study: seconds per CIFAR-10 epoch for each candidate student, teacher and method.

Times ``stkd.training.train_step`` (forward_train + backward + SGD) on a random normalized
32x32x3 batch of 64 with one torch thread (each study run is a 1-CPU Ray worker), and scales the
median step to one epoch over the training part of the split (45,000 images with a 10% validation
split). Evaluation and start-up are not included.

    python bench/study_sizing.py [--steps 12] [--train-images 45000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

from stkd import methods, models
from stkd.training import train_step

CANDIDATES = [  # (student, teacher, method)
    ("resnet20", None, "ce"), ("resnet32", None, "ce"), ("wrn_16_2", None, "ce"),
    ("resnet8", None, "ce"), ("resnet8", "resnet20", "kd"), ("resnet8", "resnet20", "stkd"),
    ("resnet8", "resnet32", "kd"), ("resnet8", "wrn_16_2", "kd"), ("resnet14", "resnet32", "kd"),
]


def step_seconds(student: str, teacher: str | None, method: str, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    s = models.create(student, 10)
    t = models.create(teacher, 10) if teacher else None
    m = methods.create(method, s, t, generator=torch.Generator().manual_seed(0))
    m.train()
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        train_step(m, opt, x, y)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=45_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for student, teacher, method in CANDIDATES:
        sec = step_seconds(student, teacher, method, args.steps, args.batch)
        epoch = sec * args.train_images / args.batch
        rows.append({"student": student, "teacher": teacher, "method": method, "ms_per_step": 1000 * sec,
                     "images_per_s": args.batch / sec, "epoch_s": epoch})
        print(f"{student:>9} <- {teacher or '-':>9} {method:>5}: {1000 * sec:7.1f} ms/step, "
              f"{args.batch / sec:6.0f} img/s, {epoch:6.0f} s/epoch of {args.train_images}")
    common.write_result("study_sizing", {"batch": args.batch, "threads": 1, "train_images": args.train_images,
                                         "rows": rows})


if __name__ == "__main__":
    main()
