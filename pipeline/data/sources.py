"""Readers for the raw dataset formats that `prepare` turns into Parquet shards.

Every reader produces a :class:`Source`: the class names plus, for each split, a sized iterable of
``(image, label, where)`` triples, where ``image`` is a uint8 ``H x W x C`` numpy array (C-order),
``label`` an int and ``where`` a human-readable location (file, archive member, pickle row) used in
error messages. Bad input raises :class:`PrepareError` naming the file and the problem.

Formats:

- CIFAR-10 / CIFAR-100 official python pickles: a ``cifar-10-batches-py/`` or ``cifar-100-python/``
  folder or the official ``.tar.gz`` (members are read straight from the tarball). CIFAR-100 uses the
  fine labels. Pickles are loaded with an unpickler that only accepts numpy arrays.
- CINIC-10: ``train/``, ``valid/``, ``test/`` class folders of PNGs.
- Tiny-ImageNet: ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` + ``val/val_annotations.txt``
  and ``wnids.txt``; its ``val`` split becomes ``test``.
- Any image folder tree ``<split>/<class>/<image>`` (PNG, JPEG, ...), as a folder or inside a
  ``.tar.gz``/``.tar``/``.zip`` (read without extracting), possibly under one top folder.
- The scikit-learn digits shipped inside scikit-learn (no download).

:func:`open_source` auto-detects the kind from SOURCE (``digits``, ``cifar10``/``cifar100`` names that
mean find-or-download, a folder layout, an archive); ``kind=`` overrides the detection.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

__all__ = [
    "ARCHIVES",
    "KINDS",
    "PrepareError",
    "Source",
    "Split",
    "default_data_dir",
    "detect_kind",
    "download",
    "open_source",
]


class PrepareError(ValueError):
    """Bad dataset input (or output location): the message names the file and the problem."""


KINDS = ("cifar10", "cifar100", "cinic10", "tinyimagenet", "imagefolder", "digits")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Pillow modes that hold no colour: a source whose images all have one of these is kept grey (C=1).
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


Example = tuple[np.ndarray, int, str]


@dataclass
class Split:
    """One split of a source: ``len()`` rows, iterating yields ``(image, label, where)``."""

    name: str
    size: int
    read: Callable[[], Iterator[Example]]

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Example]:
        return iter(self.read())


@dataclass
class Source:
    kind: str
    name: str
    origin: str  # what it was made from (path, URL, package function)
    classes: list[str]
    splits: dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------------------
# File trees: a directory or an archive, addressed by posix paths relative to a root
# --------------------------------------------------------------------------------------------------


def _junk(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


class _Store:
    """All files of a directory or archive: ``files`` maps a relative posix path to a handle."""

    def __init__(self, label: str):
        self.label = label
        self.files: dict[str, object] = {}
        self.children: dict[str, tuple[set[str], set[str]]] = {"": (set(), set())}

    def _add_dir(self, path: str) -> None:
        if path in self.children:
            return
        self.children[path] = (set(), set())
        parent, _, name = path.rpartition("/")
        self._add_dir(parent)
        self.children[parent][0].add(name)

    def add(self, path: str, handle: object, is_dir: bool = False) -> None:
        path = posixpath.normpath(path.replace("\\", "/")).lstrip("/")
        if path in ("", ".") or path.startswith("../"):
            return
        if any(_junk(p) for p in path.split("/")):
            return
        if is_dir:
            self._add_dir(path)
            return
        parent, _, name = path.rpartition("/")
        self._add_dir(parent)
        self.children[parent][1].add(name)
        self.files[path] = handle

    def read(self, path: str) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def where(self, path: str) -> str:
        return f"{self.label}:{path}" if path else self.label


class _DirStore(_Store):
    def __init__(self, root: Path):
        super().__init__(str(root))
        self.root = root
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _junk(d))
            rel = os.path.relpath(dirpath, root)
            rel = "" if rel == "." else rel.replace(os.sep, "/")
            if rel:
                self.add(rel, None, is_dir=True)
            for f in filenames:
                p = f"{rel}/{f}" if rel else f
                self.add(p, p)

    def read(self, path: str) -> bytes:
        try:
            with open(self.root / path, "rb") as f:
                return f.read()
        except OSError as e:
            raise PrepareError(f"{self.where(path)}: cannot read file ({e})") from e

    def where(self, path: str) -> str:
        return str(self.root / path) if path else str(self.root)


class _ProgressReader(io.RawIOBase):
    """A read-only file wrapper that advances a tqdm bar by the bytes read."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.bar.update(n)
        return n


