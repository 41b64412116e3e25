"""The validation split: disjoint from training, class-balanced, fixed by its own seed, seen once per epoch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import config as config_lib
from pipeline.data import val_split
from pipeline.train import run
from pipeline.config import ConfigError
from pipeline.train.worker_loop import make_feeds
from test_data_feed import all_digests, digest


def random_rows(n_per_class: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_per_class * classes, 4, 4, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), n_per_class)
    return images, labels


def test_carve_is_class_balanced_and_independent_of_row_order():
    images, labels = random_rows(50, 4)
    split = val_split.carve(images, labels, 0.2, seed=3, class_names="abcd")
    assert split.val_counts == [10, 10, 10, 10] and split.train_counts == [40, 40, 40, 40]
    order = np.random.default_rng(1).permutation(len(labels))
    again = val_split.carve(images[order], labels[order], 0.2, seed=3, class_names="abcd")
    assert np.array_equal(split.keys, again.keys)
    other_seed = val_split.carve(images, labels, 0.2, seed=4, class_names="abcd")
    assert not np.array_equal(split.keys, other_seed.keys)


def test_keys_of_arrays_and_of_bytes_agree():
    images, _ = random_rows(5, 2)
    as_bytes = np.array([img.tobytes() for img in images], dtype=object)
    assert np.array_equal(val_split.row_keys(images, 7), val_split.row_keys(as_bytes, 7))


def test_a_duplicate_of_a_validation_image_is_never_trained_on():
    images, labels = random_rows(20, 2)
    split = val_split.carve(images, labels, 0.25, seed=0, class_names="ab")
    held_out = np.flatnonzero(val_split.validation_mask(images, split.keys, 0))
    with_copy = np.concatenate([images, images[held_out[:1]]])
    assert val_split.validation_mask(with_copy, split.keys, 0)[-1]


def test_a_class_left_without_rows_is_refused():
    images, labels = random_rows(3, 2)
    with pytest.raises(ValueError, match="class 'a' \\(3 train images\\) would have none left for validation"):
        val_split.carve(images, labels, 0.1, seed=0, class_names="ab")
    with pytest.raises(ValueError, match="none left for training"):
        val_split.carve(images, labels, 0.9, seed=0, class_names="ab")


def test_the_driver_refuses_the_split_before_ray_is_touched(tiny_overrides):
    cfg = config_lib.load("test_tiny", tiny_overrides + ["data.val_fraction=0.001"])
    with pytest.raises(ConfigError, match="data.val_fraction=0.001: class '0'"):
        run.dataset_info(cfg)


def feeds_config(path, train_seed: int, val_fraction: float = 0.2) -> tuple[dict, dict]:
    cfg = config_lib.load("test_tiny", [f"data.path={path}", f"train.seed={train_seed}", "optim.batch_size=8",
                                        f"data.val_fraction={val_fraction}", "data.eval_batch_size=5"])
    return cfg, run.dataset_info(cfg)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_in_memory_feeds_train_and_validate_on_disjoint_rows_once_per_epoch(unique_images, world):
    all_train = sorted(all_digests(unique_images, "train"))
    val_sets = []
    for train_seed in (0, 1):
        cfg, info = feeds_config(unique_images, train_seed)
        assert info["val_rows"] == 15 and info["train_rows"] == 69 - 15  # 23 per class, round(0.2 * 23) = 5
        for epoch in range(2):
            trained, validated, labels = [], [], []
            for rank in range(world):
                train, val, _ = make_feeds(cfg, info, rank, world, torch.device("cpu"))
                trained += [d for images, _ in train.batches(epoch) for d in digest(images)]
                for images, y in val.batches(epoch):
                    validated += digest(images)
                    labels += y.tolist()
            assert len(trained) == len(set(trained)) and len(validated) == len(set(validated))
            assert not set(trained) & set(validated)
            assert sorted(trained + validated) == all_train
            assert Counter(labels) == {0: 5, 1: 5, 2: 5}
        val_sets.append(sorted(validated))
    assert val_sets[0] == val_sets[1], "the validation split does not depend on train.seed"


def test_without_a_split_there_is_no_validation_feed(unique_images):
    cfg, info = feeds_config(unique_images, 0, val_fraction=0.0)
    assert info["val_keys"] is None
    train, val, _ = make_feeds(cfg, info, 0, 1, torch.device("cpu"))
    assert val is None and len(train) == 69
