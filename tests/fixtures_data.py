"""Writers of tiny datasets in the real on-disk formats, for the prepare/dataset tests.

Each ``make_*`` function writes into a folder and returns the ground truth:
``{"classes": [...], "splits": {split: (uint8 NHWC images, int64 labels)}}`` in source order.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 -> the official (N, 3072) CHW rows."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


def write_pickle(path: Path, obj: dict, py2_globals: bool = True) -> None:
    """Pickle like the official files: bytes keys; with ``py2_globals`` numpy is named ``numpy.core``
    as in the real (Python 2 era) files."""
    data = pickle.dumps(obj, protocol=2)
    if py2_globals:
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(data)


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch)
        y[: min(per_batch, 10)] = np.arange(min(per_batch, 10))  # every class appears early
        write_pickle(
            folder / f"data_batch_{i}",
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": [int(v) for v in y],
             b"data": _cifar_rows(x), b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]},
        )
        train_x.append(x)
        train_y.append(y)
    tx = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    ty = rng.integers(0, 10, size=n_test)
    write_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in ty],
                                         b"data": _cifar_rows(tx)})
    write_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                           b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return {
        "folder": folder,
        "classes": CIFAR10_CLASSES,
        "splits": {
            "train": (np.concatenate(train_x), np.concatenate(train_y).astype(np.int64)),
            "test": (tx, ty.astype(np.int64)),
        },
    }


def make_cifar100(root: Path, n_train: int = 12, n_test: int = 5, n_classes: int = 100, seed: int = 1) -> dict:
    """``root/cifar-100-python`` with train, test, meta (fine + coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"class_{i:02d}" for i in range(n_classes)]
    out = {"folder": folder, "classes": fine, "splits": {}}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, n_classes, size=n)
        write_pickle(folder / split, {b"filenames": [b"x"] * n, b"batch_label": split.encode(),
                                      b"fine_labels": [int(v) for v in y],
                                      b"coarse_labels": [int(v) // 5 for v in y], b"data": _cifar_rows(x)})
        out["splits"][split] = (x, y.astype(np.int64))
    write_pickle(folder / "meta", {b"fine_label_names": [c.encode() for c in fine],
                                   b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]})
    return out


def make_tar_gz(folder: Path, archive: Path, arcname: str | None = None) -> Path:
    """Tar ``folder`` (under its own name, like the official archives) into ``archive``."""
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=arcname if arcname is not None else Path(folder).name)
    return archive


def save_image(path: Path, img: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(img[:, :, 0], "L") if img.shape[2] == 1 else Image.fromarray(img)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        pil.save(path, quality=quality)
    else:
        pil.save(path)


def decode_file(path: Path, channels: int = 3) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return arr[:, :, None] if channels == 1 else arr


def make_image_tree(
    root: Path,
    counts: dict[str, int] | None = None,
    classes: tuple[str, ...] = ("cat", "dog", "frog"),
    size: tuple[int, int] = (8, 6),
    ext: str = ".png",
    channels: int = 3,
    seed: int = 2,
) -> dict:
    """``root/<split>/<class>/<NNNN><ext>`` with ``counts[split]`` images per class.

    Returns the ground truth in source order (class by class, file names sorted); for JPEG the pixels
    are what Pillow decodes from the written file.
    """
    counts = counts or {"train": 4, "test": 2}
    rng = np.random.default_rng(seed)
    out = {"folder": Path(root), "classes": sorted(classes), "splits": {}}
    for split, n in counts.items():
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            for j in range(n):
                img = rng.integers(0, 256, size=(*size, channels), dtype=np.uint8)
                path = Path(root) / split / cls / f"{j:04d}{ext}"
                save_image(path, img)
                xs.append(decode_file(path, channels))
                ys.append(label)
        out["splits"][split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return out


def make_cinic10(root: Path, n: int = 2, classes=("airplane", "automobile", "bird")) -> dict:
    return make_image_tree(root, {"train": n, "valid": n, "test": n}, classes=classes, size=(32, 32), seed=3)


def make_tiny_imagenet(root: Path, n_train: int = 3, n_val: int = 2, size: tuple[int, int] = (16, 16)) -> dict:
    """``root/tiny-imagenet-200``: wnids.txt, words.txt, train/<wnid>/images/*.JPEG + boxes, val/..., test/."""
    rng = np.random.default_rng(4)
    top = Path(root) / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537", "n09246464"]  # deliberately unsorted, like the real file
    (top / "train").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    classes = sorted(wnids)
    xs, ys = [], []
    for label, w in enumerate(classes):
        boxes = []
        for j in range(n_train):
            img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            p = top / "train" / w / "images" / f"{w}_{j}.JPEG"
            save_image(p, img)
            xs.append(decode_file(p))
            ys.append(label)
            boxes.append(f"{w}_{j}.JPEG\t0\t0\t10\t10\n")
        (top / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    vx, vy, lines = [], [], []
    for j in range(n_val * len(classes)):
        w = classes[(j * 2) % len(classes)]
        img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        p = top / "val" / "images" / f"val_{j}.JPEG"
        save_image(p, img)
        vx.append(decode_file(p))
        vy.append(classes.index(w))
        lines.append(f"val_{j}.JPEG\t{w}\t1\t2\t30\t40\n")
    (top / "val" / "val_annotations.txt").write_text("".join(lines))
    for j in range(2):  # the unlabelled test split of the real archive, ignored
        save_image(top / "test" / "images" / f"test_{j}.JPEG", rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
    return {
        "folder": top,
        "classes": classes,
        "splits": {"train": (np.stack(xs), np.asarray(ys, dtype=np.int64)),
                   "test": (np.stack(vx), np.asarray(vy, dtype=np.int64))},
    }


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def prepared_random_images(root: Path, counts: dict[str, tuple[int, ...]], seed: int) -> Path:
    """A prepared dataset of distinct random 8x8 RGB images: ``counts[split][c]`` images of class ``c``
    (classes ``a``, ``b``, ...), written as a PNG class-per-folder tree under ``root / "src"`` and run
    through ``prepare`` into ``root / "prepared"``, which is returned."""
    from pipeline.data.prepare import prepare

    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for cls, count in zip("abcdefghij", per_class):
            folder = root / "src" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    prepare(root / "src", root / "prepared", progress=False)
    return root / "prepared"