class _TarStore(_Store):
    """A tarball read in one streaming pass; member contents are kept in memory (never extracted)."""

    def __init__(self, path: Path, progress: bool = False):
        super().__init__(str(path))
        from tqdm.auto import tqdm

        try:
            with open(path, "rb") as raw, tqdm(
                total=path.stat().st_size, unit="B", unit_scale=True, desc=f"read {path.name}",
                disable=not progress, leave=False,
            ) as bar:
                reader = io.BufferedReader(_ProgressReader(raw, bar), buffer_size=1 << 20)
                with tarfile.open(fileobj=reader, mode="r|*") as tf:
                    for m in tf:
                        if m.isdir():
                            self.add(m.name, None, is_dir=True)
                        elif m.isfile():
                            f = tf.extractfile(m)
                            self.add(m.name, f.read() if f is not None else b"")
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise PrepareError(f"{path}: cannot read tar archive ({type(e).__name__}: {e})") from e

    def read(self, path: str) -> bytes:
        return self.files[path]  # type: ignore[return-value]


class _ZipStore(_Store):
    def __init__(self, path: Path):
        super().__init__(str(path))
        try:
            self.zf = zipfile.ZipFile(path)
            for info in self.zf.infolist():
                self.add(info.filename, info.filename, is_dir=info.is_dir())
        except (zipfile.BadZipFile, OSError) as e:
            raise PrepareError(f"{path}: cannot read zip archive ({e})") from e

    def read(self, path: str) -> bytes:
        try:
            return self.zf.read(self.files[path])  # type: ignore[arg-type]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise PrepareError(f"{self.where(path)}: cannot read zip member ({e})") from e


class Tree:
    """A view of a store rooted at ``prefix``."""

    def __init__(self, store: _Store, prefix: str = ""):
        self.store, self.prefix = store, prefix.strip("/")

    def _abs(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.prefix}/{rel}".strip("/") if self.prefix else rel

    def sub(self, rel: str) -> "Tree":
        return Tree(self.store, self._abs(rel))

    def is_dir(self, rel: str = "") -> bool:
        return self._abs(rel) in self.store.children

    def is_file(self, rel: str) -> bool:
        return self._abs(rel) in self.store.files

    def listdir(self, rel: str = "") -> tuple[list[str], list[str]]:
        dirs, files = self.store.children.get(self._abs(rel), (set(), set()))
        return sorted(dirs), sorted(files)

    def walk_files(self, rel: str = "") -> list[str]:
        """All files under ``rel`` (recursively), as paths relative to this tree, sorted."""
        out: list[str] = []
        stack = [rel.strip("/")]
        while stack:
            d = stack.pop()
            dirs, files = self.listdir(d)
            out.extend(f"{d}/{f}" if d else f for f in files)
            stack.extend(f"{d}/{x}" if d else x for x in dirs)
        return sorted(out)

    def read(self, rel: str) -> bytes:
        return self.store.read(self._abs(rel))

    def where(self, rel: str = "") -> str:
        return self.store.where(self._abs(rel))


def _open_tree(path: Path, progress: bool = False) -> Tree:
    if path.is_dir():
        return Tree(_DirStore(path))
    if not path.is_file():
        raise PrepareError(f"{path}: no such file or directory")
    if zipfile.is_zipfile(path):
        return Tree(_ZipStore(path))
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e})") from e
    if not is_tar:
        raise PrepareError(f"{path}: not a directory, a tar archive (.tar.gz, .tgz, .tar) or a zip archive")
    return Tree(_TarStore(path, progress=progress))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------------


