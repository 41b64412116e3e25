"""`stkd prepare`: turn a raw dataset into Parquet shards of raw uint8 pixels plus a manifest.

A prepared dataset is a directory::

    manifest.json          {"name", "source", "format_version": 1, "num_classes", "classes",
                            "image_shape": [H, W, C], "mean": [...], "std": [...],   # train pixels / 255
                            "splits": {"train": {"rows", "shards": [{"file", "rows", "sha256", "bytes"}]}, ...}}
    train-00000.parquet    columns image (binary: raw uint8 HWC bytes, C-order) and label (int64)
    ...

Train rows are written in a shuffled order (fixed seed, so every shard holds all classes); the other
splits keep the source order. Everything is written into a temporary folder next to ``out`` that is
renamed into place at the end, so a failed or interrupted prepare leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from pipeline.data.dataset import FORMAT_VERSION, MANIFEST, file_sha256
from pipeline.data.sources import KINDS, PrepareError, Source, open_source

__all__ = [
    "FORMAT_VERSION",
    "PrepareError",
    "SHUFFLE_SEED",
    "add_arguments",
    "prepare",
    "run",
    "summary",
]

SHUFFLE_SEED = 0
_STATS_CHUNK = 1024  # images per chunk of the float64 mean/std accumulation
_MAX_ARROW_CHUNK_BYTES = 1 << 30  # keep int32 binary offsets far from overflow


def _normalize_resize(resize) -> tuple[int, int] | None:
    if resize is None:
        return None
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        size = (int(resize), int(resize))
    else:
        try:
            h, w = resize
            size = (int(h), int(w))
        except (TypeError, ValueError) as e:
            raise PrepareError(f"resize must be an int or (H, W), got {resize!r}") from e
    if min(size) < 1:
        raise PrepareError(f"resize must be positive, got {resize!r}")
    return size


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == size:
        return img
    from PIL import Image

    h, w = size
    if img.shape[2] == 1:
        out = np.asarray(Image.fromarray(img[:, :, 0], "L").resize((w, h), Image.Resampling.BICUBIC))
        return out[:, :, None]
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


def _fmt_shape(shape) -> str:
    return "x".join(str(int(x)) for x in shape)


class _Checker:
    """Validates examples one by one: uint8 HWC, one size for all (after an optional resize), label range."""

    def __init__(self, num_classes: int, resize: tuple[int, int] | None):
        self.num_classes = num_classes
        self.resize = resize
        self.shape: tuple[int, int, int] | None = None
        self.first: str | None = None

    def __call__(self, img: np.ndarray, label: int, where: str) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3):
            desc = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
            raise PrepareError(f"{where}: expected a uint8 HxWx1 or HxWx3 image, got {desc}")
        if self.resize is not None:
            img = _resize(img, self.resize)
        if self.shape is None:
            self.shape, self.first = img.shape, where
        elif img.shape != self.shape:
            raise PrepareError(
                f"{where}: image is {_fmt_shape(img.shape)} (HxWxC) but the first image ({self.first}) is "
                f"{_fmt_shape(self.shape)}; every image must have the same size - pass resize=(H, W) "
                "(--resize) to resize them all"
            )
        if not 0 <= label < self.num_classes:
            raise PrepareError(f"{where}: label {label} is outside the class range 0..{self.num_classes - 1}")
        return img


class _Stats:
    """Per-channel mean/std of pixels / 255, accumulated in float64 (sums of integers: exact)."""

    def __init__(self):
        self.n = 0
        self.s: np.ndarray | None = None
        self.ss: np.ndarray | None = None

    def update(self, images: np.ndarray) -> None:  # (N, H, W, C) uint8
        c = images.shape[-1]
        if self.s is None:
            self.s, self.ss = np.zeros(c), np.zeros(c)
        for i in range(0, len(images), _STATS_CHUNK):
            x = images[i : i + _STATS_CHUNK].reshape(-1, c).astype(np.float64)
            self.s += x.sum(axis=0)
            self.ss += np.einsum("ij,ij->j", x, x)
            self.n += x.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.s / self.n
        var = np.maximum(self.ss / self.n - mean * mean, 0.0)
        return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0).tolist()


def _binary_array(images: np.ndarray):
    """A pyarrow binary (chunked) array whose values are the raw bytes of each image, built zero-copy."""
    import pyarrow as pa

    n = len(images)
    item = int(np.prod(images.shape[1:]))
    flat = np.ascontiguousarray(images).reshape(n, item)
    per_chunk = max(1, _MAX_ARROW_CHUNK_BYTES // max(item, 1))
    chunks = []
    for start in range(0, max(n, 1), per_chunk):
        part = flat[start : start + per_chunk]
        m = len(part)
        offsets = np.arange(0, (m + 1) * item, item, dtype=np.int32)
        chunks.append(
            pa.Array.from_buffers(pa.binary(), m, [None, pa.py_buffer(offsets), pa.py_buffer(part.reshape(-1))])
        )
    return pa.chunked_array(chunks, type=pa.binary())


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write one Parquet shard (columns image, label); returns its sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": _binary_array(images), "label": pa.array(labels, type=pa.int64())})
    pq.write_table(
        table,
        path,
        compression="zstd",
        use_dictionary=["label"],
        write_statistics=["label"],
        row_group_size=max(len(labels), 1),
    )
    return file_sha256(path)


def _collect(split, check: _Checker, bar) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole split into one (N, H, W, C) array (train needs it for the shuffle)."""
    images: np.ndarray | None = None
    labels = np.empty(len(split), dtype=np.int64)
    i = -1
    for i, (img, label, where) in enumerate(split):
        img = check(img, int(label), where)
        if images is None:
            images = np.empty((len(split), *img.shape), dtype=np.uint8)
        if i >= len(images):
            raise PrepareError(f"{where}: split {split.name!r} has more rows than announced ({len(split)})")
        images[i] = img
        labels[i] = label
        bar.update(1)
    if i + 1 != len(split) or images is None:
        raise PrepareError(f"split {split.name!r}: read {i + 1} rows, expected {len(split)}")
    return images, labels


