"""`stkd prepare`: every source format, the manifest, the shards, bad input and atomic writes."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import prepare as prepare_mod
from pipeline.data import sources
from pipeline.data.dataset import PreparedDataset
from pipeline.cli import main as stkd
from pipeline.data.prepare import PrepareError, add_arguments, prepare, run, summary

try:
    from tests import fixtures_data as fx
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    import fixtures_data as fx


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def leftovers(out: Path) -> list[str]:
    """Anything prepare may have left next to ``out``: ``out`` itself or its temporary folders."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert leftovers(out) == []


def rows_multiset(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter((img.tobytes(), int(lab)) for img, lab in zip(images, labels))


def check_prepared(out: Path, manifest: dict, truth: dict, exact_test: bool = True) -> PreparedDataset:
    """Counts, classes, shape, stats, checksums, pixels: everything a prepared dataset must satisfy."""
    ds = PreparedDataset.open(out, verify=True)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format_version"] == 1
    assert manifest["classes"] == list(truth["classes"])
    assert manifest["num_classes"] == len(truth["classes"])
    assert set(manifest["splits"]) == set(truth["splits"])
    train_x, train_y = truth["splits"]["train"]
    assert manifest["image_shape"] == list(train_x.shape[1:])
    for split, (x, y) in truth["splits"].items():
        assert manifest["splits"][split]["rows"] == len(y)
        got_x, got_y = ds.load_numpy(split)
        assert got_x.dtype == np.uint8 and got_y.dtype == np.int64
        assert got_x.shape == x.shape
        if split == "train":  # shuffled: same rows, in some order
            assert rows_multiset(got_x, got_y) == rows_multiset(x, y)
        elif exact_test:  # source order
            np.testing.assert_array_equal(got_x, x)
            np.testing.assert_array_equal(got_y, y)
        for shard in manifest["splits"][split]["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    pixels = train_x.reshape(-1, train_x.shape[-1]) / 255.0
    np.testing.assert_allclose(manifest["mean"], pixels.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(manifest["std"], pixels.std(axis=0), rtol=1e-10, atol=1e-14)
    return ds


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    truth = fx.make_cifar10(root)
    truth["archive"] = fx.make_tar_gz(truth["folder"], root / "cifar-10-python.tar.gz")
    return truth


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    truth = fx.make_cifar100(root)
    truth["archive"] = fx.make_tar_gz(truth["folder"], root / "cifar-100-python.tar.gz")
    return truth


def png_tree(tmp_path: Path, **kw) -> dict:
    return fx.make_image_tree(tmp_path / "tree", **kw)


# --------------------------------------------------------------------------------------------------
# every source prepares right
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_cifar10(cifar10, tmp_path, form):
    out = tmp_path / "out"
    m = prepare(cifar10[form], out, progress=False)
    assert m["name"] == "cifar10"
    assert m["source"] == str(Path(cifar10[form]).absolute())
    assert m["image_shape"] == [32, 32, 3]
    assert list(m["splits"]) == ["train", "test"]
    assert m["splits"]["train"]["rows"] == 20 and m["splits"]["test"]["rows"] == 6
    check_prepared(out, m, cifar10)
    assert leftovers(out) == ["out"]


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_cifar100_uses_fine_labels(cifar100, tmp_path, form):
    out = tmp_path / "out"
    m = prepare(cifar100[form], out, progress=False)
    assert m["name"] == "cifar100" and m["num_classes"] == 100
    check_prepared(out, m, cifar100)


def test_kind_override_and_kind_mismatch(cifar10, tmp_path):
    m = prepare(cifar10["folder"], tmp_path / "a", kind="cifar10", progress=False)
    assert m["splits"]["train"]["rows"] == 20
    with pytest.raises(PrepareError, match="meta: missing file"):
        prepare(cifar10["folder"], tmp_path / "b", kind="cifar100", progress=False)
    assert_nothing_written(tmp_path / "b")
    with pytest.raises(PrepareError, match="unknown kind"):
        prepare(cifar10["folder"], tmp_path / "c", kind="mnist", progress=False)


def test_png_tree_round_trips_exactly(tmp_path):
    truth = png_tree(tmp_path, counts={"train": 5, "test": 3})
    out = tmp_path / "out"
    m = prepare(truth["folder"], out, progress=False, shard_rows=4)
    assert m["name"] == "tree"
    assert m["classes"] == ["cat", "dog", "frog"]
    assert m["image_shape"] == [8, 6, 3]
    assert [s["rows"] for s in m["splits"]["train"]["shards"]] == [4, 4, 4, 3]
    assert [s["file"] for s in m["splits"]["test"]["shards"]] == ["test-00000.parquet", "test-00001.parquet", "test-00002.parquet"]
    check_prepared(out, m, truth)


def test_jpeg_tree_in_targz_under_top_folder(tmp_path):
    """Like the real cifar10-jpg.tar.gz: train/<class>/NNNN.jpg, here under one top folder."""
    truth = fx.make_image_tree(tmp_path / "src" / "cifar10-jpg", ext=".jpg", size=(12, 12))
    archive = fx.make_tar_gz(truth["folder"], tmp_path / "cifar10-jpg.tar.gz")
    out = tmp_path / "out"
    m = prepare(archive, out, progress=False)
    assert m["name"] == "cifar10-jpg"
    assert m["source"] == str(archive)
    check_prepared(out, m, truth)  # pixels equal Pillow's decoding of the same JPEG files


def test_targz_without_top_folder_and_zip(tmp_path):
    import zipfile

    truth = png_tree(tmp_path)
    archive = fx.make_tar_gz(truth["folder"], tmp_path / "flat.tar.gz", arcname=".")
    m = prepare(archive, tmp_path / "o1", progress=False)
    check_prepared(tmp_path / "o1", m, truth)
    zpath = tmp_path / "tree.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(truth["folder"].rglob("*.png")):
            zf.write(p, p.relative_to(truth["folder"].parent).as_posix())
    m = prepare(zpath, tmp_path / "o2", progress=False)
    check_prepared(tmp_path / "o2", m, truth)


def test_mixed_png_and_jpeg_tree(tmp_path):
    truth = png_tree(tmp_path, counts={"train": 2, "test": 1})
    # turn one training image into a JPEG: both formats are read in one tree
    src = truth["folder"] / "train" / "dog" / "0001.png"
    img = fx.decode_file(src)
    src.unlink()
    fx.save_image(truth["folder"] / "train" / "dog" / "0001.jpg", img)
    m = prepare(truth["folder"], tmp_path / "out", progress=False)
    assert m["splits"]["train"]["rows"] == 6


def test_grey_tree_keeps_one_channel_and_mixed_tree_is_rgb(tmp_path):
    truth = fx.make_image_tree(tmp_path / "grey", channels=1)
    m = prepare(truth["folder"], tmp_path / "o1", progress=False)
    assert m["image_shape"] == [8, 6, 1] and len(m["mean"]) == 1
    check_prepared(tmp_path / "o1", m, truth)

    fx.save_image(truth["folder"] / "test" / "dog" / "0009.png", np.full((8, 6, 3), (255, 0, 0), np.uint8))
    m = prepare(truth["folder"], tmp_path / "o2", progress=False)
    assert m["image_shape"] == [8, 6, 3]
    x, _ = PreparedDataset.open(tmp_path / "o2").load_numpy("test")
    assert (x[:, :, :, 0] == x[:, :, :, 1]).sum() > 0  # greys became R=G=B
    assert any((img == np.array([255, 0, 0], np.uint8)).all() for img in x)


def test_cinic10_has_valid_split(tmp_path):
    truth = fx.make_cinic10(tmp_path / "CINIC-10")
    out = tmp_path / "out"
    m = prepare(truth["folder"], out, progress=False)
    assert m["name"] == "cinic10"
    assert list(m["splits"]) == ["train", "test", "valid"]
    check_prepared(out, m, truth)
    # any train/valid/test tree works as a generic image folder, and kind="cinic10" forces the name
    m = prepare(truth["folder"], tmp_path / "o2", kind="cinic10", progress=False)
    assert m["name"] == "cinic10" and m["splits"]["valid"]["rows"] == 6


def test_cinic10_kind_requires_valid(tmp_path):
    truth = png_tree(tmp_path)
    with pytest.raises(PrepareError, match="missing split 'valid'"):
        prepare(truth["folder"], tmp_path / "out", kind="cinic10", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_tiny_imagenet_val_becomes_test(tmp_path):
    truth = fx.make_tiny_imagenet(tmp_path / "src")
    out = tmp_path / "out"
    m = prepare(tmp_path / "src", out, progress=False)  # the folder holding tiny-imagenet-200/
    assert m["name"] == "tinyimagenet"
    assert list(m["splits"]) == ["train", "test"]
    assert m["classes"] == sorted(m["classes"])
    assert m["splits"]["test"]["rows"] == 6 and m["splits"]["train"]["rows"] == 9
    check_prepared(out, m, truth)


def test_digits(tmp_path):
    out = tmp_path / "out"
    m = prepare("digits", out, progress=False)
    assert m["name"] == "digits" and m["source"] == "sklearn.datasets.load_digits"
    assert m["classes"] == [str(i) for i in range(10)]
    assert m["image_shape"] == [8, 8, 1]
    assert m["splits"]["train"]["rows"] == 1437 and m["splits"]["test"]["rows"] == 360
    ds = PreparedDataset.open(out)
    x, y = ds.load_numpy("train")
    xt, yt = ds.load_numpy("test")
    assert x.max() == 255 and x.min() == 0
    # stratified: class proportions of test follow the whole set
    assert np.abs(np.bincount(yt, minlength=10) - np.bincount(np.concatenate([y, yt]), minlength=10) * 0.2).max() <= 1
    # same pixels as scikit-learn's, scaled 0..16 -> 0..255
    from sklearn.datasets import load_digits

    d = load_digits()
    expected = np.rint(d.images * 255 / 16).astype(np.uint8)[..., None]
    assert rows_multiset(np.concatenate([x, xt]), np.concatenate([y, yt])) == rows_multiset(expected, d.target)
    pixels = x.reshape(-1) / 255.0
    np.testing.assert_allclose(m["mean"], [pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(m["std"], [pixels.std()], rtol=1e-10)


def test_train_is_shuffled_deterministically_and_test_is_not(cifar10, tmp_path):
    a = prepare(cifar10["folder"], tmp_path / "a", shard_rows=10, progress=False)
    b = prepare(cifar10["archive"], tmp_path / "b", shard_rows=10, progress=False)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]
    x, y = PreparedDataset.open(tmp_path / "a").load_numpy("train")
    assert not np.array_equal(y, cifar10["splits"]["train"][1])  # shuffled
    truth = png_tree(tmp_path, counts={"train": 20, "test": 2})
    m = prepare(truth["folder"], tmp_path / "c", shard_rows=15, progress=False)
    _, y = PreparedDataset.open(tmp_path / "c").load_numpy("train")
    for start in range(0, 60, 15):  # every shard holds all classes
        assert set(y[start : start + 15]) == {0, 1, 2}
    assert m["splits"]["train"]["rows"] == 60


def test_resize(tmp_path):
    truth = png_tree(tmp_path)
    m = prepare(truth["folder"], tmp_path / "a", resize=4, progress=False)
    assert m["image_shape"] == [4, 4, 3]
    m = prepare(truth["folder"], tmp_path / "b", resize=(5, 7), progress=False)
    assert m["image_shape"] == [5, 7, 3]
    x, _ = PreparedDataset.open(tmp_path / "b").load_numpy("test")
    assert x.shape == (6, 5, 7, 3)
    with pytest.raises(PrepareError, match="resize"):
        prepare(truth["folder"], tmp_path / "c", resize=(0, 3), progress=False)


def test_progress_bar_is_shown(tmp_path, capsys):
    truth = png_tree(tmp_path)
    prepare(truth["folder"], tmp_path / "out", progress=True)
    assert "prepare tree" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# bad input: PrepareError naming the file, nothing written
# --------------------------------------------------------------------------------------------------


def expect_failure(source, out: Path, match: str, **kw) -> PrepareError:
    with pytest.raises(PrepareError, match=match) as info:
        prepare(source, out, progress=False, **kw)
    assert_nothing_written(out)
    return info.value


def test_corrupt_image(tmp_path):
    truth = png_tree(tmp_path)
    bad = truth["folder"] / "test" / "dog" / "0001.png"
    bad.write_bytes(b"this is not an image at all")
    e = expect_failure(truth["folder"], tmp_path / "out", "corrupt")
    assert str(bad) in str(e)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image(tmp_path, ext):
    truth = fx.make_image_tree(tmp_path / "tree", ext=ext, size=(24, 24))
    bad = truth["folder"] / "train" / "frog" / "0002" 
    bad = bad.with_suffix(ext)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    e = expect_failure(truth["folder"], tmp_path / "out", "truncated")
    assert str(bad) in str(e)


def test_truncated_image_inside_archive(tmp_path):
    truth = png_tree(tmp_path)
    bad = truth["folder"] / "train" / "cat" / "0000.png"
    bad.write_bytes(bad.read_bytes()[:40])
    archive = fx.make_tar_gz(truth["folder"], tmp_path / "tree.tar.gz")
    e = expect_failure(archive, tmp_path / "out", "truncated")
    assert f"{archive}:tree/train/cat/0000.png" in str(e)


def test_image_of_another_size(tmp_path):
    truth = png_tree(tmp_path)
    odd = truth["folder"] / "test" / "frog" / "0000.png"
    fx.save_image(odd, np.zeros((9, 9, 3), np.uint8))
    e = expect_failure(truth["folder"], tmp_path / "out", "9x9x3")
    assert str(odd) in str(e) and "resize" in str(e)
    m = prepare(truth["folder"], tmp_path / "out", resize=(8, 6), progress=False)  # resize accepts it
    assert m["image_shape"] == [8, 6, 3]


def test_label_outside_class_range(cifar10, tmp_path):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10["folder"], folder)
    path = folder / "data_batch_3"
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d[b"labels"][1] = 10
    fx.write_pickle(path, d)
    e = expect_failure(folder, tmp_path / "out", "label 10 is outside the class range 0..9")
    assert "data_batch_3" in str(e)


def test_tiny_imagenet_unknown_class(tmp_path):
    truth = fx.make_tiny_imagenet(tmp_path / "src")
    ann = truth["folder"] / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("n09246464", "n99999999", 1))
    e = expect_failure(truth["folder"], tmp_path / "out", "n99999999")
    assert str(ann) in str(e)


def test_empty_class_folder(tmp_path):
    truth = png_tree(tmp_path)
    empty = truth["folder"] / "test" / "dog"
    for p in empty.iterdir():
        p.unlink()
    (empty / "notes.txt").write_text("no images here")
    e = expect_failure(truth["folder"], tmp_path / "out", "empty class folder")
    assert str(empty) in str(e)


def test_empty_class_folder_in_archive(tmp_path):
    truth = png_tree(tmp_path)
    for p in (truth["folder"] / "train" / "cat").iterdir():
        p.unlink()
    archive = fx.make_tar_gz(truth["folder"], tmp_path / "tree.tar.gz")
    e = expect_failure(archive, tmp_path / "out", "empty class folder")
    assert "tree/train/cat" in str(e)


def test_missing_split(tmp_path):
    import shutil

    truth = png_tree(tmp_path)
    shutil.rmtree(truth["folder"] / "test")
    e = expect_failure(truth["folder"], tmp_path / "out", "missing split 'test'")
    assert str(truth["folder"]) in str(e)


def test_missing_cifar_batch(cifar10, tmp_path):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10["folder"], folder)
    (folder / "data_batch_4").unlink()
    e = expect_failure(folder, tmp_path / "out", "missing file")
    assert str(folder / "data_batch_4") in str(e)


def test_classes_differ_between_splits(tmp_path):
    truth = png_tree(tmp_path)
    (truth["folder"] / "test" / "frog").rename(truth["folder"] / "test" / "toad")
    e = expect_failure(truth["folder"], tmp_path / "out", "class folders differ")
    assert "toad" in str(e) and "frog" in str(e)


def test_unreadable_pickle(cifar10, tmp_path):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10["folder"], folder)
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage that is not a pickle")
    e = expect_failure(folder, tmp_path / "out", "unreadable pickle")
    assert str(folder / "data_batch_2") in str(e)


def test_pickle_cannot_run_code(cifar10, tmp_path):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10["folder"], folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    e = expect_failure(folder, tmp_path / "out", "refusing to load global")
    assert "test_batch" in str(e)
    assert not marker.exists()


def test_corrupt_archive(cifar10, tmp_path):
    data = cifar10["archive"].read_bytes()
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(data[: len(data) // 2])
    e = expect_failure(bad, tmp_path / "out", "cannot read tar archive")
    assert str(bad) in str(e)


def test_unknown_source(tmp_path):
    expect_failure(tmp_path / "nope", tmp_path / "out", "no such file or directory")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    (tmp_path / "junk" / "b").mkdir()
    expect_failure(tmp_path / "junk", tmp_path / "out", "cannot recognise the dataset layout")
    (tmp_path / "file.bin").write_bytes(b"12345")
    expect_failure(tmp_path / "file.bin", tmp_path / "out", "not a directory, a tar archive")


# --------------------------------------------------------------------------------------------------
# atomic writes and the output folder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, exc):
    truth = png_tree(tmp_path, counts={"train": 4, "test": 4})
    real = prepare_mod._write_shard
    calls = []

    def flaky(path, images, labels):
        calls.append(path)
        if len(calls) == 3:  # two shards are on disk when it fails
            raise exc
        return real(path, images, labels)

    monkeypatch.setattr(prepare_mod, "_write_shard", flaky)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        prepare(truth["folder"], out, shard_rows=4, progress=False)
    assert len(calls) == 3
    assert_nothing_written(out)


def test_interrupt_while_reading_leaves_nothing(tmp_path, monkeypatch):
    truth = png_tree(tmp_path)
    real = sources._decode_image
    n = [0]

    def interrupted(*a, **kw):
        n[0] += 1
        if n[0] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sources, "_decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(truth["folder"], tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_existing_out_is_refused_without_overwrite(tmp_path):
    truth = png_tree(tmp_path)
    out = tmp_path / "out"
    first = prepare(truth["folder"], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrepareError, match="already exists.*overwrite"):
        prepare(truth["folder"], out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == ["out"]
    second = prepare(truth["folder"], out, overwrite=True, resize=4, progress=False)
    assert second["image_shape"] == [4, 4, 3] and first["image_shape"] == [8, 6, 3]
    assert PreparedDataset.open(out).image_shape == (4, 4, 3)
    assert leftovers(out) == ["out"]


def test_overwrite_keeps_old_dataset_when_new_one_fails(tmp_path):
    truth = png_tree(tmp_path)
    out = tmp_path / "out"
    prepare(truth["folder"], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (truth["folder"] / "train" / "cat" / "0000.png").write_bytes(b"broken")
    with pytest.raises(PrepareError, match="corrupt"):
        prepare(truth["folder"], out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == ["out"]


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    truth = png_tree(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare(truth["folder"], out, overwrite=True, progress=False)
    assert (out / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(truth["folder"], empty, overwrite=True, progress=False)  # an empty folder is fine
    assert (empty / "manifest.json").is_file()


def test_out_parent_is_created_and_permissions_follow_umask(tmp_path):
    truth = png_tree(tmp_path)
    out = tmp_path / "a" / "b" / "ds"
    prepare(truth["folder"], out, progress=False)
    assert (out / "manifest.json").is_file()
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's private 0700


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_file_url_with_right_md5(cifar10, tmp_path):
    dest = tmp_path / "cache"
    got = sources.download("cifar10", dest, url=cifar10["archive"].as_uri(), md5=md5(cifar10["archive"]))
    assert got == dest / "cifar-10-python.tar.gz"
    assert got.read_bytes() == cifar10["archive"].read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-python.tar.gz"]
    # already there with the right md5: reused without fetching
    assert sources.download("cifar10", dest, md5=md5(cifar10["archive"]), opener=None, url="file:///nonexistent") == got


def test_download_wrong_md5_writes_nothing(cifar10, tmp_path):
    dest = tmp_path / "cache"
    with pytest.raises(PrepareError, match="md5 mismatch"):
        sources.download("cifar10", dest, url=cifar10["archive"].as_uri())  # the official md5: mismatch
    assert list(dest.iterdir()) == []


def test_download_unreachable(tmp_path):
    with pytest.raises(PrepareError, match="cannot download"):
        sources.download("cifar100", tmp_path, url=(tmp_path / "missing.tar.gz").as_uri())
    assert list(tmp_path.iterdir()) == []


def test_prepare_cifar_name_downloads_with_monkeypatched_opener(cifar10, tmp_path, monkeypatch):
    import io

    data = cifar10["archive"].read_bytes()
    official = sources.ARCHIVES["cifar10"]
    monkeypatch.setitem(
        sources.ARCHIVES, "cifar10",
        sources.Archive(official.url, hashlib.md5(data).hexdigest(), official.filename, official.folder),
    )
    fetched = []

    def opener(url, timeout=None):
        fetched.append(url)
        return io.BytesIO(data)

    monkeypatch.setattr(sources.urllib.request, "urlopen", opener)
    monkeypatch.setenv("STKD_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrepareError, match="download=True"):
        prepare("cifar10", tmp_path / "out", progress=False)
    assert fetched == [] and not (tmp_path / "cache").exists()
    m = prepare("cifar10", tmp_path / "out", download=True, progress=False)
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert m["source"] == str(tmp_path / "cache" / "cifar-10-python.tar.gz")
    check_prepared(tmp_path / "out", m, cifar10)
    # found locally the second time: no fetch
    prepare("cifar10", tmp_path / "out2", download=True, progress=False)
    assert len(fetched) == 1


def test_download_md5_mismatch_through_prepare(cifar10, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not it"))
    monkeypatch.setenv("STKD_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrepareError, match="md5 mismatch"):
        prepare("cifar100", tmp_path / "out", download=True, progress=False)
    assert_nothing_written(tmp_path / "out")
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------------------------------
# summary and command line
# --------------------------------------------------------------------------------------------------


def test_summary(tmp_path):
    truth = png_tree(tmp_path)
    out = tmp_path / "out"
    m = prepare(truth["folder"], out, progress=False)
    text = summary(m, out)
    assert "train:" in text and "12 rows" in text and "6 rows" in text
    assert "3 (cat, dog, frog)" in text and "8x6x3" in text
    assert "on disk" in text and "KB" in text


def test_cli(tmp_path, capsys):
    truth = png_tree(tmp_path)
    out = tmp_path / "out"
    parser = add_arguments(argparse.ArgumentParser(prog="stkd prepare"))
    args = parser.parse_args([str(truth["folder"]), "--out", str(out), "--resize", "4x5", "--shard-rows", "5",
                              "--no-progress"])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "4x5x3" in printed and "in 3 shards" in printed
    # refused without --overwrite: exit status 2 and a message, data intact
    assert stkd(["prepare", str(truth["folder"]), "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert stkd(["prepare", str(truth["folder"]), "--out", str(out), "--overwrite", "--kind", "imagefolder",
                 "--no-progress"]) == 0
    assert PreparedDataset.open(out).image_shape == (8, 6, 3)
    with pytest.raises(SystemExit):
        stkd(["prepare", str(truth["folder"]), "--out", str(out), "--resize", "0"])
