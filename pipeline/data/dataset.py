"""Reading a dataset written by `stkd prepare` (see :mod:`pipeline.data.prepare` for the format).

>>> ds = PreparedDataset.open("data/cifar10")          # checks every shard's sha256 (verify=False: sizes only)
>>> x, y = ds.load_numpy("train")                      # uint8 (N, H, W, C), int64 (N,)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["DatasetError", "FORMAT_VERSION", "MANIFEST", "PreparedDataset", "decode_images", "file_sha256"]

FORMAT_VERSION = 1  # of the layout below, written by pipeline.data.prepare
MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete or does not match its manifest."""


def _shape(image_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(x) for x in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(f"image_shape must be [H, W, C] with positive sizes, got {list(image_shape)}")
    return shape


def _binary_values(chunk, item: int) -> np.ndarray:
    """The concatenated values of a pyarrow (large_)binary array as a flat uint8 view (no per-row loop)."""
    import pyarrow as pa

    if chunk.null_count:
        raise DatasetError("image column holds nulls")
    n = len(chunk)
    if pa.types.is_fixed_size_binary(chunk.type):
        if chunk.type.byte_width != item:
            raise DatasetError(f"images of {chunk.type.byte_width} bytes, expected {item}")
        data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
        return data[chunk.offset * item : (chunk.offset + n) * item]
    if pa.types.is_binary(chunk.type):
        off_type = np.int32
    elif pa.types.is_large_binary(chunk.type):
        off_type = np.int64
    else:
        raise DatasetError(f"image column has type {chunk.type}, expected binary")
    if n == 0:
        return np.empty(0, dtype=np.uint8)
    _validity, offsets_buf, data_buf = chunk.buffers()[:3]
    offsets = np.frombuffer(offsets_buf, dtype=off_type)[chunk.offset : chunk.offset + n + 1]
    lengths = np.diff(offsets)
    if not np.all(lengths == item):
        bad = int(np.flatnonzero(lengths != item)[0])
        raise DatasetError(f"image {bad} has {int(lengths[bad])} bytes, expected {item}")
    return np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]) : int(offsets[-1])]


