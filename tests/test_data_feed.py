"""Every training sample once per epoch across workers; evaluation covers the test split once."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.feeds import InMemoryFeed, global_batch_bounds, per_worker_batch, rank_slice
from pipeline.data.dataset import PreparedDataset


@pytest.mark.parametrize("rows,batch,world", [(100, 32, 2), (97, 32, 3), (65, 64, 2), (64, 64, 4), (5, 64, 2)])
def test_global_batches_cover_every_row_once(rows, batch, world):
    bounds = global_batch_bounds(rows, batch, world)
    covered = [i for start, end in bounds for i in range(start, end)]
    assert covered == list(range(rows))
    assert all(end - start >= min(world, rows) for start, end in bounds)


def test_rank_slices_partition_the_split():
    parts = [rank_slice(10, r, 3) for r in range(3)]
    assert [i for p in parts for i in range(10)[p]] == list(range(10))


def digest(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest() for img in images]


def all_digests(path: Path, split: str) -> list[str]:
    images, _ = PreparedDataset.open(path).load_numpy(split)
    return digest(torch.from_numpy(images))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_in_memory_feed_exactly_once(unique_images, world):
    ds = PreparedDataset.open(unique_images)
    expected = sorted(all_digests(unique_images, "train"))
    for epoch in range(2):
        seen, steps = [], []
        for rank in range(world):
            feed = InMemoryFeed.from_split(ds, "train", 16, rank, world, torch.device("cpu"), shuffle=True, seed=1)
            batches = list(feed.batches(epoch))
            steps.append(len(batches))
            seen += [d for images, _ in batches for d in digest(images)]
        assert sorted(seen) == expected
        assert len(set(steps)) == 1, "every worker takes the same number of steps"
    test_seen = []
    for rank in range(world):
        feed = InMemoryFeed.from_split(ds, "test", 4, rank, world, torch.device("cpu"), shuffle=False)
        test_seen += [d for images, _ in feed.batches(0) for d in digest(images)]
    assert test_seen == all_digests(unique_images, "test")


def ray_data_probe(ctx):
    """In each worker: record digests of every train and test row this worker's shards deliver."""
    import ray.train

    from pipeline.data.feeds import RayDataFeed

    rank = ray.train.get_context().get_world_rank()
    out = {}
    for split, shuffle in (("train", True), ("val", False), ("test", False)):
        feed = RayDataFeed(ray.train.get_dataset_shard(split), ctx["shape"], 8, torch.device("cpu"), shuffle, 0)
        for epoch in range(2 if shuffle else 1):
            batches = list(feed.batches(epoch))
            out[f"{split}{epoch}"] = [d for images, _ in batches for d in digest(images)]
            out[f"{split}{epoch}_sizes"] = [len(labels) for _, labels in batches]
            out[f"{split}{epoch}_carried"] = digest(feed.carry[0]) if feed.carry is not None else []
    Path(ctx["out"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_ray_data_round_trip_with_two_workers_exactly_once(ray_session, unique_images, tmp_path):
    """Evaluation splits: every row once. Train: full batches of 8 only, the same on both workers, an epoch's
    last few rows rolled over into the next (54 rows = 2 workers x 27 = 2 x (3 x 8 + 3))."""
    from ray import cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.feeds import ray_datasets, split_data_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from pipeline.data import val_split

    ds = PreparedDataset.open(unique_images)
    images, labels = ds.load_numpy("train")
    split = val_split.carve(images, labels, 0.2, seed=5, class_names=ds.classes)
    held_out = val_split.validation_mask(images, split.keys, 5)
    datasets = ray_datasets(ds, 2, (split.keys, 5))
    trainer = TorchTrainer(ray_data_probe, train_loop_config={"shape": list(ds.image_shape), "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           datasets=datasets, dataset_config=split_data_config())
    trainer.fit()
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train_digests = np.array(all_digests(unique_images, "train"))
    expected = {"train": sorted(train_digests[~held_out]), "val": sorted(train_digests[held_out]),
                "test": sorted(all_digests(unique_images, "test"))}
    assert len(expected["val"]) == 15
    for key, split in (("val0", "val"), ("test0", "test")):
        seen = per_rank[0][key] + per_rank[1][key]
        assert sorted(seen) == expected[split], key
        assert per_rank[0][key] and per_rank[1][key], "both workers got rows"
    trained = per_rank[0]["train0"] + per_rank[1]["train0"]
    carried = per_rank[0]["train0_carried"] + per_rank[1]["train0_carried"]
    assert sorted(trained + carried) == expected["train"], "epoch 0: every training row trained or carried on"
    for r in per_rank:
        assert r["train0_sizes"] == [8, 8, 8] and len(r["train0_carried"]) == 3
        assert r["train1_sizes"] == [8, 8, 8] and len(r["train1_carried"]) == 6  # 3 carried + 27 = 3 x 8 + 6


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("carved", [False, True], ids=["all-rows", "validation-carved"])
def test_in_memory_feed_indices_exactly_once(unique_images, world, carved):
    """CRD's indices (with_indices): every training row's index once per epoch across the workers, each index
    the position of its batch row among the feed's rows, and the same batches as without indices."""
    images, labels = PreparedDataset.open(unique_images).load_numpy("train")
    rows = np.flatnonzero(np.arange(len(labels)) % 5 != 0) if carved else None  # every 5th row held out
    n = len(labels) if rows is None else len(rows)
    for epoch in range(2):
        seen, steps = [], []
        for rank in range(world):
            feed = InMemoryFeed(images, labels, 16, rank, world, torch.device("cpu"), shuffle=True, seed=1,
                                rows=rows, with_indices=True)
            plain = InMemoryFeed(images, labels, 16, rank, world, torch.device("cpu"), shuffle=True, seed=1, rows=rows)
            by_index = feed.labels_by_index()
            batches = list(feed.batches(epoch))
            for (x, y, idx), (px, py) in zip(batches, plain.batches(epoch), strict=True):
                row = idx.numpy() if rows is None else rows[idx.numpy()]
                assert torch.equal(x, torch.from_numpy(images[row])) and torch.equal(y, by_index[idx])
                assert torch.equal(x, px) and torch.equal(y, py), "indices change nothing else"
            steps.append(len(batches))
            seen += [i for _, _, idx in batches for i in idx.tolist()]
        assert sorted(seen) == list(range(n))
        assert len(set(steps)) == 1, "every worker takes the same number of steps"


def carved_rows(ds: PreparedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, validation positions) of ``ds``'s train split with a 20% validation carve."""
    from pipeline.data import val_split

    images, labels = ds.load_numpy("train")
    return images, labels, val_split.carve(images, labels, 0.2, seed=5, class_names=ds.classes).positions


def test_the_streaming_index_is_the_in_memory_one(unique_images):
    """indexed_train's shard reader gives every training row (validation rows dropped) its position among the
    training rows, the index the in-memory feed gives it; training_labels lists their labels in that order."""
    import pyarrow as pa

    from pipeline.data.feeds import index_map, read_indexed_shard, training_labels
    from pipeline.data.dataset import decode_images

    assert index_map(5, np.array([1, 3])).tolist() == [0, -1, 1, -1, 2]
    ds = PreparedDataset.open(unique_images)
    images, labels, positions = carved_rows(ds)
    train_rows = np.setdiff1d(np.arange(len(labels)), positions)
    offset, tables = 0, []
    for path, shard in zip(ds.shard_paths("train"), ds.splits["train"]["shards"]):
        item = pa.table({"path": [path], "offset": [offset]})
        tables.append(read_indexed_shard(item, positions, len(labels)))
        offset += shard["rows"]
    table = pa.concat_tables(tables)
    index = table.column("index").to_numpy()
    assert index.tolist() == list(range(len(train_rows))), "every training row once, in the split's order"
    assert np.array_equal(decode_images(table.column("image"), ds.image_shape), images[train_rows[index]])
    assert np.array_equal(training_labels(ds, positions), labels[train_rows])
    assert np.array_equal(training_labels(ds, None), labels)


def test_the_streaming_feed_carries_indices_with_their_rows():
    """RayDataFeed with (images, labels, indices) batches: full batches only, the indices rolled over into the
    next epoch with their rows."""
    pytest.importorskip("ray")
    from pipeline.data.feeds import RayDataFeed

    class IndexedShard:
        def __init__(self, sizes):
            self.sizes = sizes

        def iter_torch_batches(self, **kwargs):
            start = 0
            for n in self.sizes:
                rows = torch.arange(start, start + n)
                start += n
                yield rows.to(torch.uint8).view(-1, 1, 1, 1), rows % 3, rows

    labels = torch.arange(11) % 3
    feed = RayDataFeed(IndexedShard([4, 4, 3]), (1, 1, 1), 4, torch.device("cpu"), shuffle=True,
                       index_labels=labels)
    seen = []
    for epoch in range(3):
        for images, y, indices in feed.batches(epoch):
            assert len(indices) == 4
            assert torch.equal(images.view(-1).long(), indices) and torch.equal(y, feed.labels_by_index()[indices])
            seen += indices.tolist()
    assert feed.carry is not None and len(feed.carry) == 3 and len(feed.carry[2]) == 1
    assert len(seen) == 32 and sorted(seen + feed.carry[2].tolist()) == sorted(list(range(11)) * 3)


def indexed_probe(ctx):
    """In each worker: the indices and image digests of the train shard of indexed_train, two epochs."""
    import ray.train

    from pipeline.data.feeds import RayDataFeed

    rank = ray.train.get_context().get_world_rank()
    feed = RayDataFeed(ray.train.get_dataset_shard("train"), ctx["shape"], 8, torch.device("cpu"), True, 0)
    out = {}
    for epoch in range(2):
        batches = list(feed.batches(epoch))
        out[f"indices{epoch}"] = [i for _, _, idx in batches for i in idx.tolist()]
        out[f"digests{epoch}"] = [d for images, _, _ in batches for d in digest(images)]
        out[f"carried{epoch}"] = feed.carry[2].tolist() if feed.carry is not None else []
    Path(ctx["out"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ray_data_indices_exactly_once_per_epoch(ray_session, unique_images, tmp_path, world):
    """The streaming train split of a method that needs indices (ray_datasets(with_indices=True)): in each epoch
    every training row's index is trained or carried on by exactly one worker, with its own image."""
    from ray import cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.feeds import ray_datasets, split_data_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ds = PreparedDataset.open(unique_images)
    images, labels, positions = carved_rows(ds)
    train_rows = np.setdiff1d(np.arange(len(labels)), positions)
    from pipeline.data import val_split

    keys = val_split.carve(images, labels, 0.2, seed=5, class_names=ds.classes).keys
    datasets = ray_datasets(ds, world, (keys, 5), with_indices=True, val_positions=positions)
    trainer = TorchTrainer(indexed_probe, train_loop_config={"shape": list(ds.image_shape), "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
                           datasets=datasets, dataset_config=split_data_config())
    trainer.fit()
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    n = len(train_rows)
    assert n == 54 and n % world == 0, "54 rows split equally: none dropped"
    by_index = digest(torch.from_numpy(images[train_rows]))
    carried_before = []
    for epoch in range(2):
        trained = [i for r in per_rank for i in r[f"indices{epoch}"]]
        carried = [i for r in per_rank for i in r[f"carried{epoch}"]]
        # this epoch's rows: trained now or carried on; the rows carried from the epoch before are trained now too
        this_epoch = sorted(trained + carried)
        for i in carried_before:
            this_epoch.remove(i)
        assert this_epoch == list(range(n)), epoch
        for r in per_rank:
            assert [by_index[i] for i in r[f"indices{epoch}"]] == r[f"digests{epoch}"], "each index with its image"
        carried_before = carried


def test_the_global_batch_is_the_same_whatever_the_world_size(unique_images):
    """An elastic run that goes on with fewer workers trains on the same global batches: the in-memory feed
    deals each one out over the workers there are; the streaming feed's per-worker batch times the workers
    is the global batch wherever the config check lets it run (it divides)."""
    ds = PreparedDataset.open(unique_images)

    def global_batches(world: int) -> list[list[str]]:
        feeds = [InMemoryFeed.from_split(ds, "train", 16, rank, world, torch.device("cpu"), shuffle=True, seed=3)
                 for rank in range(world)]
        per_rank = [list(feed.batches(1)) for feed in feeds]
        return [sorted(d for rank in per_rank for d in digest(rank[step][0])) for step in range(len(per_rank[0]))]

    alone = global_batches(1)
    assert len(alone) > 1 and global_batches(2) == alone and global_batches(3) == alone
    for world in (1, 2, 4):
        assert per_worker_batch(64, world) * world == 64
