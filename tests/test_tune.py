"""A 4-trial ASHA sweep on tiny data on 2 CPUs: nested MLflow runs, one teacher object, a best
recipe that `stkd distill` runs unchanged, and a resume that repeats no finished trial."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from pipeline import config, run, search_space, teacher_store, tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_result(teacher_run, tiny_overrides, monkeypatch_module):
    puts = []
    original = teacher_store.put
    monkeypatch_module.setattr(teacher_store, "put", lambda state: puts.append(1) or original(state))
    base = config.load("test_tiny", tiny_overrides + ["method.name=stkd", "teacher.source=teacher-test-digits",
                                                      "optim.epochs=2", "name=test-sweep"])
    summary = tune.sweep(base, search_space.load_space("demo"), samples=4, scheduler="asha")
    return summary, puts, base


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def children(uri, parent_run_id):
    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("stkd-tests")
    return c, c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_sweep_logs_nested_runs_and_ends_every_run(sweep_result, mlflow_uri):
    summary, puts, _ = sweep_result
    c, runs = children(mlflow_uri, summary["parent_run_id"])
    assert summary["trials"] == 4 and len(runs) == 4
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    for r in runs:
        assert r.info.status in ("FINISHED", "KILLED"), r.info.status
        if r.info.status == "KILLED":
            assert "stopped early by the scheduler (asha" in r.data.tags["end_reason"]
        assert {"method.temperature", "method.mixup_alpha"} <= set(r.data.params)
        assert c.get_metric_history(r.info.run_id, "test/top1")
        # The recipe had no validation split: the sweep carved one, and every epoch reports on it.
        assert r.data.params["data.val_fraction"] == "0.1" and int(r.data.tags["val_rows"]) > 0
        assert c.get_metric_history(r.info.run_id, "val/top1")
    artifacts = {a.path for a in c.list_artifacts(summary["parent_run_id"])}
    assert {"trials.csv", "accuracy_vs_hyperparameters.png", "best_recipe.yaml"} <= artifacts


def test_the_parents_best_is_chosen_on_validation(sweep_result, mlflow_uri):
    import pandas

    summary, _, _ = sweep_result
    frame = pandas.read_csv(summary["table"])
    best_row = frame.loc[frame["selected/val_top1"].idxmax()]
    assert summary["best_value"] == pytest.approx(best_row["selected/val_top1"])
    assert summary["best_test"] == pytest.approx(best_row["selected/test_top1"])
    metrics = mlflow.MlflowClient(tracking_uri=mlflow_uri).get_run(summary["parent_run_id"]).data.metrics
    assert metrics["best/val_top1"] == pytest.approx(summary["best_value"])
    assert metrics["best/test_top1_selected"] == pytest.approx(summary["best_test"])
    assert summary["best_params"]["method.temperature"] == pytest.approx(best_row["config/method.temperature"])


def test_one_teacher_object_for_the_whole_sweep(sweep_result, mlflow_uri):
    summary, puts, _ = sweep_result
    assert len(puts) == 1, "the sweep put the teacher into the object store once"
    _, runs = children(mlflow_uri, summary["parent_run_id"])
    assert len({r.data.tags["teacher_object_id"] for r in runs}) == 1


def test_best_recipe_runs_with_distill_unchanged(sweep_result, mlflow_uri):
    summary, _, _ = sweep_result
    recipe = yaml.safe_load(open(summary["best_recipe"]))
    assert recipe["method"]["temperature"] == pytest.approx(summary["best_params"]["method.temperature"])
    assert recipe["data"]["val_fraction"] == 0.0, "the winner retrains on the whole train split"
    cfg = config.load(summary["best_recipe"], ["optim.epochs=1"])
    outcome = run.train(cfg)
    assert mlflow.MlflowClient(tracking_uri=mlflow_uri).get_run(outcome.run_id).info.status == "FINISHED"


def test_resume_repeats_no_finished_trial(sweep_result, mlflow_uri):
    summary, _, base = sweep_result
    again = tune.sweep(base, search_space.load_space("demo"), samples=4, scheduler="asha", name=summary["name"],
                       resume=True)
    assert again["parent_run_id"] == summary["parent_run_id"]
    _, runs = children(mlflow_uri, summary["parent_run_id"])
    assert len(runs) == 4, "no trial ran again"


def test_concurrency_fits_the_cluster():
    cfg = {"train": {"workers": 2, "cpus_per_worker": 0.5, "use_gpu": False, "gpus_per_worker": 1}}
    assert tune.concurrency(cfg, {"CPU": 2.0}, samples=4, cap=None) == 1
    assert tune.concurrency(cfg, {"CPU": 8.0}, samples=4, cap=None) == 4
    gpu = {"train": {"workers": 1, "cpus_per_worker": 1, "use_gpu": True, "gpus_per_worker": 0.25}}
    assert tune.concurrency(gpu, {"CPU": 16.0, "GPU": 1.0}, samples=8, cap=None) == 4
    with pytest.raises(config.ConfigError, match="one trial needs"):
        tune.concurrency(cfg, {"CPU": 0.5}, samples=1, cap=None)