def _write_split(split, name: str, tmp: Path, check: _Checker, shard_rows: int, bar, stats: _Stats | None) -> dict:
    shards: list[dict] = []

    def flush(images: np.ndarray, labels: np.ndarray) -> None:
        file = f"{name}-{len(shards):05d}.parquet"
        sha = _write_shard(tmp / file, images, labels)
        shards.append({"file": file, "rows": int(len(labels)), "sha256": sha, "bytes": (tmp / file).stat().st_size})

    if len(split) == 0:
        raise PrepareError(f"split {name!r} of the source is empty")
    if name == "train":
        images, labels = _collect(split, check, bar)
        perm = np.random.default_rng(SHUFFLE_SEED).permutation(len(labels))
        for start in range(0, len(perm), shard_rows):
            idx = perm[start : start + shard_rows]
            shard_images = images[idx]
            if stats is not None:
                stats.update(shard_images)
            flush(shard_images, labels[idx])
        del images
    else:  # stream in source order
        buf_images: list[np.ndarray] = []
        buf_labels: list[int] = []
        count = 0
        for img, label, where in split:
            buf_images.append(check(img, int(label), where))
            buf_labels.append(int(label))
            count += 1
            bar.update(1)
            if len(buf_labels) == shard_rows:
                flush(np.stack(buf_images), np.asarray(buf_labels, dtype=np.int64))
                buf_images, buf_labels = [], []
        if buf_labels:
            flush(np.stack(buf_images), np.asarray(buf_labels, dtype=np.int64))
        if count != len(split):
            raise PrepareError(f"split {name!r}: read {count} rows, expected {len(split)}")
    return {"rows": int(sum(s["rows"] for s in shards)), "shards": shards}


