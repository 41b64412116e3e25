"""`stkd import-teacher` on files written the way RepDistiller and mdistiller write them, and on files
it must refuse, against the session's digits and SQLite MLflow store."""

from __future__ import annotations

import argparse
import uuid

import mlflow
import pytest
import torch

from pipeline import cli, import_teacher
from pipeline.train import teachers
from pipeline.data.dataset import PreparedDataset
from stkd import models


class Custom:
    """A class a pickle can only be loaded by running code for."""

    def __init__(self):
        self.weights = torch.zeros(2)


@pytest.fixture(scope="module")
def one_thread():
    # Two threads on a loaded 2-core machine run these tiny models ~9x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(digits_resnet8) -> dict[str, torch.Tensor]:
    """A resnet8 state dict after 20 SGD steps on digits (tests/conftest.py)."""
    return digits_resnet8


def fresh(name: str = "resnet8", classes: int = 10, channels: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return models.create(name, classes, in_channels=channels).state_dict()


def measured(state_dict, digits) -> float:
    model = models.create("resnet8", 10, in_channels=1)
    model.load_state_dict(state_dict)
    dataset = PreparedDataset.open(digits)
    images, labels = dataset.load_numpy("test")
    return teachers.accuracy(model, images, labels, dataset.mean, dataset.std)


def stkd(*argv: str) -> int:
    return cli.main(["import-teacher", *argv])


def test_published_formats_register_with_accuracy_and_champion(digits, mlflow_uri, trained, tmp_path, capsys):
    name = f"imported-{uuid.uuid4().hex[:6]}"
    untrained = fresh()
    # RepDistiller's ckpt_epoch_240.pth (2019: PyTorch's legacy, pre-zip format): accuracy a (CUDA, here
    # CPU) tensor, the optimizer's state beside.
    repdistiller = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    repdistiller.parent.mkdir()
    torch.save({"epoch": 240, "model": untrained, "accuracy": torch.tensor(11.5),
                "optimizer": torch.optim.SGD(models.create("resnet8", 10, 1).parameters(), lr=0.1).state_dict()},
               repdistiller, _use_new_zipfile_serialization=False)
    # A plain state dict saved from a DataParallel model (`module.` prefixes).
    plain = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in trained.items()}, plain)
    # mdistiller's whole distiller state: DataParallel(distiller), student and teacher inside.
    distiller = tmp_path / "mdistiller_best"
    torch.save({"epoch": 3, "best_acc": 12.0, "optimizer": {},
                "model": {**{f"module.student.{k}": v for k, v in untrained.items()},
                          **{f"module.teacher.{k}": v for k, v in fresh("wrn_16_2").items()}}}, distiller)

    expected = [measured(untrained, digits), measured(trained, digits), measured(untrained, digits)]
    assert expected[1] > expected[0] + 20
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    # 1 is the first champion, 2 beats it, 3 (untrained again) does not; latest is the newest.
    aliases = ["champion, latest", "champion, latest", "latest (champion stays version 2)"]
    for version, path in enumerate((repdistiller, plain, distiller), start=1):
        assert stkd(str(path), "--model", "resnet8", "--data", str(digits), "--register-as", name) == 0
        out = capsys.readouterr().out
        assert (f"registered {name} version {version}: test top-1 {expected[version - 1]:.2f}%, "
                f"aliases {aliases[version - 1]}") in out
        tags = client.get_model_version(name, str(version)).tags
        assert float(tags[teachers.ACCURACY_TAG]) == pytest.approx(expected[version - 1], abs=1e-4)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "latest").version) == "3"
    run = client.get_run(client.get_model_version(name, "1").run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["final/test_top1_selected"] == expected[0]
    assert run.data.params["imported_epoch"] == "240" and run.data.params["imported_accuracy"] == "11.5"

    # What `stkd distill ... teacher.source=<name>` loads: the champion, in the project's checkpoint format.
    state, uri = teachers.fetch(name, mlflow_uri)
    assert uri == f"models:/{name}/2"
    assert state["model"] == {"name": "resnet8", "num_classes": 10, "in_channels": 1}
    assert measured(state["student"], digits) == expected[1]
    assert teachers.fetch(f"{name}@latest", mlflow_uri)[1] == f"models:/{name}/3"


def test_the_default_name_is_the_one_stkd_teacher_gives(digits, mlflow_uri, tmp_path, capsys, one_thread):
    # RepDistiller's `<model>_last.pth` keeps its argparse options, plain data that is allowed through.
    path = tmp_path / "vgg8_last.pth"
    torch.save({"opt": argparse.Namespace(model="vgg8", epochs=240), "model": fresh("vgg8"),
                "optimizer": {}}, path)
    assert stkd(str(path), "--model", "vgg8", "--data", str(digits)) == 0
    assert "registered teacher-digits-vgg8 version " in capsys.readouterr().out


def refused(capsys, *argv) -> str:
    assert stkd(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("stkd import-teacher: error: ")
    return err


def test_a_wrong_architecture_lists_keys_and_shapes(digits, tmp_path, capsys, one_thread):
    wrong = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": fresh("resnet8")}, wrong)
    err = refused(capsys, str(wrong), "--model", "wrn_16_2", "--data", str(digits))
    expected, given = set(fresh("wrn_16_2")), set(fresh("resnet8"))
    missing = len([k for k in expected - given if not k.endswith("num_batches_tracked")])
    assert f"does not fit wrn_16_2 for 10 classes and 1 channel(s) (digits)" in err
    assert f"{missing} missing keys: block1.layer.0.bn1.weight;" in err
    assert f"{len(given - expected)} unexpected keys: layer1.0.conv1.weight;" in err
    assert f"... and {len(given - expected) - import_teacher.SHOWN} more" in err
    assert "Its keys are those of resnet8: try --model resnet8" in err

    cifar = tmp_path / "cifar100.pth"  # the right architecture for another dataset
    torch.save({"model": fresh("resnet8", classes=100, channels=3)}, cifar)
    err = refused(capsys, str(cifar), "--model", "resnet8", "--data", str(digits))
    assert ("3 shape mismatches: conv1.weight (file [16, 3, 3, 3], model [16, 1, 3, 3]); "
            "fc.weight (file [100, 64], model [10, 64]); fc.bias (file [100], model [10])") in err
    assert "trained for another number of classes or input channels" in err


def test_files_that_are_not_checkpoints_are_refused(digits, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    assert "notes.txt is not a PyTorch checkpoint (torch.load:" in refused(
        capsys, str(text), "--model", "resnet8", "--data", str(digits))

    code = tmp_path / "custom.pth"
    torch.save({"model": Custom()}, code)
    err = refused(capsys, str(code), "--model", "resnet8", "--data", str(digits))
    assert f"holds pickled Python code (GLOBAL {__name__}.Custom), which torch.load(weights_only=True) refuses" in err

    no_weights = tmp_path / "epoch.pth"
    torch.save({"epoch": 3, "best_acc": 70.0}, no_weights)
    assert "is a dict without weights" in refused(capsys, str(no_weights), "--model", "resnet8", "--data", str(digits))
    assert "no such file" in refused(capsys, str(tmp_path / "absent.pth"), "--model", "resnet8", "--data", str(digits))
    assert "unknown model 'resnet9'" in refused(capsys, str(text), "--model", "resnet9", "--data", str(digits))