def _looks_like(tree: Tree, kind: str) -> bool:
    if kind == "cifar10":
        return tree.is_file("data_batch_1") and tree.is_file("batches.meta")
    if kind == "cifar100":
        return tree.is_file("train") and tree.is_file("test") and tree.is_file("meta")
    if kind == "tinyimagenet":
        return tree.is_file("wnids.txt") and tree.is_dir("train") and tree.is_dir("val")
    if kind == "cinic10":
        return all(tree.is_dir(s) for s in ("train", "valid", "test"))
    if kind == "imagefolder":
        return tree.is_dir("train")
    return False


# cinic10 is only chosen by name (kind="cinic10" or "cinic" in the source's name): any other
# train/valid/test tree is read as a generic image folder, which keeps all of its splits too.
_DETECT_ORDER = ("cifar10", "cifar100", "tinyimagenet", "imagefolder")


def _locate(tree: Tree, kinds: Iterable[str], max_depth: int = 4) -> tuple[Tree, str | None]:
    """Find the first of ``kinds`` at the root, descending through lone top folders."""
    kinds = tuple(kinds)
    t = tree
    for _ in range(max_depth + 1):
        for k in kinds:
            if _looks_like(t, k):
                return t, k
        dirs, _files = t.listdir()
        if len(dirs) != 1:
            break
        t = t.sub(dirs[0])
    return tree, None


def detect_kind(source: str | os.PathLike, *, progress: bool = False) -> str:
    """The kind :func:`open_source` would read SOURCE as (reads archives once)."""
    s = str(source)
    if not Path(s).expanduser().exists() and s.lower() in _NAME_ALIASES:
        return _NAME_ALIASES[s.lower()]
    _t, kind = _locate(_open_tree(Path(s).expanduser(), progress=progress), _DETECT_ORDER)
    if kind is None:
        raise PrepareError(_unrecognised(s))
    return kind


def _unrecognised(where: str) -> str:
    return (
        f"{where}: cannot recognise the dataset layout; expected CIFAR python pickles "
        "(data_batch_1 + batches.meta, or train + test + meta), Tiny-ImageNet (wnids.txt, train/, val/), "
        "or an image folder tree <split>/<class>/<image> with at least train/ and test/ "
        "(pass kind= / --kind to choose the reader)"
    )


# --------------------------------------------------------------------------------------------------
# CIFAR python pickles
# --------------------------------------------------------------------------------------------------

_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/str/bytes/numbers and numpy arrays only: a pickle cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_pickle(tree: Tree, rel: str) -> dict:
    where = tree.where(rel)
    if not tree.is_file(rel):
        raise PrepareError(f"{where}: missing file")
    data = tree.read(rel)
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure of a pickle is "unreadable"
        raise PrepareError(f"{where}: unreadable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise PrepareError(f"{where}: unreadable pickle (expected a dict, got {type(obj).__name__})")
    # Python 2 pickles have bytes keys; pickles written by Python 3 may have str keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(meta: dict, key: str, where: str) -> list[str]:
    if key not in meta:
        raise PrepareError(f"{where}: no {key!r} entry in the meta pickle")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[key]]


def _cifar_batch(tree: Tree, rel: str, label_key: str) -> tuple[np.ndarray, np.ndarray, str]:
    d = _load_pickle(tree, rel)
    where = tree.where(rel)
    if "data" not in d or label_key not in d:
        raise PrepareError(f"{where}: not a CIFAR batch (needs 'data' and {label_key!r}, has {sorted(d)})")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise PrepareError(f"{where}: 'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise PrepareError(f"{where}: {label_key!r} is not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],):
        raise PrepareError(f"{where}: {len(labels)} labels for {data.shape[0]} images")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels, where


def _array_split(name: str, parts: list[tuple[np.ndarray, np.ndarray, str]]) -> Split:
    def read() -> Iterator[Example]:
        for images, labels, where in parts:
            for i in range(len(images)):
                yield images[i], int(labels[i]), f"{where}[{i}]"

    return Split(name, sum(len(p[0]) for p in parts), read)


