"""`stkd eval`: a model measured on a prepared split (top-1, top-5, per-class, ECE, NLL), checked against an
independent computation, and the MLflow evaluation run it logs, linked to the model it measured."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.train import checkpoint, teachers
from pipeline.data.dataset import PreparedDataset
from stkd import models
from stkd.augment import nhwc_to_nchw, normalize

SUMMARY = re.compile(r"top-1 ([\d.]+)%   top-5 ([\d.]+)%   ECE ([\d.]+) \(15 equal-width bins, fraction\)   "
                     r"NLL ([\d.]+) nats")
ARTIFACTS = {"confusion_matrix.png", "reliability_diagram.png", "per_class.csv", "confusion_matrix.csv",
             "calibration_bins.csv"}


@pytest.fixture(scope="module")
def trained(digits_resnet8) -> dict[str, torch.Tensor]:
    """The 20-step digits resnet8 the import tests share (tests/conftest.py)."""
    return digits_resnet8


def resnet8(state_dict) -> torch.nn.Module:
    model = models.create("resnet8", 10, in_channels=1)
    model.load_state_dict(state_dict)
    return model.eval()


def independent(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, dataset: PreparedDataset) -> dict:
    """The figures `stkd eval` prints, computed here without stkd.calibration or pipeline.evaluate: one
    forward pass, then NumPy in float64."""
    x = normalize(nhwc_to_nchw(torch.from_numpy(images)), dataset.mean, dataset.std)
    with torch.no_grad():
        logits = model(x).double().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    confidence, prediction = probs.max(1), probs.argmax(1)
    right = prediction == labels
    ece = 0.0
    for b in range(15):  # (b/15, (b+1)/15], the first bin with 0
        low, high = (b / 15 if b else -1.0), (b + 1) / 15
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(right[in_bin].mean() - confidence[in_bin].mean())
    top5 = (np.argsort(-logits, axis=1)[:, :5] == labels[:, None]).any(1).mean() * 100
    per_class = [100 * right[labels == c].mean() for c in range(dataset.num_classes)]
    return {"top1": teachers.accuracy(model, images, labels, dataset.mean, dataset.std), "top5": top5,
            "ece": ece, "nll": float(-np.log(probs[np.arange(len(labels)), labels]).mean()), "per_class": per_class}


def stkd_eval(capsys, *argv: str) -> tuple[str, dict[str, float], str]:
    """Run `stkd eval` through cli.main; its output, the printed figures, and the evaluation run's id."""
    assert cli.main(["eval", *argv]) == 0
    out = capsys.readouterr().out
    top1, top5, ece, nll = map(float, SUMMARY.search(out).groups())
    run_id = re.search(r"^mlflow run ([0-9a-f]{32}) ", out, re.M)[1]
    return out, {"top1": top1, "top5": top5, "ece": ece, "nll": nll}, run_id


def agree(printed: dict[str, float], expected: dict) -> None:
    assert printed["top1"] == round(expected["top1"], 2)
    assert printed["top5"] == pytest.approx(expected["top5"], abs=0.006)
    assert printed["ece"] == pytest.approx(expected["ece"], abs=6e-5)
    assert printed["nll"] == pytest.approx(expected["nll"], abs=6e-5)


