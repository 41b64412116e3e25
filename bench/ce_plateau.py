"""Where does the CE student plateau? Sizes the fair-fight study's epoch budget (BENCHMARKS §6).

The study's CE cell (resnet8 on the class-balanced 1,000-per-class CIFAR-10 subset, 10% held out for
validation with the pipeline's own carve, cosine schedule, lr 0.05, batch 64, wd 5e-4, crop + flip,
``train.precision=auto``) trained for each budget ``E`` in ``--epochs``, each a whole schedule of its own
(a cosine run of E epochs is not the first E epochs of a longer one). It reports the best validation top-1
over the epochs of each run (what the study selects on) and the gain from E to 2E. The budget is the
smallest E whose doubling gains under ``--threshold`` points. The worker's own pieces without Ray, one
torch thread per run, the runs in parallel processes; test accuracy is not read.

    python bench/ce_plateau.py [--epochs 10 20 40] [--seed 0]

Writes ``bench/results/ce_plateau.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import common
import numpy as np
import torch

OPTIM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "schedule": "cosine",
         "milestones": [], "gamma": 0.1, "warmup_epochs": 0}
VAL_FRACTION, VAL_SEED = 0.1, 0


def train_ce(root: str, epochs: int, seed: int) -> dict:
    """One CE run of ``epochs`` epochs; validation top-1 after every epoch."""
    torch.set_num_threads(1)
    from pipeline.data import val_split
    from pipeline.data.feeds import InMemoryFeed
    from pipeline.data.dataset import PreparedDataset
    from pipeline.train.worker_loop import EpochSums, InputTransform, evaluate, make_generators, make_scheduler, train_batch
    from stkd import methods, models
    from stkd.precision import Precision, resolve_channels_last, resolve_for_device

    dataset = PreparedDataset.open(root, verify=False)
    images, labels = dataset.load_numpy("train")
    split = val_split.carve(images, labels, VAL_FRACTION, VAL_SEED, dataset.classes)
    held_out = np.zeros(len(labels), dtype=bool)
    held_out[split.positions] = True
    device = torch.device("cpu")
    precision = resolve_for_device("auto", device)  # as the workers resolve it: bf16 on a CPU with native bf16
    channels_last = resolve_channels_last("auto", "cpu", precision)
    torch.manual_seed(seed)
    student = models.create("resnet8", dataset.num_classes, in_channels=dataset.image_shape[2])
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    generators = make_generators(device, seed, 0)
    method = methods.create("ce", student, None, generator=generators["method"])
    optim = {**OPTIM, "epochs": epochs}
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=optim["lr"], momentum=optim["momentum"],
                                weight_decay=optim["weight_decay"])
    scheduler = make_scheduler(optimizer, optim)
    step = InputTransform(dataset.mean, dataset.std, 4, True, channels_last, generators["augment"])
    amp = Precision.create(precision, "cpu")
    train = InMemoryFeed(images, labels, 64, 0, 1, device, shuffle=True, seed=seed, rows=np.flatnonzero(~held_out))
    val = InMemoryFeed(images, labels, 512, 0, 1, device, shuffle=False, rows=split.positions)
    curve, start = [], time.perf_counter()
    for epoch in range(epochs):
        method.set_epoch(epoch)
        method.train()
        sums = EpochSums(method.term_names(), device)
        for batch_images, batch_labels in train.batches(epoch):
            train_batch(method, optimizer, step, batch_images, batch_labels, amp, sums)
        scheduler.step()
        curve.append(evaluate(student, val, step, "val")["val/top1"])
        print(f"ce {epochs} epochs: epoch {epoch + 1}: val top-1 {curve[-1]:.2f}", flush=True)
    return {"epochs": epochs, "seed": seed, "precision": precision, "channels_last": channels_last,
            "val_top1_per_epoch": curve, "best_val_top1": max(curve), "last_val_top1": curve[-1],
            "train_rows": int((~held_out).sum()), "val_rows": int(held_out.sum()),
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=1.0, help="points of validation top-1")
    args = parser.parse_args()
    root = str(common.prepare_subset(1000))
    budgets = sorted(args.epochs)
    with multiprocessing.get_context("spawn").Pool(len(budgets)) as pool:
        runs = pool.starmap(train_ce, [(root, e, args.seed) for e in budgets])
    by_epochs = {r["epochs"]: r for r in runs}
    gains = {e: by_epochs[2 * e]["best_val_top1"] - by_epochs[e]["best_val_top1"]
             for e in budgets if 2 * e in by_epochs}
    plateau = next((e for e in sorted(gains) if gains[e] < args.threshold), None)
    for e, g in sorted(gains.items()):
        print(f"E={e}: best val top-1 {by_epochs[e]['best_val_top1']:.2f} -> 2E={2 * e}: "
              f"{by_epochs[2 * e]['best_val_top1']:.2f} (gain {g:+.2f})")
    print(f"plateau (doubling gains < {args.threshold} point): "
          + (f"E={plateau}" if plateau else "not reached within the budgets measured"))
    common.write_result("ce_plateau", {
        "description": "resnet8 CE on the 1,000-per-class CIFAR-10 subset (10% validation), best validation "
                       "top-1 per budget, each budget its own cosine schedule",
        "settings": {**vars(args), "optim": OPTIM, "val_fraction": VAL_FRACTION, "dataset": root},
        "runs": runs, "gain_to_double": gains, "plateau_epochs": plateau})


if __name__ == "__main__":
    main()
