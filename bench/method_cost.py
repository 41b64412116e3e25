"""Time per training step of ce, kd, dkd and stkd (resnet56 -> resnet20, 32x32x3, 10 classes) on the CPU.

A step is ``method.forward_train`` + ``backward`` + ``SGD.step``, on a fixed random normalized
batch (the cost does not depend on the pixels). Methods are timed interleaved: every round runs a
block of steps of each method in turn (the order rotates each round), and the per-step time of a
method is the median over rounds, so drift in the machine's load hits all methods alike. Reported as
ratios to kd, measured within this one run.

torch runs with one intra-op thread by default (``--threads``): on a small shared machine a second
OpenMP thread that gets descheduled stalls every parallel region, which swamps the differences
between methods.

    python bench/method_cost.py [--rounds 9] [--steps 3] [--threads 1] [--batch-sizes 64 128]

On a GPU (``--device cuda [--bf16]``; bf16 autocast and channels_last as the pipeline uses there) the
timers are read after ``torch.cuda.synchronize()``; ``--result-name`` keeps that run's file apart.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import common  # noqa: F401  (puts the repository on sys.path)
import torch

from stkd import methods, models
from stkd.training import train_step

VARIANTS = {
    "ce": ("ce", {}),
    "kd": ("kd", {}),
    "dkd": ("dkd", {}),
    "stkd": ("stkd", {}),  # default teacher_target=mixed_input: one teacher pass on the mixed batch
    "stkd_mixed_output": ("stkd", {"teacher_target": "mixed_output"}),
    "stkd_clean_kd": ("stkd", {"clean_kd_weight": 0.5}),  # extra teacher pass + student on 2x batch
}


def build(variant: str, teacher: torch.nn.Module, device: torch.device, channels_last: bool, seed: int = 0):
    name, hparams = VARIANTS[variant]
    torch.manual_seed(seed)
    student = models.create("resnet20", 10).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    method = methods.create(name, student, None if name == "ce" else teacher,
                            generator=torch.Generator(device=device).manual_seed(seed), **hparams)
    method.train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return method, optimizer


def step(method, optimizer, x, y, autocast=contextlib.nullcontext) -> None:
    train_step(method, optimizer, x, y, autocast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--result-name", default="method_cost")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    channels_last = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    teacher = models.create("resnet56", 10).to(device)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    variants = args.variants
    results = {}
    for batch in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        built = {v: build(v, teacher, device, channels_last) for v in variants}
        for v in variants:
            for _ in range(args.warmup):
                step(*built[v], x, y, autocast)
        per_step: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(*built[v], x, y, autocast)
                sync()
                per_step[v].append((time.perf_counter() - start) / args.steps)
            print(f"batch {batch} round {r + 1}/{args.rounds}: "
                  + " ".join(f"{v}={per_step[v][-1] * 1e3:.0f}ms" for v in variants), flush=True)
        median = {v: statistics.median(t) for v, t in per_step.items()}
        base = median.get("kd")
        results[str(batch)] = {
            v: {"median_step_ms": median[v] * 1e3,
                "min_step_ms": min(per_step[v]) * 1e3,
                "max_step_ms": max(per_step[v]) * 1e3,
                "images_per_s": batch / median[v],
                "ratio_to_kd": median[v] / base if base else None,
                "rounds_ms": [t * 1e3 for t in per_step[v]]}
            for v in variants}
        print(f"batch {batch}: " + ", ".join(f"{v} {median[v] * 1e3:.0f} ms ({median[v] / base:.3f}x kd)"
                                             for v in variants), flush=True)

    target = {b: r["stkd"]["ratio_to_kd"] <= 1.10 for b, r in results.items() if "stkd" in r and "kd" in r}
    precision = "bf16 autocast" if args.bf16 else "fp32"
    common.write_result(args.result_name, {
        "description": "time per training step (forward_train + backward + SGD step), resnet56 -> resnet20, "
                       f"32x32x3 random normalized input, 10 classes, {device.type} {precision}, torch threads as in "
                       "settings; interleaved round-robin, median over rounds; ratios within this run",
        "settings": {"device": str(device), "precision": precision, "channels_last": channels_last,
                     "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
                     "warmup_steps": args.warmup, "teacher": "resnet56", "student": "resnet20", "variants": {v: VARIANTS[v] for v in variants}},
        "results": results,
        "target": {"stkd_over_kd_max": 1.10, "met_per_batch": target, "met": all(target.values())},
    })


if __name__ == "__main__":
    main()