def logged(client, run_id: str, expected: dict) -> mlflow.entities.Run:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["eval/top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert metrics["eval/top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert metrics["eval/ece"] == pytest.approx(expected["ece"], abs=1e-6)
    assert metrics["eval/nll"] == pytest.approx(expected["nll"], abs=1e-5)
    assert [metrics[f"eval/class_top1/{c}"] for c in range(10)] == pytest.approx(expected["per_class"], abs=1e-9)
    assert {a.path for a in client.list_artifacts(run_id)} == ARTIFACTS
    for name in ("confusion_matrix.png", "reliability_diagram.png"):
        local = Path(client.download_artifacts(run_id, name))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 10_000
    return run


def test_eval_of_an_imported_teacher_agrees_with_an_independent_measurement_and_is_linked_to_it(
        digits, mlflow_uri, trained, tmp_path, capsys):
    name = f"eval-imported-{uuid.uuid4().hex[:6]}"
    published = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"  # as RepDistiller writes it
    published.parent.mkdir()
    torch.save({"epoch": 240, "model": trained, "accuracy": torch.tensor(90.0)}, published)
    assert cli.main(["import-teacher", str(published), "--model", "resnet8", "--data", str(digits),
                     "--register-as", name]) == 0
    capsys.readouterr()

    out, printed, run_id = stkd_eval(capsys, f"{name}@champion", "--data", str(digits))
    dataset = PreparedDataset.open(digits)
    images, labels = dataset.load_numpy("test")
    expected = independent(resnet8(trained), images, labels, dataset)
    assert 60 < expected["top1"] < 99.5 and expected["ece"] > 0.005  # a model worth checking these on
    agree(printed, expected)
    assert f"{name}@champion -> models:/{name}/1: resnet8, 10 classes" in out
    assert "digits test split, 360 images, fp32 on the CPU" in out
    assert f"  0 {expected['per_class'][0]:6.2f} (36)" in out  # the per-class table: class, top-1 %, images

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    run = logged(client, run_id, expected)
    version = client.get_model_version(name, "1")
    tags = run.data.tags
    assert tags["eval.model_uri"] == f"models:/{name}/1" and tags["eval.model_source"] == f"{name}@champion"
    assert tags["eval.source_run_id"] == version.run_id and tags["eval.model_version"] == "1"
    assert tags["eval.split"] == "test" and tags["method"] == "eval"
    assert version.tags["eval.test.run_id"] == run_id  # the registry points back at the evaluation
    assert run.info.experiment_id == client.get_run(version.run_id).info.experiment_id  # beside the import run
    assert run.data.params["data.digest"] and run.data.params["eval.rows"] == "360"

    # The published file itself, read as `stkd import-teacher` reads it: the same figures.
    _, printed_raw, _ = stkd_eval(capsys, str(published), "--arch", "resnet8", "--data", str(digits))
    assert printed_raw == printed


def test_eval_of_a_checkpoint_on_val_measures_the_rows_training_holds_out(digits, mlflow_uri, trained, tmp_path,
                                                                          capsys):
    from pipeline.train import run as run_lib

    path = tmp_path / "ckpt"
    checkpoint.save({"model": checkpoint.model_spec("resnet8", 10, 1), "student": trained}, path)
    experiment = f"eval-tests-{uuid.uuid4().hex[:6]}"
    out, printed, run_id = stkd_eval(capsys, str(path), "--data", str(digits), "--split", "val", "--val-fraction",
                                     "0.2", "--val-seed", "3", "--batch-size", "50", "--experiment", experiment)
    # The carve a training run with data.val_fraction=0.2 and data.val_seed=3 holds out of train.
    info = run_lib.dataset_info({"data": {"path": str(digits), "val_fraction": 0.2, "val_seed": 3}}, verify=False)
    dataset = PreparedDataset.open(digits)
    images, labels = dataset.load_numpy("train")
    rows = info["val_positions"]
    assert f"digits val split, {info['val_rows']} images" in out and len(rows) == info["val_rows"]
    expected = independent(resnet8(trained), images[rows], labels[rows], dataset)
    agree(printed, expected)

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    run = logged(client, run_id, expected)
    assert client.get_experiment(run.info.experiment_id).name == experiment
    assert run.data.tags["eval.model_uri"] == str(path.resolve()) and "eval.source_run_id" not in run.data.tags
    assert run.data.params["eval.val_fraction"] == "0.2" and run.data.params["eval.val_seed"] == "3"


@pytest.mark.parametrize("argv, needle", [
    (["{ckpt}", "--data", "{missing}"], "does not exist: not a prepared dataset"),
    (["no-such-model-{uid}", "--data", "{digits}"], "is neither a file, a checkpoint directory"),
    (["no-such-model-{uid}/2", "--data", "{digits}"], "model 'no-such-model-{uid}/2': "),
    (["{ckpt}", "--data", "{digits}", "--split", "train"], "--split: 'train' is not a split"),
    (["{ckpt}", "--data", "{digits}", "--split", "val", "--val-fraction", "1"], "--val-fraction: must be in (0, 1)"),
    (["{raw}", "--data", "{digits}"], "needs --arch ARCH"),
    (["{raw}", "--arch", "vgg_99", "--data", "{digits}"], "--arch: unknown architecture 'vgg_99'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, digits, mlflow_uri, tmp_path, capsys):
    torch.manual_seed(0)
    weights = models.create("resnet8", 10, in_channels=1).state_dict()
    checkpoint.save({"model": checkpoint.model_spec("resnet8", 10, 1), "student": weights}, tmp_path / "ckpt")
    torch.save({"model": weights}, tmp_path / "raw.pth")
    fill = {"ckpt": tmp_path / "ckpt", "raw": tmp_path / "raw.pth", "missing": tmp_path / "nothing",
            "digits": digits, "uid": uuid.uuid4().hex[:6]}
    assert cli.main(["eval", *(a.format(**fill) for a in argv)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = [line for line in captured.err.splitlines() if not re.match(r"\d\d:\d\d:\d\d [A-Z]+ ", line)]
    assert len(lines) == 1 and lines[0].startswith("stkd eval: error: ") and needle.format(**fill) in lines[0]


def test_weights_that_do_not_fit_the_arch_name_the_keys(digits, mlflow_uri, tmp_path, capsys):
    # import-teacher's detailed refusal (missing and unexpected keys, one kind a line), under `stkd eval`.
    torch.manual_seed(0)
    torch.save({"model": models.create("resnet8", 10, in_channels=1).state_dict()}, tmp_path / "raw.pth")
    assert cli.main(["eval", str(tmp_path / "raw.pth"), "--arch", "wrn_16_2", "--data", str(digits)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stkd eval: error: " in err and "does not fit wrn_16_2" in err
    assert "missing keys: block1.layer.0.bn1.weight;" in err


@pytest.mark.slow  # the session's Ray-trained teacher (tests/conftest.py: teacher_run), as test_pipeline uses
def test_eval_of_the_trained_digits_teacher(teacher_run, digits, mlflow_uri, capsys):
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    dataset = PreparedDataset.open(digits)
    images, labels = dataset.load_numpy("test")
    # Its logged model (models:/m-...), the one registered as teacher-test-digits.
    out, printed, run_id = stkd_eval(capsys, teacher_run.model_uri, "--data", str(digits))
    state, _ = teachers.fetch(teacher_run.model_uri, mlflow_uri)
    expected = independent(resnet8(state["student"]), images, labels, dataset)
    agree(printed, expected)
    # The workers measured the same model on the same split in fp32: the same top-1, to within one image.
    assert printed["top1"] == pytest.approx(teacher_run.selected_top1, abs=100 / len(labels) + 0.01)
    run = logged(client, run_id, expected)
    assert run.data.tags["eval.source_run_id"] == teacher_run.run_id
    assert run.info.experiment_id == client.get_run(teacher_run.run_id).info.experiment_id

    # Its final checkpoint (the last epoch's weights): linked to the run by the record beside it.
    _, printed, run_id = stkd_eval(capsys, teacher_run.checkpoint_path, "--data", str(digits))
    state = checkpoint.load(teacher_run.checkpoint_path)
    agree(printed, independent(resnet8(state["student"]), images, labels, dataset))
    assert client.get_run(run_id).data.tags["eval.source_run_id"] == teacher_run.run_id
