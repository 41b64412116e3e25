"""The validation split: a class-balanced, deterministic part of the train split held out of training.

Rows are told apart by their content, not their position: a row's key is a keyed 64-bit BLAKE2b of
its raw image bytes (``val_seed`` is the key). In each class the rows with the smallest keys form the
validation part. So the split is the same on the in-memory path (which sees rows as arrays) and on
the Ray Data path (which sees them as shuffled, re-blocked bytes), does not depend on ``train.seed``
or on how `stkd prepare` sharded the data, and an image that appears twice in train never ends up on
both sides (a copy of a validation image is validation too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ValSplit:
    keys: np.ndarray          # sorted uint64 keys of the validation rows (the Ray Data path matches on them)
    positions: np.ndarray     # their row numbers in the train split as `load_numpy` reads it
    seed: int
    train_counts: list[int]   # rows per class left for training
    val_counts: list[int]     # rows per class held out

    @property
    def rows(self) -> int:
        return sum(self.val_counts)


def row_keys(images: Any, seed: int) -> np.ndarray:
    """uint64 key per row of raw image bytes: a uint8 ``(N, ...)`` array or a sequence of ``bytes``."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    rows = (r.tobytes() for r in images) if isinstance(images, np.ndarray) and images.dtype == np.uint8 else images
    # One small hash per row: BLAKE2b is keyed, fast, and the same on every machine and Python version.
    return np.fromiter((int.from_bytes(hashlib.blake2b(bytes(r), digest_size=8, key=salt).digest(), "little")
                        for r in rows), dtype=np.uint64, count=len(images))


def carve(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
          class_names: Sequence[str]) -> ValSplit:
    """Choose ``round(fraction * n_c)`` rows of each class ``c``; ValueError if a class would have no
    row in training or in validation."""
    keys = row_keys(images, seed)
    chosen, train_counts, val_counts, problems = [], [], [], []
    for c, name in enumerate(class_names):
        class_keys = np.sort(keys[labels == c])
        take = int(round(fraction * len(class_keys)))
        if take == 0 or take == len(class_keys):
            side = "validation" if take == 0 else "training"
            problems.append(f"class {name!r} ({len(class_keys)} train images) would have none left for {side}")
        chosen.append(class_keys[:take])
    if problems:
        raise ValueError(f"data.val_fraction={fraction}: " + "; ".join(problems))
    val_keys = np.unique(np.concatenate(chosen))
    is_val = np.isin(keys, val_keys)
    for c in range(len(class_names)):
        in_class = labels == c
        val_counts.append(int((is_val & in_class).sum()))
        train_counts.append(int((~is_val & in_class).sum()))
    return ValSplit(keys=val_keys, positions=np.flatnonzero(is_val), seed=seed, train_counts=train_counts,
                    val_counts=val_counts)


def validation_mask(images: Any, val_keys: np.ndarray, seed: int) -> np.ndarray:
    """Which rows (raw image bytes, as for :func:`row_keys`) belong to the validation split."""
    return np.isin(row_keys(images, seed), val_keys)


def filter_batch(batch: dict[str, Any], val_keys: np.ndarray, seed: int, keep_validation: bool) -> dict[str, Any]:
    """A Ray Data numpy batch cut to its validation rows or to its training rows."""
    mask = validation_mask(batch["image"], val_keys, seed)
    if not keep_validation:
        mask = ~mask
    return {name: column[mask] for name, column in batch.items()}
