"""Worker-side batches: uint8 images on the training device, each sample once per epoch across workers.

Two feeds with one interface, ``batches(epoch) -> iterator of (uint8 NHWC tensor, int64 labels)``; for a
method that needs each image's index in the training set (CRD), training batches add a third, ``int64
indices``: the row's position among the training rows (the train split's rows in the order ``load_numpy``
reads them, without the validation rows), the same on both feeds; ``labels_by_index()`` gives every training
row's label in that order:

- ``InMemoryFeed`` loads a split into each worker's device memory once (CIFAR train is 150 MB)
  and deals every global batch out across workers, so all workers take the same number of steps.
- ``RayDataFeed`` streams the worker's shard of a Ray Data dataset (``get_dataset_shard``), decoded,
  pinned and copied to the device by Ray Data's prefetching threads (``iter_torch_batches``).

Every worker takes the same number of training steps in every epoch, on both feeds. DDP needs it (each step
all-reduces the gradients), and so does SyncBatchNorm, whose collectives DDP's ``join`` cannot shadow: with
unequal shards under ``join`` a run with SyncBatchNorm hung until the NCCL timeout (issue 23). The streaming
train split is therefore cut with ``streaming_split(equal=True)`` (:func:`split_data_config`): every worker
gets ``floor(rows / workers)`` rows per epoch (Ray drops the fewer than ``workers`` rows left over), and the
training feed yields full batches only, rolling an epoch's last partial batch into the next epoch
(:func:`epoch_steps`). Equal rows and one batch size give equal steps, with no per-step agreement between
workers and no ``join``; fixed batch shapes also let cuDNN's autotuner (``cudnn.benchmark``) pay off.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from pipeline.data.dataset import PreparedDataset, decode_images

Batch = tuple[torch.Tensor, torch.Tensor]

# train.sync_bn=auto turns SyncBatchNorm on only below this many samples per GPU. BatchNorm normalizes each
# step with its batch's mean and variance; the noise in those estimates grows as 1/sqrt(samples), and the
# measured cost stays small down to about 32 per device (Goyal et al. 2017 train ImageNet with unsynced BN
# at 32 per GPU, matching one large batch; Wu & He 2018, Group Norm, Fig. 1: BN's error rises steeply below
# 16-32 per GPU). SyncBatchNorm is not free either: two extra all-reduces per BN layer per step, in the
# forward, where nothing overlaps them. So: synchronize where the per-GPU batch is small and noisy, not where
# each GPU already sees enough samples (the standard recipe, batch 64, on 2 GPUs keeps plain BatchNorm).
SYNC_BN_BELOW = 32


def per_worker_batch(global_batch: int, world_size: int) -> int:
    """Rows of a global batch one worker trains on (the config check makes the streaming path's divide)."""
    return max(global_batch // world_size, 1)


def sync_bn_pays(per_worker_batch_size: int) -> bool:
    """Whether ``train.sync_bn=auto`` synchronizes BatchNorm at this per-GPU batch (see ``SYNC_BN_BELOW``)."""
    return per_worker_batch_size < SYNC_BN_BELOW


def epoch_steps(rows: int, batch_size: int, carry: int = 0) -> tuple[int, int]:
    """(steps, rows carried on) of a training epoch of :class:`RayDataFeed`: ``rows`` from the shard plus
    the ``carry`` rolled over from the epoch before, in full batches only. Every worker has the same
    ``rows`` (equal split) and, epoch after epoch, the same carry, hence the same steps."""
    return (rows + carry) // batch_size, (rows + carry) % batch_size


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
    takes its share of each global batch. Evaluation: each worker holds its contiguous part.

    ``rows``: the feed's rows as indices into ``images`` (default: all, in order). The training and
    validation feeds carved from one train split share its single device copy this way: a boolean-mask
    copy of the whole split (``images[~held_out]``) would double the split in host memory while loading.
    ``images``/``labels`` may be NumPy arrays or tensors already on ``device`` (not copied again).

    ``with_indices`` (for methods with ``needs_indices``, CRD): training batches are ``(images, labels,
    indices)``, ``indices`` being each row's position among the feed's rows (0 .. ``len(feed) - 1``, the
    order of :meth:`labels_by_index`), so that a memory bank of one row per training image needs no room for
    the validation rows held out of it.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int = 0,
        rows: np.ndarray | None = None,
        with_indices: bool = False,
    ) -> None:
        self.shuffle, self.seed, self.with_indices = shuffle, seed, with_indices
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.rows = None
        if rows is None and not shuffle:
            part = rank_slice(len(labels), rank, world_size)
            images, labels = images[part], labels[part]  # views: only this worker's part reaches the device
        elif rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if not shuffle:
                rows = rows[rank_slice(len(rows), rank, world_size)]
        self.images = _on(images, device)
        self.labels = _on(labels, device)
        if rows is not None:
            self.rows = torch.from_numpy(rows).to(device)

    @classmethod
    def from_split(cls, dataset: PreparedDataset, split: str, *args, **kwargs) -> "InMemoryFeed":
        return cls(*dataset.load_numpy(split), *args, **kwargs)

    def __len__(self) -> int:
        return len(self.labels) if self.rows is None else len(self.rows)

    def batches(self, epoch: int) -> Iterator[Batch]:
        n = len(self)
        if not self.shuffle:
            for start in range(0, n, self.batch_size):
                if self.rows is None:
                    yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
                else:
                    idx = self.rows[start:start + self.batch_size]
                    yield self.images.index_select(0, idx), self.labels.index_select(0, idx)
            return
        # Same permutation on every worker (same seed), each takes every world_size-th row of a batch.
        positions = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        positions = positions.to(self.images.device)
        order = positions if self.rows is None else self.rows[positions]
        for start, end in global_batch_bounds(n, self.batch_size, self.world_size):
            idx = order[start:end][self.rank::self.world_size]
            batch = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            yield (*batch, positions[start:end][self.rank::self.world_size]) if self.with_indices else batch

    def labels_by_index(self) -> torch.Tensor:
        """The label of every row of the feed, by the index ``with_indices`` batches carry."""
        return self.labels if self.rows is None else self.labels.index_select(0, self.rows)


def _on(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    return tensor.to(device)


def decode_collate(image_shape: tuple[int, int, int]):
    """The ``collate_fn`` of :meth:`RayDataFeed.batches`: an Arrow batch (``image`` bytes, ``label``) to
    ``(uint8 NHWC, int64)`` CPU tensors. Ray Data runs it in its prefetching threads, then pins the result and
    copies it to the device there too (``pin_memory``, ``device``), so the training thread only takes batches."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class DecodeImages(ArrowBatchCollateFn):
        def __call__(self, batch) -> Batch:
            images = decode_images(batch.column("image"), image_shape)
            labels = np.array(batch.column("label").to_numpy(), dtype=np.int64)  # a writable copy (8 B a row)
            if INDEX in batch.column_names:  # the training split of a method that needs indices (indexed_train)
                indices = np.array(batch.column(INDEX).to_numpy(), dtype=np.int64)
                return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(indices)
            return torch.from_numpy(images), torch.from_numpy(labels)

    return DecodeImages()


class RayDataFeed:
    """A worker's shard of a Ray Data dataset, as device batches.

    Training (``shuffle``): local shuffling, and full batches of ``batch_size`` only: the epoch's last,
    partial batch is held (on the device, fewer than ``batch_size`` rows) and goes, with the next epoch's
    last batch, into a full one (:func:`epoch_steps`). With the equal split of :func:`split_data_config`
    every worker then takes the same steps with the same shapes. Evaluation: every row once, in batches of
    ``batch_size`` and a smaller last one.

    A shard of :func:`indexed_train` gives ``(images, labels, indices)`` batches; ``index_labels`` (from
    :func:`training_labels`) is then every training row's label by index, for :meth:`labels_by_index`.
    """

    def __init__(
        self,
        shard,
        image_shape: tuple[int, int, int],
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int = 0,
        prefetch_batches: int = 4,
        index_labels: torch.Tensor | None = None,
    ) -> None:
        self.index_labels = index_labels
        self.shard, self.image_shape = shard, tuple(image_shape)
        self.batch_size, self.device, self.shuffle, self.seed = batch_size, torch.device(device), shuffle, seed
        self.prefetch_batches = prefetch_batches
        self.carry: tuple[torch.Tensor, ...] | None = None  # training rows rolled over into the next epoch

    def labels_by_index(self) -> torch.Tensor:
        """Every training row's label, by the index the batches of an :func:`indexed_train` shard carry."""
        if self.index_labels is None:
            raise ValueError("this feed was built without index_labels: its rows carry no indices")
        return self.index_labels

    def _stream(self, epoch: int) -> Iterator[Batch]:
        shuffle_args = {}
        if self.shuffle:
            shuffle_args = {"local_shuffle_buffer_size": 4 * self.batch_size,
                            "local_shuffle_seed": self.seed * 100_003 + epoch}
        cuda = self.device.type == "cuda"
        return self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=decode_collate(self.image_shape), device=self.device,
            pin_memory=cuda, prefetch_batches=self.prefetch_batches, drop_last=False, **shuffle_args)

    def batches(self, epoch: int) -> Iterator[Batch]:
        if not self.shuffle:
            yield from self._stream(epoch)
            return
        b = self.batch_size
        for batch in self._stream(epoch):  # (images, labels) or (images, labels, indices)
            if len(batch[1]) == b:
                yield batch
                continue
            # Only an epoch's last batch is short: join it to the rows carried over (one copy per epoch).
            if self.carry is not None:
                batch = tuple(torch.cat([kept, new]) for kept, new in zip(self.carry, batch))
            if len(batch[1]) >= b:
                yield tuple(t[:b] for t in batch)
                batch = tuple(t[b:] for t in batch)
            self.carry = batch if len(batch[1]) else None


def ray_datasets(dataset: PreparedDataset, world_size: int, val_split: tuple[np.ndarray, int] | None = None,
                 splits=("train", "test"), with_indices: bool = False, val_positions: np.ndarray | None = None) -> dict:
    """Ray Data datasets over the Parquet shards, cut into enough blocks that the unequal split of the
    evaluation splits (which deals whole blocks to workers) still gives every worker a near-equal share, and
    that the equal split of ``train`` (:func:`split_data_config`) needs to hold back little to equalize.

    ``val_split`` (validation keys, key seed; see :mod:`pipeline.data.val_split`): the train shards are
    read twice, once keeping the training rows as ``train`` and once the held-out rows as ``val``.
    ``with_indices``: ``train`` is :func:`indexed_train` (``val_positions``: the validation rows' positions,
    carved on the driver from the same keys).
    """
    import ray.data

    from pipeline.data.val_split import filter_batch

    blocks = 16 * world_size
    out = {split: ray.data.read_parquet(dataset.shard_paths(split)).repartition(blocks) for split in splits}
    if val_split is not None and "train" in splits:
        keys, seed = val_split
        read = ray.data.read_parquet(dataset.shard_paths("train"))
        for name, keep_validation in (("train", False), ("val", True)):
            out[name] = read.map_batches(filter_batch, batch_format="numpy", fn_kwargs={
                "val_keys": keys, "seed": seed, "keep_validation": keep_validation}).repartition(blocks)
    if with_indices and "train" in splits:
        out["train"] = indexed_train(dataset, blocks, val_positions if val_split is not None else None)
    return out


INDEX = "index"  # the column indexed_train adds


def index_map(rows: int, val_positions: np.ndarray | None) -> np.ndarray:
    """Each row of the train split's position among the training rows (-1 for a validation row)."""
    held_out = np.zeros(rows, dtype=bool)
    if val_positions is not None:
        held_out[val_positions] = True
    out = np.full(rows, -1, dtype=np.int64)
    out[~held_out] = np.arange(int((~held_out).sum()))
    return out


def training_labels(dataset: PreparedDataset, val_positions: np.ndarray | None) -> np.ndarray:
    """The label of every training row (the train split without ``val_positions``), by its index: the label
    column alone, read shard by shard in the manifest's order (no image is read)."""
    import pyarrow.parquet as pq

    labels = np.concatenate([pq.read_table(path, columns=["label"]).column("label").to_numpy()
                             for path in dataset.shard_paths("train")]).astype(np.int64)
    return labels[index_map(len(labels), val_positions) >= 0]


def read_indexed_shard(batch, val_positions: np.ndarray | None, rows: int):
    """One ``{"path", "offset"}`` item per call: that train shard's rows with an ``index`` column (see
    :func:`indexed_train`), the validation rows dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path, offset in zip(batch["path"].to_pylist(), batch["offset"].to_pylist()):
        table = pq.read_table(path, columns=["image", "label"])
        index = index_map(rows, val_positions)[offset: offset + table.num_rows]
        keep = index >= 0
        tables.append(table.filter(pa.array(keep)).append_column(INDEX, pa.array(index[keep])))
    return pa.concat_tables(tables)


def indexed_train(dataset: PreparedDataset, blocks: int, val_positions: np.ndarray | None = None):
    """The train split as a Ray dataset whose rows carry their ``index`` among the training rows, for a method
    that needs it (CRD): the same index the in-memory feed gives each row. A row's position is known only
    where its whole shard is read in order, so each shard is read by one task (``from_items`` of the
    shards with their first row's position), not by ``read_parquet``, whose blocks do not say where in a
    file they start. The validation rows (``val_positions``, carved on the driver) are dropped there."""
    import ray.data

    paths = dataset.shard_paths("train")
    sizes = [shard["rows"] for shard in dataset.splits["train"]["shards"]]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    items = [{"path": p, "offset": int(o)} for p, o in zip(paths, offsets)]
    return (ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(read_indexed_shard, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"val_positions": val_positions, "rows": dataset.rows("train")})
            .repartition(blocks))


def split_data_config():
    """A Ray Train ``DataConfig``: the ``train`` split cut into equal shards, every other split without
    dropping a row.

    ``train``: ``streaming_split(equal=True)`` gives every worker exactly ``floor(rows / workers)`` rows per
    epoch (Ray drops the at most ``workers - 1`` rows left over), so that every worker takes the same steps
    (see the module's docstring). Evaluation splits (``val``, ``test``): ``equal=False``, every row exactly
    once; evaluation runs no collective per batch, so unequal shards are fine there.
    """
    from pipeline import compat

    return compat.split_data_config()