def decode_images(column: Any, image_shape: Sequence[int]) -> np.ndarray:
    """Turn a column of raw image bytes into a writable uint8 ``(N, H, W, C)`` array.

    ``column`` is what a Ray Data numpy batch holds for the ``image`` column (an object array of
    ``bytes``), or a list of bytes, a pyarrow (chunked) binary array, a fixed-width ``S`` array or an
    already-decoded uint8 array.
    """
    shape = _shape(image_shape)
    item = int(np.prod(shape))
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pa = None
    if pa is not None and isinstance(column, (pa.Array, pa.ChunkedArray)):
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        out = np.empty((len(column), *shape), dtype=np.uint8)
        pos = 0
        for c in chunks:
            flat = _binary_values(c, item)
            out[pos : pos + len(c)] = flat.reshape(len(c), *shape)
            pos += len(c)
        return out
    if isinstance(column, np.ndarray) and column.dtype == np.uint8:
        if column.shape[1:] == shape:
            return column
        if column.ndim == 2 and column.shape[1] == item:
            return column.reshape(len(column), *shape)
        raise DatasetError(f"uint8 image array of shape {column.shape} does not match image_shape {list(shape)}")
    if isinstance(column, np.ndarray) and column.dtype.kind == "S" and column.dtype.itemsize == item:
        return np.frombuffer(column.tobytes(), dtype=np.uint8).reshape(len(column), *shape).copy()
    n = len(column)
    try:
        buf = bytearray(b"".join(column))
    except TypeError as e:
        raise DatasetError(f"image column must hold bytes, got {type(column[0]).__name__ if n else '?'}") from e
    if len(buf) != n * item:
        for i, value in enumerate(column):
            if len(value) != item:
                raise DatasetError(f"image {i} has {len(value)} bytes, expected {item} for shape {list(shape)}")
    return np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PreparedDataset:
    """A dataset directory written by `stkd prepare`: manifest.json + Parquet shards."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root = Path(root).absolute()
        self.manifest = manifest
        self._validate_manifest()

    def _validate_manifest(self) -> None:
        m, where = self.manifest, self.root / MANIFEST
        need = ("name", "format_version", "num_classes", "classes", "image_shape", "mean", "std", "splits")
        missing = [k for k in need if k not in m]
        if missing:
            raise DatasetError(f"{where}: missing keys {missing}; re-run `stkd prepare`")
        if m["format_version"] != FORMAT_VERSION:
            raise DatasetError(
                f"{where}: format_version {m['format_version']} is not {FORMAT_VERSION}; re-run `stkd prepare`"
            )
        if len(m["classes"]) != m["num_classes"]:
            raise DatasetError(f"{where}: {len(m['classes'])} class names for num_classes={m['num_classes']}")
        try:
            _shape(m["image_shape"])
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None
        for split, info in m["splits"].items():
            if "shards" not in info or "rows" not in info:
                raise DatasetError(f"{where}: split {split!r} lacks rows/shards")
            if sum(s["rows"] for s in info["shards"]) != info["rows"]:
                raise DatasetError(f"{where}: split {split!r}: shard rows do not add up to {info['rows']}")

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "PreparedDataset":
        """Open a prepared dataset, checking every shard exists with the size the manifest records (a
        ``stat`` per shard); with ``verify``, also its sha256 (reads every byte: once per job or sweep)."""
        root = Path(path).expanduser().absolute()
        mpath = root / MANIFEST
        if not mpath.is_file():
            what = "does not exist" if not root.exists() else f"has no {MANIFEST}"
            raise DatasetError(
                f"{root} {what}: not a prepared dataset; run `stkd prepare SOURCE --out {root}` first"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"{mpath}: unreadable manifest ({e}); re-run `stkd prepare`") from e
        if not isinstance(manifest, dict):
            raise DatasetError(f"{mpath}: unreadable manifest (not a JSON object); re-run `stkd prepare`")
        ds = cls(root, manifest)
        ds.verify() if verify else ds.check_sizes()
        return ds

    def check_sizes(self) -> None:
        """Each shard exists and has the size in the manifest (manifests written before sizes were
        recorded: exists); raises :class:`DatasetError`. Catches a truncated or missing shard, not a
        changed byte: :meth:`verify` does."""
        for split, info in self.splits.items():
            for shard in info["shards"]:
                p = self.root / shard["file"]
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    raise DatasetError(f"{p}: shard of split {split!r} is missing; re-run `stkd prepare`") from None
                if "bytes" in shard and size != shard["bytes"]:
                    raise DatasetError(f"{p}: {size} bytes, the manifest says {shard['bytes']}: the shard is "
                                       "truncated or was changed; re-run `stkd prepare --overwrite`")

    def verify(self) -> None:
        """Check each shard's sha256 against the manifest; raises :class:`DatasetError`."""
        self.check_sizes()
        for split, info in self.splits.items():
            for shard in info["shards"]:
                p = self.root / shard["file"]
                got = file_sha256(p)
                if got != shard["sha256"]:
                    raise DatasetError(
                        f"{p}: sha256 mismatch (got {got}, manifest says {shard['sha256']}): the shard is "
                        "corrupt or was changed; re-run `stkd prepare --overwrite`"
                    )

    # --- manifest properties ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def source(self) -> str:
        return self.manifest.get("source", "")

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return _shape(self.manifest["image_shape"])  # type: ignore[return-value]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.manifest["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.manifest["std"])

    @property
    def splits(self) -> dict[str, dict]:
        """``{split: {"rows": int, "shards": [{"file", "rows", "sha256"}, ...]}}`` (iterates split names)."""
        return self.manifest["splits"]

    def _split(self, split: str) -> dict:
        try:
            return self.splits[split]
        except KeyError:
            raise DatasetError(f"{self.root}: no split {split!r} (has {', '.join(self.splits)})") from None

    def rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s["file"]) for s in self._split(split)["shards"]]

    # --- reading ---------------------------------------------------------------------------------

    def load_numpy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All rows of ``split`` as (uint8 ``(N, H, W, C)`` images, int64 ``(N,)`` labels)."""
        import pyarrow.parquet as pq

        info = self._split(split)
        shape = self.image_shape
        n = int(info["rows"])
        images = np.empty((n, *shape), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        pos = 0
        for shard in info["shards"]:
            path = self.root / shard["file"]
            try:
                table = pq.read_table(path, columns=["image", "label"])
            except (OSError, ValueError, KeyError) as e:
                raise DatasetError(f"{path}: cannot read shard ({e})") from e
            m = table.num_rows
            if m != shard["rows"] or pos + m > n:
                raise DatasetError(f"{path}: {m} rows, manifest says {shard['rows']}")
            try:
                images[pos : pos + m] = decode_images(table.column("image"), shape)
            except DatasetError as e:
                raise DatasetError(f"{path}: {e}") from None
            labels[pos : pos + m] = table.column("label").to_numpy()
            pos += m
        return images, labels

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={i['rows']}" for s, i in self.splits.items())
        return (
            f"PreparedDataset({str(self.root)!r}, name={self.name!r}, classes={self.num_classes}, "
            f"image_shape={self.image_shape}, {counts})"
        )
