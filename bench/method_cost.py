"""Time per training step of ce, kd, dkd, stkd, at, fitnet and crd (resnet56 -> resnet20, 32x32x3, 10 classes) on the CPU.

A step is ``method.forward_train`` + ``backward`` + ``SGD.step``, on a fixed random normalized
batch (the cost does not depend on the pixels). Methods are timed interleaved: every round runs a
block of steps of each method in turn (the order rotates each round), and the per-step time of a
method is the median over rounds, so drift in the machine's load hits all methods alike. Reported as
ratios to kd, measured within this one run.

torch runs with one intra-op thread by default (``--threads``): on a small shared machine a second
OpenMP thread that gets descheduled stalls every parallel region, which swamps the differences
between methods.

    python bench/method_cost.py [--rounds 9] [--steps 3] [--threads 1] [--batch-sizes 64 128]

``--precisions`` times every method in each of several precisions, interleaved in the same rounds:
``fp32``, ``fp32_cl`` (channels_last), ``bf16`` (autocast), ``bf16_cl`` (both: what ``train.precision=auto``
trains with on a CPU with native bf16), ``fp16``/``fp16_cl`` (autocast + GradScaler, CUDA). Each is also
reported as a ratio to the same method in fp32. The default is ``fp32`` on the CPU and ``bf16_cl`` on CUDA.

On a GPU (``--device cuda``) the timers are read after ``torch.cuda.synchronize()``; ``--result-name``
keeps that run's file apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401  (puts the repository on sys.path)
import torch

from stkd import methods, models
from stkd.precision import Precision
from stkd.training import scaled_train_step, train_step

VARIANTS = {
    "ce": ("ce", {}),
    "kd": ("kd", {}),
    "dkd": ("dkd", {}),
    "stkd": ("stkd", {}),  # default teacher_target=mixed_input: one teacher pass on the mixed batch
    "stkd_mixed_output": ("stkd", {"teacher_target": "mixed_output"}),
    "stkd_clean_kd": ("stkd", {"clean_kd_weight": 0.5}),  # extra teacher pass + student on 2x batch
    "at": ("at", {}),  # hooks on three stages of each model, attention maps
    "fitnet": ("fitnet", {}),  # hooks, and a regressor trained beside the student
    "crd": ("crd", {}),  # two embeddings, memory banks of CRD_TRAIN_IMAGES rows, 16,384 negatives per image
}
CRD_TRAIN_IMAGES = 50_000  # CIFAR's train split: the banks' size, and the pool negatives are drawn from


def build(variant: str, teacher: torch.nn.Module, device: torch.device, channels_last: bool, seed: int = 0):
    name, hparams = VARIANTS[variant]
    torch.manual_seed(seed)
    student = models.create("resnet20", 10).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    extra = {}
    if methods.method_class(name).needs_indices:
        extra["train_labels"] = torch.arange(CRD_TRAIN_IMAGES, device=device) % 10
    method = methods.create(name, student, None if name == "ce" else teacher,
                            generator=torch.Generator(device=device).manual_seed(seed),
                            architectures=("resnet20", "resnet56"), image_shape=(3, 32, 32), **extra, **hparams)
    method.train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return method, optimizer


PRECISIONS = ("fp32", "fp32_cl", "bf16", "bf16_cl", "fp16", "fp16_cl")


def step(method, optimizer, x, y, amp: Precision) -> None:
    # A batch's images at the start of the training set, for a method that needs their indices (CRD).
    indices = torch.arange(len(y), device=y.device) if method.needs_indices else None
    if amp.scaler is None:
        train_step(method, optimizer, x, y, amp.autocast, indices)
    else:
        scaled_train_step(method, optimizer, x, y, amp.autocast, amp.scaler, indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--result-name", default="method_cost")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or (["bf16_cl"] if device.type == "cuda" else ["fp32"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    teachers = {}
    for channels_last in sorted({p.endswith("_cl") for p in precisions}):
        teacher = models.create("resnet56", 10).to(device)
        teachers[channels_last] = teacher.to(memory_format=torch.channels_last) if channels_last else teacher
    cells = [(v, p) for v in args.variants for p in precisions]

    def label(cell) -> str:
        return cell[0] if len(precisions) == 1 else f"{cell[0]}/{cell[1]}"

    results = {}
    for batch in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        inputs = {False: x, True: x.contiguous(memory_format=torch.channels_last)}
        built = {}
        for v, p in cells:
            cl = p.endswith("_cl")
            method, optimizer = build(v, teachers[cl], device, cl)
            built[(v, p)] = (method, optimizer, inputs[cl], y, Precision.create(p.removesuffix("_cl"), device.type))
        for cell in cells:
            for _ in range(args.warmup):
                step(*built[cell])
        per_step: dict = {cell: [] for cell in cells}
        for r in range(args.rounds):
            order = cells[r % len(cells):] + cells[:r % len(cells)]
            for cell in order:
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(*built[cell])
                sync()
                per_step[cell].append((time.perf_counter() - start) / args.steps)
            print(f"batch {batch} round {r + 1}/{args.rounds}: "
                  + " ".join(f"{label(c)}={per_step[c][-1] * 1e3:.0f}ms" for c in cells), flush=True)
        median = {c: statistics.median(t) for c, t in per_step.items()}
        out = {}
        for v, p in cells:
            kd, fp32 = median.get(("kd", p)), median.get((v, "fp32"))
            out[label((v, p))] = {
                "variant": v, "precision": p, "median_step_ms": median[(v, p)] * 1e3,
                "min_step_ms": min(per_step[(v, p)]) * 1e3, "max_step_ms": max(per_step[(v, p)]) * 1e3,
                "images_per_s": batch / median[(v, p)],
                "ratio_to_kd": median[(v, p)] / kd if kd else None,
                "ratio_to_fp32": median[(v, p)] / fp32 if fp32 else None,
                "rounds_ms": [t * 1e3 for t in per_step[(v, p)]]}
        results[str(batch)] = out
        print(f"batch {batch}: " + ", ".join(
            f"{k} {r['median_step_ms']:.0f} ms" + (f" ({r['ratio_to_fp32']:.2f}x fp32)" if r["ratio_to_fp32"] else "")
            for k, r in out.items()), flush=True)

    target = {b: r[label(("stkd", p))]["ratio_to_kd"] <= 1.10 for b, r in results.items() for p in precisions
              if ("stkd", p) in per_step and ("kd", p) in per_step}
    common.write_result(args.result_name, {
        "description": "time per training step (forward_train + backward + SGD step), resnet56 -> resnet20, "
                       f"32x32x3 random normalized input, 10 classes, {device.type}, precisions {precisions} "
                       "(_cl: channels_last), torch threads as in settings; interleaved round-robin, median over "
                       "rounds; ratios within this run",
        "settings": {"device": str(device), "precisions": precisions, "threads": args.threads, "rounds": args.rounds,
                     "steps_per_round": args.steps, "warmup_steps": args.warmup, "teacher": "resnet56",
                     "student": "resnet20", "variants": {v: VARIANTS[v] for v in args.variants}},
        "results": results,
        "target": {"stkd_over_kd_max": 1.10, "met_per_batch": target, "met": all(target.values())},
    })


if __name__ == "__main__":
    main()