def _cifar_source(tree: Tree, kind: str, origin: str) -> Source:
    if kind == "cifar10":
        classes = _names(_load_pickle(tree, "batches.meta"), "label_names", tree.where("batches.meta"))
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = "labels"
    else:
        classes = _names(_load_pickle(tree, "meta"), "fine_label_names", tree.where("meta"))
        files = {"train": ["train"], "test": ["test"]}
        label_key = "fine_labels"
    splits = {
        split: _array_split(split, [_cifar_batch(tree, f, label_key) for f in names])
        for split, names in files.items()
    }
    return Source(kind, kind, origin, classes, splits)


# --------------------------------------------------------------------------------------------------
# Image files (folder trees, CINIC-10, Tiny-ImageNet)
# --------------------------------------------------------------------------------------------------


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _open_image(data: bytes, where: str):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise PrepareError(f"{where}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    return im


def _decode_image(data: bytes, where: str, grey: bool) -> np.ndarray:
    im = _open_image(data, where)
    target = "L" if grey else "RGB"
    try:
        if im.mode != target:
            if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F") and not grey:
                im = im.convert("L")
            im = im.convert(target)
        arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"{where}: cannot convert image of mode {im.mode} to {target} ({e})") from e
    return arr[:, :, None] if grey else arr


def _header_mode(data: bytes, where: str) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.mode
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"{where}: corrupt image ({type(e).__name__}: {e})") from e


def _image_splits(tree: Tree, items: dict[str, list[tuple[str, int]]]) -> dict[str, Split]:
    """Splits decoding ``(path, label)`` image items; RGB unless every image of the source is grey."""
    grey_state: dict[str, bool] = {}

    def all_grey() -> bool:
        if "grey" not in grey_state:
            grey = True
            for split_items in items.values():
                for p, _ in split_items:
                    if _header_mode(tree.read(p), tree.where(p)) not in GREY_MODES:
                        grey = False  # one colour image: everything is RGB; stop scanning
                        break
                if not grey:
                    break
            grey_state["grey"] = grey
        return grey_state["grey"]

    def make(name: str, split_items: list[tuple[str, int]]) -> Split:
        def read() -> Iterator[Example]:
            grey = all_grey()
            for p, label in split_items:
                where = tree.where(p)
                yield _decode_image(tree.read(p), where, grey), label, where

        return Split(name, len(split_items), read)

    return {name: make(name, split_items) for name, split_items in items.items()}


def _class_files(tree: Tree, rel: str) -> list[str]:
    files = [p for p in tree.walk_files(rel) if _is_image(p)]
    if not files:
        raise PrepareError(f"{tree.where(rel)}: empty class folder (no images)")
    return files


def _imagefolder_source(tree: Tree, kind: str, name: str, origin: str, required: tuple[str, ...]) -> Source:
    split_names, _ = tree.listdir()
    for r in required:
        if r not in split_names:
            raise PrepareError(
                f"{tree.where()}: missing split {r!r}: expected {'/, '.join(required)}/ folders "
                f"(<split>/<class>/<image>), found {split_names or 'no folders'}"
            )
    classes, _ = tree.listdir("train")
    if not classes:
        raise PrepareError(f"{tree.where('train')}: no class folders (expected train/<class>/<image>)")
    order = ["train"] + [s for s in split_names if s != "train"]
    items: dict[str, list[tuple[str, int]]] = {}
    for split in order:
        dirs, files = tree.listdir(split)
        if dirs != classes:
            missing = sorted(set(classes) - set(dirs))
            extra = sorted(set(dirs) - set(classes))
            raise PrepareError(
                f"{tree.where(split)}: the class folders differ from train's "
                f"(missing: {missing or 'none'}, extra: {extra or 'none'}); every split must have the same classes"
            )
        loose = [f for f in files if _is_image(f)]
        if loose:
            raise PrepareError(
                f"{tree.where(split + '/' + loose[0])}: image directly in the split folder; "
                "expected <split>/<class>/<image>"
            )
        items[split] = [
            (p, label) for label, c in enumerate(classes) for p in _class_files(tree, f"{split}/{c}")
        ]
    return Source(kind, name, origin, list(classes), _image_splits(tree, items))


