"""The teacher registry: accuracy on each version, `champion` moved only by a better one, bare names
resolved through `champion` then MLflow's `latest`, explicit versions and aliases kept."""

from __future__ import annotations

import logging
import uuid

import mlflow
import pytest

from pipeline.train import teachers
from pipeline.train.checkpoint import CheckpointError


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    """A fresh registered model name in the session's SQLite store, a function adding a version, the store."""
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    name = f"teacher-registry-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)

    def add_version() -> str:
        return str(client.create_model_version(name, source=str(tmp_path)).version)  # an int from the SQL store

    return client, name, add_version, mlflow_uri


def test_champion_moves_only_to_a_better_version_and_latest_is_the_newest(registry):
    client, name, add, uri = registry
    scores = {add(): 50.0, add(): 40.0, add(): 60.0, add(): 60.0}  # versions 1..4
    champions = [teachers.record_version(name, v, acc, uri, {"source": "test"})
                 for v, acc in scores.items()]
    # First becomes champion; 40 does not beat 50; 60 does; a tie does not move it.
    assert champions == ["1", "1", "3", "3"]
    assert str(client.get_model_version_by_alias(name, teachers.CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, teachers.LATEST).version) == "4"
    for version, acc in scores.items():
        tags = client.get_model_version(name, version).tags
        assert float(tags[teachers.ACCURACY_TAG]) == acc and tags["source"] == "test"


def test_a_tie_at_the_tags_rounding_keeps_the_champion(registry):
    # 282/360 is stored as "78.3333"; the same accuracy recorded again (unrounded) is a tie, not a win.
    client, name, add, uri = registry
    first, second = add(), add()
    assert teachers.record_version(name, first, 282 / 360 * 100, uri) == first
    assert teachers.record_version(name, second, 282 / 360 * 100, uri) == first
    assert client.get_model_version(name, second).tags[teachers.ACCURACY_TAG] == "78.3333"


def test_a_champion_set_by_hand_without_accuracy_is_kept(registry, caplog):
    client, name, add, uri = registry
    first, second = add(), add()
    client.set_registered_model_alias(name, teachers.CHAMPION, first)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.teachers"):
        assert teachers.record_version(name, second, 99.0, uri) == first
    assert "records no test_top1" in caplog.text


def test_a_bare_name_resolves_through_champion_else_latest(registry, caplog):
    client, name, add, uri = registry
    for _ in range(3):
        add()
    with caplog.at_level(logging.INFO, logger="pipeline.train.teachers"):
        assert teachers.resolve_uri(name, uri) == f"models:/{name}/3"
    assert "no champion alias, so its latest version -> version 3" in caplog.text
    teachers.record_version(name, "2", 70.0, uri)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.train.teachers"):
        assert teachers.resolve_uri(name, uri) == f"models:/{name}/2"
    assert "its champion -> version 2 (test top-1 70.00%)" in caplog.text
    # Explicit versions and aliases, bare or as models:/ URIs, pinned to the version they name now.
    assert teachers.resolve_uri(f"{name}/1", uri) == f"models:/{name}/1"
    assert teachers.resolve_uri(f"{name}@latest", uri) == f"models:/{name}/3"
    assert teachers.resolve_uri(f"models:/{name}@champion", uri) == f"models:/{name}/2"
    assert teachers.resolve_uri(f"models:/{name}", uri) == f"models:/{name}/2"


def test_unknown_aliases_and_names(registry):
    client, name, add, uri = registry
    add()
    with pytest.raises(CheckpointError, match=r"no version under alias 'best' \(its aliases: none"):
        teachers.resolve_uri(f"{name}@best", uri)
    with pytest.raises(CheckpointError, match="no registered model 'no-such-teacher'"):
        teachers.resolve_uri("models:/no-such-teacher@champion", uri)
    # Not registered and no URI: left as it is (it may be a relative checkpoint path).
    assert teachers.resolve_uri("no-such-teacher", uri) == "no-such-teacher"
    assert teachers.resolve_uri("runs:/abc/model", uri) == "runs:/abc/model"


@pytest.mark.slow
def test_a_registered_teacher_run_records_its_accuracy_and_becomes_champion(teacher_run, mlflow_uri):
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    version = client.get_model_version_by_alias("teacher-test-digits", teachers.LATEST)
    assert float(version.tags[teachers.ACCURACY_TAG]) == pytest.approx(teacher_run.selected_top1, abs=1e-4)
    assert version.run_id == teacher_run.run_id
    champion = client.get_model_version_by_alias("teacher-test-digits", teachers.CHAMPION)
    # The tag holds the accuracy rounded (78.3333 for 282/360): compare at the same rounding.
    recorded = round(teacher_run.selected_top1, teachers.ACCURACY_DIGITS)
    assert float(champion.tags[teachers.ACCURACY_TAG]) >= recorded


def test_a_logged_model_uri_is_not_taken_for_a_registered_name():
    uri = "models:/m-0fecd43aa41f4a0a848bf0ae3d06790e"
    assert teachers.resolve_uri(uri, "sqlite:///never-opened.db") == uri


def test_a_version_measured_on_the_same_dataset_gives_its_accuracy_without_a_second_pass(registry):
    client, name, add, uri = registry
    version = add()
    teachers.record_version(name, version, 91.25, uri, {teachers.DATA_TAG: "digest-a"})
    assert teachers.recorded_accuracy(f"models:/{name}/{version}", "digest-a", uri) == 91.25
    # Another dataset (other shard checksums), a path, an unrecorded version: measured again.
    assert teachers.recorded_accuracy(f"models:/{name}/{version}", "digest-b", uri) is None
    assert teachers.recorded_accuracy("/some/checkpoint", "digest-a", uri) is None
    assert teachers.recorded_accuracy(f"models:/{name}/{add()}", "digest-a", uri) is None


def test_a_teacher_built_from_the_shared_arrays_says_whether_it_copied_them(digits_resnet8):
    import torch

    arrays = teachers.to_arrays(digits_resnet8)
    for array in arrays.values():
        array.flags.writeable = False  # as Ray returns them from its object store
    spec = {"name": "resnet8", "num_classes": 10, "in_channels": 1}
    teacher = teachers.build(spec, arrays)
    assert teachers.holding(teacher, arrays) == "zero-copy"
    # Reordering copies every convolution's weights; the rest stays shared.
    convolutions = sum(t.dim() == 4 for t in digits_resnet8.values())
    reordered = teacher.to(memory_format=torch.channels_last)
    assert teachers.holding(reordered, arrays) == f"copied ({convolutions} of {len(digits_resnet8)} tensors)"