def _check_out(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise PrepareError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.is_symlink() or not out.is_dir():
        raise PrepareError(f"{out} exists and is not a directory; refusing to replace it")
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise PrepareError(
            f"{out} exists and is not a prepared dataset (no {MANIFEST}); refusing to replace it even with "
            "overwrite - remove it yourself or choose another --out"
        )


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (replacing an old dataset only when asked)."""
    _check_out(out, overwrite)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _build(src: Source, tmp: Path, resize, shard_rows: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    check = _Checker(src.num_classes, resize)
    stats = _Stats()
    order = ["train"] + [s for s in src.splits if s != "train"]
    splits: dict[str, dict] = {}
    with tqdm(
        total=sum(len(src.splits[s]) for s in order), unit="img", desc=f"prepare {src.name}",
        disable=not progress, dynamic_ncols=True,
    ) as bar:
        for name in order:
            bar.set_postfix_str(name)
            splits[name] = _write_split(
                src.splits[name], name, tmp, check, shard_rows, bar, stats if name == "train" else None
            )
    mean, std = stats.result()
    manifest = {
        "name": src.name,
        "source": src.origin,
        "format_version": FORMAT_VERSION,
        "num_classes": src.num_classes,
        "classes": list(src.classes),
        "image_shape": [int(x) for x in check.shape],
        "mean": mean,
        "std": std,
        "splits": splits,
    }
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kind: str | None = None,
    overwrite: bool = False,
    resize: int | tuple[int, int] | None = None,
    download: bool = False,
    shard_rows: int = 10_000,
    progress: bool = True,
) -> dict:
    """Prepare SOURCE into the dataset directory OUT; returns the manifest.

    SOURCE is a folder or archive (CIFAR pickles, CINIC-10, Tiny-ImageNet, any ``<split>/<class>/<image>``
    tree), or one of the names ``cifar10``/``cifar100`` (found locally or, with ``download=True``,
    downloaded) and ``digits``. ``kind`` overrides the detection. ``resize`` (int or (H, W)) resizes
    every image; without it all images must have one size. Raises :class:`PrepareError` on bad input,
    leaving nothing at ``out``.
    """
    if not isinstance(shard_rows, (int, np.integer)) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise PrepareError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    size = _normalize_resize(resize)
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    src = open_source(source, kind=kind, download=download, progress=progress)
    for required in ("train", "test"):
        if required not in src.splits:
            raise PrepareError(f"{src.origin}: missing split {required!r} (found {sorted(src.splits)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Created with the umask's permissions (mkdtemp's 0700 would make the dataset private to its writer).
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        manifest = _build(src, tmp, size, int(shard_rows), progress)
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def summary(manifest: dict, out: str | os.PathLike) -> str:
    """A few lines saying what a prepare wrote."""
    out = Path(out)
    classes = manifest["classes"]
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes) - 10} more)" if len(classes) > 10 else "")
    lines = [
        f"prepared {manifest['name']} -> {out}",
        f"  source:      {manifest['source']}",
        f"  classes:     {manifest['num_classes']} ({shown})",
        f"  image shape: {_fmt_shape(manifest['image_shape'])} (HxWxC, uint8)",
    ]
    for name, info in manifest["splits"].items():
        n = len(info["shards"])
        lines.append(f"  {name + ':':<12} {info['rows']:,} rows in {n} shard{'s' if n != 1 else ''}")
    fmt = lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"  # noqa: E731
    lines.append(f"  mean / std:  {fmt(manifest['mean'])} / {fmt(manifest['std'])}")
    if out.is_dir():
        lines.append(f"  on disk:     {_human(_dir_size(out))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _resize_arg(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1 and parts[0] > 0:
        return parts[0]
    if len(parts) == 2 and min(parts) > 0:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `stkd prepare` arguments to ``parser``."""
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="folder or archive (.tar.gz/.tar/.zip) of CIFAR pickles, CINIC-10, Tiny-ImageNet or a "
        "<split>/<class>/<image> tree; or cifar10, cifar100 (found in $STKD_DATA_DIR, ~/.cache/stkd/datasets "
        "or the current folder, else --download) or digits",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    parser.add_argument("--kind", choices=KINDS, default=None, help="source format (default: detected)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    parser.add_argument("--resize", type=_resize_arg, default=None, metavar="N|HxW", help="resize every image")
    parser.add_argument("--download", action="store_true", help="download cifar10/cifar100 if not found")
    parser.add_argument("--shard-rows", type=_positive_int, default=10_000, metavar="N", help="rows per shard")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `stkd prepare` from parsed arguments; prints the summary. Returns the exit status."""
    start = time.perf_counter()
    try:
        manifest = prepare(
            args.source,
            args.out,
            kind=args.kind,
            overwrite=args.overwrite,
            resize=args.resize,
            download=args.download,
            shard_rows=args.shard_rows,
            progress=getattr(args, "progress", True),
        )
    except PrepareError as e:
        print(f"stkd prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, Path(args.out).expanduser().absolute()))
    print(f"  took:        {time.perf_counter() - start:.1f} s")
    return 0
