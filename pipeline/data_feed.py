"""Worker-side batches: uint8 images on the training device, each sample once per epoch across workers.

Two feeds with one interface, ``batches(epoch) -> iterator of (uint8 NHWC tensor, int64 labels)``:

- ``InMemoryFeed`` loads a split into each worker's device memory once (CIFAR train is 150 MB)
  and deals every global batch out across workers, so all workers take the same number of steps.
- ``RayDataFeed`` streams the worker's shard of a Ray Data dataset (``get_dataset_shard``).
  Shards may differ in length by a few rows, so training over them uses DDP's ``join``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from pipeline.dataset import PreparedDataset, decode_images

Batch = tuple[torch.Tensor, torch.Tensor]


def global_batch_bounds(num_rows: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Global batch boundaries covering every row once; a tail smaller than ``world_size`` joins
    the batch before it, so every worker gets at least one sample of every batch."""
    bounds = [(s, min(s + batch_size, num_rows)) for s in range(0, num_rows, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def rank_slice(num_rows: int, rank: int, world_size: int) -> slice:
    """Contiguous, near-equal split of ``range(num_rows)`` for evaluation."""
    edges = np.linspace(0, num_rows, world_size + 1).round().astype(int)
    return slice(int(edges[rank]), int(edges[rank + 1]))


class InMemoryFeed:
    """Rows of one split held on the device. Training (``shuffle``): every worker holds all rows and
    takes its share of each global batch. Evaluation: each worker holds its contiguous part."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int = 0,
    ) -> None:
        self.shuffle, self.seed = shuffle, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        if not shuffle:
            part = rank_slice(len(labels), rank, world_size)
            images, labels = images[part], labels[part]
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)

    @classmethod
    def from_split(cls, dataset: PreparedDataset, split: str, *args, **kwargs) -> "InMemoryFeed":
        return cls(*dataset.load_numpy(split), *args, **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, epoch: int) -> Iterator[Batch]:
        n = len(self.labels)
        if not self.shuffle:
            for start in range(0, n, self.batch_size):
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            return
        # Same permutation on every worker (same seed), each takes every world_size-th row of a batch.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        order = order.to(self.images.device)
        for start, end in global_batch_bounds(n, self.batch_size, self.world_size):
            idx = order[start:end][self.rank::self.world_size]
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)


class RayDataFeed:
    def __init__(
        self,
        shard,
        image_shape: tuple[int, int, int],
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int = 0,
    ) -> None:
        self.shard, self.image_shape = shard, tuple(image_shape)
        self.batch_size, self.device, self.shuffle, self.seed = batch_size, device, shuffle, seed

    def batches(self, epoch: int) -> Iterator[Batch]:
        shuffle_args = {}
        if self.shuffle:
            shuffle_args = {"local_shuffle_buffer_size": 4 * self.batch_size,
                            "local_shuffle_seed": self.seed * 100_003 + epoch}
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                             prefetch_batches=2, **shuffle_args):
            images = decode_images(batch["image"], self.image_shape)
            pin = self.device.type == "cuda"
            x = torch.from_numpy(images)
            y = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)


def ray_datasets(dataset: PreparedDataset, world_size: int, val_split: tuple[np.ndarray, int] | None = None,
                 splits=("train", "test")) -> dict:
    """Ray Data datasets over the Parquet shards, cut into enough blocks that an unequal split
    (which deals whole blocks to workers) still gives every worker a near-equal share.

    ``val_split`` (validation keys, key seed; see :mod:`pipeline.val_split`): the train shards are
    read twice, once keeping the training rows as ``train`` and once the held-out rows as ``val``.
    """
    import ray.data

    from pipeline.val_split import filter_batch

    blocks = 16 * world_size
    out = {split: ray.data.read_parquet(dataset.shard_paths(split)).repartition(blocks) for split in splits}
    if val_split is not None and "train" in splits:
        keys, seed = val_split
        read = ray.data.read_parquet(dataset.shard_paths("train"))
        for name, keep_validation in (("train", False), ("val", True)):
            out[name] = read.map_batches(filter_batch, batch_format="numpy", fn_kwargs={
                "val_keys": keys, "seed": seed, "keep_validation": keep_validation}).repartition(blocks)
    return out


def unequal_split_data_config():
    """A Ray Train ``DataConfig`` that splits without dropping rows (``equal=False``).

    Ray's default splits with ``equal=True``, which may drop rows to make shards equal; we want
    every sample exactly once per epoch, and handle unequal shards with DDP's ``join``.
    """
    from ray.train import DataConfig

    class UnequalSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            return output

    return UnequalSplitDataConfig()
