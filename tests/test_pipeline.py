"""Ray Train end to end on tiny data: MLflow runs, checkpoints, resume after a killed worker,
the teacher shared through one object, determinism of the first epoch."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import config
from pipeline.train import checkpoint, run, teachers
from stkd.precision import resolve_for_device

pytestmark = pytest.mark.slow


def client(uri):
    return mlflow.MlflowClient(tracking_uri=uri)


def test_teacher_run_finished_with_metrics_artifacts_and_checkpoint(teacher_run, mlflow_uri):
    c = client(mlflow_uri)
    r = c.get_run(teacher_run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["optim.epochs"] == "3" and r.data.params["train.workers"] == "2"
    for tag in ("git_commit", "ray_version", "torch_version"):
        assert r.data.tags[tag]
    assert r.data.tags["mlflow.source.git.commit"] == r.data.tags["git_commit"]  # the UI's source column
    assert r.info.run_name.startswith("ce-resnet8-s0-")
    experiment = c.get_experiment(r.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The prepared dataset is the run's input: name, the manifest's digest, split sizes as the profile.
    [dataset_input] = r.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits" and len(dataset_input.dataset.digest) == 12
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    profile = json.loads(dataset_input.dataset.profile)
    assert (profile["train_rows"], profile["val_rows"], profile["test_rows"]) == (1437, 0, 360)
    signature = mlflow.models.get_model_info(teacher_run.model_uri).signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    logged = mlflow.pytorch.load_model(teacher_run.model_uri)
    assert logged(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    history = c.get_metric_history(teacher_run.run_id, "test/top1")
    assert [m.step for m in history] == [0, 1, 2]
    for key in ("loss/ce", "train/acc", "test/top5", "lr", "images_per_s", "epoch_time_s",
                "final/test_top1_selected", "final/test_top1_last", "final/test_top1_best_epoch_optimistic"):
        assert c.get_metric_history(teacher_run.run_id, key), key
    # Evaluation covers the whole test split once, across both workers.
    assert c.get_metric_history(teacher_run.run_id, "test/seen")[-1].value == 360
    artifacts = {a.path for a in c.list_artifacts(teacher_run.run_id)}
    assert {"recipe.yaml", "learning_curve.png"} <= artifacts
    assert Path(teacher_run.checkpoint_path, checkpoint.CHECKPOINT_FILE).is_file()
    versions = c.search_model_versions("name='teacher-test-digits'")
    assert versions, "teacher registered"
    mine = next(v for v in versions if v.run_id == teacher_run.run_id)
    assert mine.tags[teachers.DATA_TAG] == dataset_input.dataset.digest  # its accuracy's dataset
    # What the workers resolved train.precision=auto to on this machine, and where they trained.
    expected = resolve_for_device("auto", torch.device("cpu"))
    assert r.data.tags["hardware.precision"] == expected
    assert r.data.tags["hardware.memory_format"] == ("channels_last" if expected == "bf16" else "contiguous")
    assert r.data.tags["hardware.device"].endswith("(cpu)")
    # Calibration beside accuracy, and the node's CPU and memory over the run (one monitor per node).
    assert 0 <= r.data.metrics["final/ece_selected"] <= 1
    assert r.data.metrics["final/ece_selected"] == c.get_metric_history(teacher_run.run_id, "test/ece")[-1].value
    system = {k for k in r.data.metrics if k.startswith("system/")}
    assert any(k.endswith("/cpu_utilization_percentage") for k in system), sorted(r.data.metrics)
    assert any(k.endswith("/system_memory_usage_megabytes") for k in system)
    assert len({k.split("/")[1] for k in system}) == 1, "two workers on one node: one monitor"
    assert teacher_run.selected_top1 > 20  # 3 epochs on digits beats chance (10%) by far
    # No validation split: the selected epoch is the last, and nothing is chosen on test.
    assert teacher_run.selected_epoch == 2 and teacher_run.val_top1 is None
    assert teacher_run.selected_top1 == teacher_run.last_top1
    assert r.data.tags["selected_by"] == "last epoch" and not c.get_metric_history(teacher_run.run_id, "val/top1")


def test_the_validation_best_epoch_is_selected_and_its_model_logged(ray_session, mlflow_uri, tiny_overrides, digits):
    from pipeline.data.dataset import PreparedDataset

    cfg = config.load("test_tiny", tiny_overrides + ["optim.epochs=4", "data.val_fraction=0.2", "optim.lr=0.3",
                                                     "train.checkpoint_every=3"])
    outcome = run.train(cfg)
    vals = [h["val/top1"] for h in outcome.history]
    assert outcome.selected_epoch == vals.index(max(vals))
    assert outcome.val_top1 == max(vals)
    assert outcome.selected_top1 == outcome.history[outcome.selected_epoch]["test/top1"]
    assert outcome.last_top1 == outcome.history[-1]["test/top1"]
    c = client(mlflow_uri)
    r = c.get_run(outcome.run_id)
    assert r.data.tags["selected_epoch"] == str(outcome.selected_epoch) and r.data.tags["selected_by"] == "val/top1"
    assert r.data.metrics["final/test_top1_selected"] == outcome.selected_top1
    assert r.data.metrics["final/val_top1_selected"] == outcome.val_top1
    assert c.get_metric_history(outcome.run_id, "val/seen")[-1].value == int(r.data.tags["val_rows"]) > 0
    # The logged model is the selected epoch's: it scores that epoch's test accuracy (within one image).
    state, _ = teachers.fetch(outcome.model_uri, mlflow_uri)
    assert state["selected_epoch"] == outcome.selected_epoch
    model = checkpoint.build_model(state["model"])
    model.load_state_dict(state["student"])
    dataset = PreparedDataset.open(digits)
    images, labels = dataset.load_numpy("test")
    accuracy = teachers.accuracy(model, images, labels, dataset.mean, dataset.std, 512)
    assert accuracy == pytest.approx(outcome.selected_top1, abs=100 / len(labels) + 1e-9)


def test_evaluation_every_n_epochs_and_always_the_last(ray_session, mlflow_uri, tiny_overrides):
    cfg = config.load("test_tiny", tiny_overrides + ["optim.epochs=3", "data.eval_every=2", "data.val_fraction=0.2"])
    outcome = run.train(cfg)
    c = client(mlflow_uri)
    for key in ("test/top1", "val/top1", "eval_time_s"):
        assert [m.step for m in c.get_metric_history(outcome.run_id, key)] == [1, 2], key
    assert [m.step for m in c.get_metric_history(outcome.run_id, "epoch_time_s")] == [0, 1, 2]
    assert [m.step for m in c.get_metric_history(outcome.run_id, "setup_time_s")] == [0]
    assert outcome.selected_epoch in (1, 2)
    assert "test/top1" not in outcome.history[0] and "selected/epoch" not in outcome.history[0]
    assert set(outcome.phases) >= {"dataset", "ray_start", "mlflow_start", "fit", "finish", "total"}
    assert outcome.phases["total"] >= outcome.phases["fit"] > 0


def test_distill_with_registered_teacher(teacher_run, mlflow_uri, tiny_overrides):
    cfg = config.load("test_tiny", tiny_overrides + [
        "method.name=stkd", "teacher.source=teacher-test-digits", "method.mixup_alpha=0.4", "optim.epochs=1",
        "data.in_memory=false",  # the streaming Ray Data path: equal train shards, equal steps per worker
        "train.channels_last=false"])  # channels_last reorders (copies) a teacher's convolutions on each worker
    outcome = run.train(cfg)
    r = client(mlflow_uri).get_run(outcome.run_id)
    assert r.info.status == "FINISHED"
    # In the real worker loop (rank 0's report): the teacher's tensors are views of the one object the driver
    # put into the object store, not copies.
    assert r.data.tags["hardware.teacher_weights"] == "zero-copy"
    assert r.data.tags["teacher_uri"].startswith("models:/teacher-test-digits/")
    # The driver measures the teacher in one pass, the workers in shards of another batch shape: the last
    # bits of a near-tied image's logits may differ, so the two accuracies agree within one image.
    teacher_top1 = r.data.metrics["teacher/test_top1"]
    assert r.data.tags["teacher_test_top1"] == f"{teacher_top1:.4f}"
    assert teacher_top1 == pytest.approx(teacher_run.selected_top1, abs=100 / 360 + 1e-9)
    assert {"loss/ce", "loss/kd", "loss/total"} <= set(r.data.metrics)
    # The logged student loads back through MLflow.
    model = mlflow.pytorch.load_model(outcome.model_uri)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("method, term, weight", [("at", "at", "at_weight"), ("fitnet", "hint", "hint_weight")])
def test_feature_methods_train_through_ddp_on_two_workers(method, term, weight, teacher_run, mlflow_uri,
                                                          tiny_overrides):
    """The hooks sit on the unwrapped student, so they see its stages through DDP's forward on each worker;
    FitNet's regressor trains beside it and its state is in the checkpoint."""
    cfg = config.load("test_tiny", tiny_overrides + [f"method.name={method}", "teacher.source=teacher-test-digits",
                                                     "optim.epochs=1"])
    assert cfg["train"]["workers"] == 2
    outcome = run.train(cfg)
    r = client(mlflow_uri).get_run(outcome.run_id)
    assert r.info.status == "FINISHED" and float(r.data.params[f"method.{weight}"]) > 0
    assert r.data.metrics[f"loss/{term}"] > 0 and {"loss/ce", "loss/total"} <= set(r.data.metrics)
    own = checkpoint.load(outcome.checkpoint_path)["method"]
    assert set(own) == ({"regressor"} if method == "fitnet" else set())


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streaming"])
def test_crd_trains_through_ddp_on_two_workers_from_both_feeds(in_memory, teacher_run, mlflow_uri, tiny_overrides):
    """CRD needs each training image's index: both feeds carry it. The embeddings train data-parallel, and the
    checkpoint holds the memory banks, a row per training image (validation rows have none), every row the
    epoch trained moved onto the unit sphere."""
    cfg = config.load("test_tiny", tiny_overrides + [
        "method.name=crd", "teacher.source=teacher-test-digits", "optim.epochs=1", "method.nce_k=256",
        "data.val_fraction=0.1", f"data.in_memory={str(in_memory).lower()}"])
    outcome = run.train(cfg)
    r = client(mlflow_uri).get_run(outcome.run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["loss/crd"] > 0
    own = checkpoint.load(outcome.checkpoint_path)["method"]
    assert set(own) == {"embed_s", "embed_t", "memory"}
    memory, rows = own["memory"], run.dataset_info(cfg, verify=False)["train_rows"]
    assert memory["student_bank"].shape == memory["teacher_bank"].shape == (rows, 128)
    assert (memory["normalizers"] > 0).all()
    updated = ((memory["student_bank"].norm(dim=1) - 1).abs() < 1e-5).sum().item()
    # In memory: every row once. Streaming: all but the rows carried into the next epoch (under a worker's
    # batch, on each of 2 workers) and at most one the equal split drops.
    assert updated == rows if in_memory else rows - 2 * 64 - 1 <= updated < rows


def test_a_pair_attention_transfer_cannot_match_is_refused_before_ray(teacher_run, tiny_overrides):
    cfg = config.load("test_tiny", tiny_overrides + ["method.name=at", "teacher.source=teacher-test-digits",
                                                     "model.student=vgg8"])
    with pytest.raises(config.ConfigError, match=r"method.name=at with teacher models:/teacher-test-digits/\d+: "
                                                 r"method 'at' pairs stages one to one: vgg8 has 4 .* resnet8 has 3"):
        run.train(cfg)


def test_same_seed_and_workers_give_the_same_first_epoch_loss(teacher_run, tiny_overrides):
    """The session's teacher run again (its recipe, seed 0, 2 workers; not registered) trains its first epoch
    to the same loss; another seed, the control, does not (a loss blind to the seed would pass the first)."""
    again = run.train(config.load("test_tiny", tiny_overrides + ["optim.epochs=3"]))
    assert again.history[0]["loss/total"] == teacher_run.history[0]["loss/total"]
    other = run.train(config.load("test_tiny", tiny_overrides + ["optim.epochs=1", "train.seed=1"]))
    assert other.history[0]["loss/total"] != teacher_run.history[0]["loss/total"]


def raylet_children(pattern: str) -> list[int]:
    """PIDs of this session's Ray worker processes whose command line contains ``pattern``."""
    import ray._private.worker as worker

    raylet = worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == raylet and pattern in cmdline:
            pids.append(int(entry))
    return pids


def test_resume_after_a_worker_is_killed(ray_session, mlflow_uri, tiny_overrides, tmp_path):
    epochs = 4
    cfg = config.load("test_tiny", tiny_overrides + [f"optim.epochs={epochs}", "train.max_failures=2",
                                                     "train.checkpoint_every=1",
                                                     f"train.run_name=test-resume-{uuid.uuid4().hex[:6]}"])
    from held_run import HoldAtEpoch

    hold = HoldAtEpoch(tmp_path, epoch=1)  # after epoch 1's checkpoint
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run.train(cfg, callbacks=[hold])), daemon=True)
    thread.start()
    hold.wait(thread.is_alive)
    workers = raylet_children("RayTrainWorker")
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    hold.release()
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish within 300 s of the kill"
    result = outcome["result"]
    c = client(mlflow_uri)
    epochs_logged = [m.step for m in c.get_metric_history(result.run_id, "test/top1")]
    assert epochs_logged == list(range(epochs)), "every epoch logged exactly once"
    assert [h["epoch"] for h in result.history] == list(range(epochs))
    assert c.get_run(result.run_id).info.status == "FINISHED"
    # A worker group's first epoch carries its set-up time: the restart began after epoch 1's checkpoint,
    # not at epoch 0 (which would also log every epoch once).
    starts = [h["epoch"] for h in result.history if "setup_time_s" in h]
    assert starts == [0, 2], starts


def test_fresh_runs_never_resume_each_other(ray_session, mlflow_uri, tiny_overrides):
    a = config.new_run_name(config.load("test_tiny", tiny_overrides))
    b = config.new_run_name(config.load("test_tiny", tiny_overrides))
    assert a != b


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this project"):
        checkpoint.load(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pt is not a PyTorch checkpoint \\(torch.load: "):
        checkpoint.load(tmp_path / "junk.pt")
    (tmp_path / "notes.txt").write_text("a teacher.source pointing at the wrong file\n" * 40)
    with pytest.raises(checkpoint.CheckpointError, match="notes.txt is not a PyTorch checkpoint \\(torch.load: "):
        checkpoint.load(tmp_path / "notes.txt")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing")