def _read_text(tree: Tree, rel: str) -> str:
    if not tree.is_file(rel):
        raise PrepareError(f"{tree.where(rel)}: missing file")
    try:
        return tree.read(rel).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{tree.where(rel)}: not a UTF-8 text file ({e})") from e


def _tinyimagenet_source(tree: Tree, origin: str) -> Source:
    wnids = [w.strip() for w in _read_text(tree, "wnids.txt").splitlines() if w.strip()]
    if not wnids:
        raise PrepareError(f"{tree.where('wnids.txt')}: no class ids")
    if len(set(wnids)) != len(wnids):
        raise PrepareError(f"{tree.where('wnids.txt')}: duplicate class ids")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}

    train_dirs, _ = tree.listdir("train")
    extra = sorted(set(train_dirs) - set(classes))
    if extra:
        raise PrepareError(f"{tree.where('train')}: class folders not in wnids.txt: {extra[:5]}")
    train: list[tuple[str, int]] = []
    for w in classes:
        if not tree.is_dir(f"train/{w}"):
            raise PrepareError(f"{tree.where('train/' + w)}: missing class folder (listed in wnids.txt)")
        rel = f"train/{w}/images" if tree.is_dir(f"train/{w}/images") else f"train/{w}"
        train.extend((p, index[w]) for p in _class_files(tree, rel))

    ann_rel = "val/val_annotations.txt"
    ann_where = tree.where(ann_rel)
    _, image_files = tree.listdir("val/images")
    image_files = [f for f in image_files if _is_image(f)]
    test: list[tuple[str, int]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(_read_text(tree, ann_rel).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise PrepareError(f"{ann_where}: line {lineno}: expected 'file<TAB>wnid<TAB>bbox...', got {line!r}")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise PrepareError(f"{ann_where}: line {lineno}: class {wnid!r} is not in wnids.txt")
        if not tree.is_file(f"val/images/{fname}"):
            raise PrepareError(f"{ann_where}: line {lineno}: {tree.where('val/images/' + fname)} does not exist")
        if fname in seen:
            raise PrepareError(f"{ann_where}: line {lineno}: {fname} annotated twice")
        seen.add(fname)
        test.append((f"val/images/{fname}", index[wnid]))
    unlabelled = [f for f in image_files if f not in seen]
    if unlabelled:
        raise PrepareError(f"{tree.where('val/images/' + unlabelled[0])}: image has no line in {ann_where}")
    if not test:
        raise PrepareError(f"{ann_where}: no validation images (the val split becomes test)")
    return Source("tinyimagenet", "tinyimagenet", origin, classes, _image_splits(tree, {"train": train, "test": test}))


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------


def _digits_source() -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SEED
    )
    idx_test = np.sort(idx_test)  # test in source order
    idx_train = np.sort(idx_train)
    where = "sklearn.datasets.load_digits"
    splits = {
        "train": _array_split("train", [(images[idx_train], labels[idx_train], where)]),
        "test": _array_split("test", [(images[idx_test], labels[idx_test], where)]),
    }
    return Source("digits", "digits", where, [str(i) for i in range(10)], splits)


# --------------------------------------------------------------------------------------------------
# Download / find CIFAR
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    filename: str
    folder: str  # the folder the archive holds


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
    ),
    "cifar100": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python.tar.gz",
        "cifar-100-python",
    ),
}

_NAME_ALIASES = {
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "digits": "digits",
}


