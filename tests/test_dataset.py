"""Reading a prepared dataset: PreparedDataset.open/verify, load_numpy, decode_images.

The Ray Data path (pipeline.data.feeds) is tested in test_data_feed.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.dataset import DatasetError, PreparedDataset, decode_images
from pipeline.data.prepare import prepare

try:
    from tests import fixtures_data as fx
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    import fixtures_data as fx


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    truth = fx.make_image_tree(root / "tree", counts={"train": 5, "test": 3, "valid": 2}, size=(6, 5))
    out = root / "prepared"
    manifest = prepare(truth["folder"], out, shard_rows=4, progress=False)
    return out, manifest, truth


@pytest.fixture
def copy(prepared, tmp_path):
    out, manifest, truth = prepared
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_properties(prepared):
    out, manifest, _ = prepared
    ds = PreparedDataset.open(str(out))
    assert ds.root == out
    assert ds.name == "tree"
    assert ds.num_classes == 3 and ds.classes == ["cat", "dog", "frog"]
    assert ds.image_shape == (6, 5, 3)
    assert ds.mean == tuple(manifest["mean"]) and ds.std == tuple(manifest["std"])
    assert list(ds.splits) == ["train", "test", "valid"] and "valid" in ds.splits
    assert ds.rows("train") == 15 and ds.rows("test") == 9 and ds.rows("valid") == 6
    paths = ds.shard_paths("train")
    assert paths == [str(out / f"train-0000{i}.parquet") for i in range(4)]
    assert all(isinstance(p, str) and Path(p).is_file() for p in paths)
    assert "train=15" in repr(ds)
    with pytest.raises(DatasetError, match="no split 'val'.*train, test, valid"):
        ds.rows("val")
    with pytest.raises(DatasetError, match="no split"):
        ds.load_numpy("nope")


def test_load_numpy_round_trip(prepared):
    out, _, truth = prepared
    ds = PreparedDataset.open(out)
    for split in ("test", "valid"):
        x, y = ds.load_numpy(split)
        np.testing.assert_array_equal(x, truth["splits"][split][0])
        np.testing.assert_array_equal(y, truth["splits"][split][1])
    x, y = ds.load_numpy("train")
    assert x.shape == (15, 6, 5, 3) and x.dtype == np.uint8 and x.flags.writeable and x.flags.c_contiguous
    assert y.dtype == np.int64
    tx, ty = truth["splits"]["train"]
    order = sorted(range(15), key=lambda i: (x[i].tobytes(), y[i]))
    torder = sorted(range(15), key=lambda i: (tx[i].tobytes(), ty[i]))
    np.testing.assert_array_equal(x[order], tx[torder])
    np.testing.assert_array_equal(y[order], ty[torder])


def test_shards_have_the_format(prepared):
    out, manifest, _ = prepared
    table = pq.read_table(out / manifest["splits"]["train"]["shards"][0]["file"])
    assert table.schema.field("image").type == pa.binary()
    assert table.schema.field("label").type == pa.int64()
    assert table.num_rows == 4
    assert all(len(v) == 6 * 5 * 3 for v in table.column("image").to_pylist())


def test_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="stkd prepare"):
        PreparedDataset.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no manifest.json.*stkd prepare"):
        PreparedDataset.open(tmp_path / "empty")


def test_checksum_mismatch(copy):
    shard = copy / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the pixels
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="train-00001.parquet: sha256 mismatch"):
        PreparedDataset.open(copy)
    assert PreparedDataset.open(copy, verify=False).rows("train") == 15


def test_missing_shard(copy):
    (copy / "test-00002.parquet").unlink()
    with pytest.raises(DatasetError, match="test-00002.parquet: shard of split 'test' is missing"):
        PreparedDataset.open(copy)


def test_bad_manifest(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        PreparedDataset.open(copy)
    m = {"name": "x", "format_version": 2}
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="missing keys"):
        PreparedDataset.open(copy)


def test_newer_format_version_is_refused(prepared, copy):
    m = dict(prepared[1], format_version=2)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format_version 2"):
        PreparedDataset.open(copy)


def test_decode_images_from_every_column_form():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 4, 3, 2), dtype=np.uint8)
    raw = [im.tobytes() for im in imgs]
    obj = np.empty(7, dtype=object)
    obj[:] = raw  # what a Ray Data numpy batch holds for a binary column
    forms = [
        obj,
        raw,
        np.array(raw, dtype="S24"),
        pa.array(raw, pa.binary()),
        pa.array(raw, pa.large_binary()),
        pa.chunked_array([pa.array(raw[:3]), pa.array(raw[3:])]),
        pa.array(raw, pa.binary()).slice(0, 7),
        imgs.reshape(7, -1),
        imgs,
    ]
    for col in forms:
        out = decode_images(col, (4, 3, 2))
        np.testing.assert_array_equal(out, imgs)
        assert out.dtype == np.uint8
    sliced = decode_images(pa.array(raw, pa.binary()).slice(2, 3), [4, 3, 2])
    np.testing.assert_array_equal(sliced, imgs[2:5])
    assert decode_images(obj, (4, 3, 2)).flags.writeable
    assert decode_images([], (4, 3, 2)).shape == (0, 4, 3, 2)


def test_decode_images_rejects_wrong_sizes():
    good = bytes(24)
    with pytest.raises(DatasetError, match="image 1 has 23 bytes, expected 24"):
        decode_images([good, bytes(23), good], (4, 3, 2))
    with pytest.raises(DatasetError, match="image 1 has 23 bytes"):
        decode_images(pa.array([good, bytes(23)]), (4, 3, 2))
    with pytest.raises(DatasetError, match="image_shape"):
        decode_images([good], (24,))


def test_shard_sizes_are_checked_on_every_open_and_checksums_only_when_asked(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    assert shard["bytes"] == (copy / shard["file"]).stat().st_size
    data = (copy / shard["file"]).read_bytes()
    (copy / shard["file"]).write_bytes(data[:-10])  # a truncated copy
    with pytest.raises(DatasetError, match=r"train-00001.parquet: \d+ bytes, the manifest says \d+"):
        PreparedDataset.open(copy, verify=False)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF  # same size: only the checksum sees it
    (copy / shard["file"]).write_bytes(bytes(flipped))
    PreparedDataset.open(copy, verify=False)
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        PreparedDataset.open(copy, verify=True)


def test_a_manifest_without_sizes_is_still_read(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for s in info["shards"]:
            del s["bytes"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert PreparedDataset.open(copy).rows("train") == 15


def test_dataset_info_checksums_unless_told_the_sweep_did(copy):
    from pipeline import config
    from pipeline.train import run

    cfg = config.load("test_tiny", [f"data.path={copy}"])
    shard = copy / "test-00000.parquet"
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    assert run.dataset_info(cfg, verify=False)["test_rows"] == 9  # a trial: sizes only
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        run.dataset_info(cfg)


def test_stkd_verify_data(copy, capsys):
    from pipeline import cli

    assert cli.main(["verify-data", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"{copy}: tree, train 15, test 9, valid 6 rows; 9 shards" in out and "match their sha256" in out
    shard = copy / "valid-00000.parquet"
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    assert cli.main(["verify-data", str(copy)]) == 2
    assert "valid-00000.parquet: sha256 mismatch" in capsys.readouterr().err