def default_data_dir() -> Path:
    """Where CIFAR archives are looked for and downloaded: $STKD_DATA_DIR or ~/.cache/stkd/datasets."""
    env = os.environ.get("STKD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stkd" / "datasets"


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(
    kind: str,
    dest: str | os.PathLike,
    *,
    url: str | None = None,
    md5: str | None = None,
    opener: Callable | None = None,
    progress: bool = False,
) -> Path:
    """Download the official CIFAR archive of ``kind`` into folder ``dest``; returns the archive path.

    The md5 is checked before the file is moved into place (atomically); on a mismatch or any error
    nothing is left in ``dest``. An archive already in ``dest`` with the right md5 is reused.
    ``url``/``md5``/``opener`` (default :func:`urllib.request.urlopen`) can be overridden.
    """
    if kind not in ARCHIVES:
        raise PrepareError(f"cannot download {kind!r}: only {sorted(ARCHIVES)} can be downloaded")
    info = ARCHIVES[kind]
    url = url or info.url
    md5 = (md5 or info.md5).lower()
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / info.filename
    if target.is_file() and _md5(target) == md5:
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            got = fetch_to(f, url, opener or urllib.request.urlopen, f"download {info.filename}", progress)
        if got != md5:
            raise PrepareError(
                f"{url}: md5 mismatch (got {got}, expected {md5}): the download is corrupt or the file "
                f"changed; nothing was written to {dest}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def fetch_to(out, url: str, opener: Callable, label: str, progress: bool) -> str:
    """Stream ``url`` into the open file ``out`` with a progress bar; its md5. A network error is a PrepareError."""
    from tqdm.auto import tqdm

    h = hashlib.md5(usedforsecurity=False)
    try:
        response = opener(url, timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PrepareError(f"cannot download {url}: {e}") from e
    with response, tqdm(total=getattr(response, "length", None), unit="B", unit_scale=True, desc=label,
                        disable=not progress) as bar:
        while True:
            try:
                chunk = response.read(1 << 20)
            except OSError as e:
                raise PrepareError(f"cannot download {url}: {e}") from e
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))


def _find_cifar(kind: str, search: list[Path]) -> Path | None:
    info = ARCHIVES[kind]
    for d in search:
        for candidate in (d / info.folder, d / info.filename):
            if candidate.exists():
                return candidate
    return None


def _find_or_download(kind: str, download_ok: bool, data_dir: Path | None, progress: bool) -> Path:
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    search = [Path.cwd(), data_dir]
    found = _find_cifar(kind, search)
    if found is not None:
        return found
    if not download_ok:
        info = ARCHIVES[kind]
        raise PrepareError(
            f"{kind}: no {info.folder}/ or {info.filename} in {', '.join(str(p) for p in search)}; "
            f"pass download=True (--download) to fetch {info.url}, or give the path of the folder/archive"
        )
    return download(kind, data_dir, progress=progress)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def open_source(
    source: str | os.PathLike,
    *,
    kind: str | None = None,
    download: bool = False,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Source:
    """Read SOURCE as ``kind`` (auto-detected when None). See the module docstring for the formats."""
    if kind is not None:
        kind = kind.lower().replace("-", "").replace("_", "")
        kind = {"tiny": "tinyimagenet", "folder": "imagefolder", "cinic": "cinic10"}.get(kind, kind)
        if kind not in KINDS:
            raise PrepareError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    s = os.fspath(source)
    path = Path(s).expanduser()
    if kind == "digits" or (not path.exists() and _NAME_ALIASES.get(s.lower()) == "digits" and kind is None):
        return _digits_source()
    if not path.exists():
        alias = _NAME_ALIASES.get(s.lower())
        if alias in ARCHIVES and kind in (None, alias):
            path = _find_or_download(alias, download, Path(data_dir) if data_dir else None, progress)
            kind = alias
        else:
            raise PrepareError(
                f"{s}: no such file or directory (known dataset names: cifar10, cifar100 "
                "[found locally or downloaded with download=True], digits)"
            )
    path = path.absolute()
    tree = _open_tree(path, progress=progress)
    root, found = _locate(tree, (kind,) if kind else _DETECT_ORDER)
    if found is None:
        if kind is None:
            raise PrepareError(_unrecognised(str(path)))
        found = kind  # let the reader report what is missing
    origin = str(path)
    if found == "imagefolder" and kind is None and "cinic" in path.name.lower() and _looks_like(root, "cinic10"):
        found = "cinic10"
    if found in ("cifar10", "cifar100"):
        return _cifar_source(root, found, origin)
    if found == "tinyimagenet":
        return _tinyimagenet_source(root, origin)
    if found == "cinic10":
        return _imagefolder_source(root, "cinic10", "cinic10", origin, ("train", "valid", "test"))
    return _imagefolder_source(root, "imagefolder", _stem(path), origin, ("train", "test"))
