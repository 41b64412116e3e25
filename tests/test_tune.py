"""A 4-trial ASHA sweep on tiny data on 2 CPUs: nested MLflow runs, one teacher object, a best
recipe that `stkd distill` runs unchanged, and a resume that repeats no finished trial."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from pipeline import config
from pipeline.sweep import space, search, trials
from pipeline.train import run, teachers
from stkd import methods

pytestmark = pytest.mark.slow

RECIPE_KD = ["method.ce_weight=0.3", "method.kd_weight=0.7", "method.standardize=true"]


@pytest.fixture(scope="module")
def sweep_result(teacher_run, tiny_overrides, monkeypatch_module, another_ray):
    puts = []
    original = teachers.put
    monkeypatch_module.setattr(teachers, "put", lambda state: puts.append(1) or original(state))
    # The recipe's method is KD, with weights of its own; the space's is STKD (README: hyperparameters follow
    # the method): the trials run STKD from its own defaults, nothing of the recipe's KD section carried over.
    base = config.load("test_tiny", tiny_overrides + ["method.name=kd", *RECIPE_KD, "teacher.source=teacher-test-digits",
                                                      "optim.epochs=2", "name=test-sweep"])
    summary = search.sweep(base, space.load_space("demo"), samples=4, scheduler="asha")
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
        stkd_defaults = methods.hparam_defaults("stkd")
        assert r.data.params["method.name"] == "stkd"
        followed = ("ce_weight", "kd_weight", "standardize", "teacher_target")
        assert {k: r.data.params[f"method.{k}"] for k in followed} == {k: str(stkd_defaults[k]) for k in followed}, \
            "STKD's own defaults, not the recipe's KD weights"
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
    again = search.sweep(base, space.load_space("demo"), samples=4, scheduler="asha", name=summary["name"],
                       resume=True)
    assert again["parent_run_id"] == summary["parent_run_id"]
    _, runs = children(mlflow_uri, summary["parent_run_id"])
    assert len(runs) == 4, "no trial ran again"


def tiny(tiny_overrides, *more):
    return config.load("test_tiny", list(tiny_overrides) + list(more))


def test_concurrency_comes_from_the_options_never_from_the_nodes_up(tiny_overrides):
    cfg = tiny(tiny_overrides, "train.workers=2", "train.cpus_per_worker=0.5")
    assert trials.concurrency(cfg, samples=8) == 8, "every trial: the autoscaler adds nodes for those waiting"
    assert trials.concurrency(cfg, samples=8, cap=3) == 3
    assert trials.concurrency(config.merge(cfg, {"tune": {"max_concurrent": 2}}), samples=8) == 2
    gpu = tiny(tiny_overrides, "train.use_gpu=true", "train.workers=1", "train.gpus_per_worker=0.25")
    assert trials.concurrency(gpu, samples=8) == 8, "no GPU up at launch is no reason to refuse a GPU sweep"
    # A Ray this process started cannot grow: what it has bounds the sweep.
    assert trials.concurrency(cfg, samples=4, cluster={"CPU": 2.0}) == 1
    assert trials.concurrency(cfg, samples=4, cluster={"CPU": 8.0}) == 4
    assert trials.concurrency(gpu, samples=8, cluster={"CPU": 16.0, "GPU": 1.0}) == 4
    with pytest.raises(config.ConfigError, match="one trial needs .* cannot grow"):
        trials.concurrency(cfg, samples=1, cluster={"CPU": 0.5})


@pytest.mark.parametrize("workers,share,ok", [(2, 0.5, False), (4, 0.25, False), (1, 0.25, True), (2, 1, True)])
def test_two_ranks_never_share_a_gpu(tiny_overrides, workers, share, ok):
    overrides = ["train.use_gpu=true", f"train.workers={workers}", f"train.gpus_per_worker={share}"]
    if ok:
        assert tiny(tiny_overrides, *overrides)["train"]["gpus_per_worker"] == share
    else:
        with pytest.raises(config.ConfigError, match="two ranks of one run on one GPU, which NCCL refuses"):
            tiny(tiny_overrides, *overrides)


@pytest.mark.parametrize("override,needle", [
    ("tune.max_concurrent=0", "tune.max_concurrent: must be >= 1"),
    ("tune.resource_timeout_s=0", "tune.resource_timeout_s: must be > 0"),
    ("tune.reduction_factor=1", "tune.reduction_factor"),
    ("tune.grace_period=9", "tune.grace_period: ASHA's first rung must be within the 2 epochs"),
])
def test_tune_options_are_checked(tiny_overrides, override, needle):
    with pytest.raises(config.ConfigError, match=needle):
        tiny(tiny_overrides, "optim.epochs=2", override)


def test_asha_first_rung_follows_the_schedule(tiny_overrides):
    standard = tiny(tiny_overrides, "optim.epochs=240", "optim.schedule=multistep",
                    "optim.milestones=[150, 180, 210]")
    assert trials.grace_period(standard) == 151, "the first epoch trained after the first learning-rate drop"
    cosine = tiny(tiny_overrides, "optim.epochs=100", "optim.schedule=cosine", "optim.warmup_epochs=10")
    assert trials.grace_period(cosine) == 55, "half way through the decay"
    assert trials.grace_period(config.merge(standard, {"tune": {"grace_period": 30}})) == 30
    constant = tiny(tiny_overrides, "optim.epochs=40", "optim.schedule=multistep", "optim.milestones=[]")
    assert trials.grace_period(constant) == 10
    asha = trials.make_scheduler("asha", standard, ("sqlite://", "x", "parent"))
    assert asha._time_attr == "epochs_done" and asha._max_t == 240
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [151], "no rung before the first drop"


def test_latest_sweep_by_the_time_in_its_name(tmp_path):
    import os

    for name, mtime in (("tune-demo-old1", 300), ("tune-demo-20261125-101500-aaaa", 100),
                        ("tune-demo-20261124-235959-bbbb", 200), ("tune-other-20261126-000000-cccc", 50)):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / "tune-demo-20261130-000000-dddd.txt").write_text("a file, not a sweep")
    assert trials.latest_sweep(str(tmp_path), "tune-demo-") == "tune-demo-20261125-101500-aaaa"
    assert trials.STAMP.search(trials.new_sweep_name("tune-demo"))
    assert trials.latest_sweep(str(tmp_path / "none"), "tune-demo-") is None


def test_stopped_trials_give_their_placement_groups_back(sweep_result, ray_session, mlflow_uri):
    """A trial ASHA stops leaves its workers' placement group to Ray Train's PlacementGroupCleaner, which
    asks the State API for "the" Ray instance and, with a second one on the machine (``another_ray``,
    as during this sweep), used to fail: the groups stayed, holding the CPUs later trials wait for (the
    fair fight's study starved on them). ``ray_worker.pin_cluster_address`` names the cluster."""
    import time

    from ray.util import placement_group_table

    _, runs = children(mlflow_uri, sweep_result[0]["parent_run_id"])
    assert any("stopped early" in r.data.tags.get("end_reason", "") for r in runs), "ASHA stopped no trial"
    deadline = time.monotonic() + 60
    while True:
        left = {pg_id: pg["state"] for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"placement groups left after the sweep: {left}"


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_a_resumed_asha_compares_later_trials_with_the_rungs_from_before_the_stop(tiny_overrides, tmp_path):
    """Tune restores a sweep's scheduler as it was created, empty; our ASHA reads its rungs back from
    the sweep's folder, so a trial after ``--resume`` is stopped where it would have been without one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("x")
    base = tiny(tiny_overrides, "optim.epochs=8", "tune.grace_period=2")
    state = str(tmp_path / "sweep" / trials.ASHA_STATE)

    def asha(state_file):
        return trials.make_scheduler("asha", base, (uri, "x", "parent"), state_file=state_file, metric="val/top1",
                                   mode="max")

    first = asha(state)
    for trial_id, val in (("a", 70.0), ("b", 80.0)):
        trial = FakeTrial(trial_id)
        first.on_trial_add(None, trial)
        assert first.on_trial_result(None, trial, {"epochs_done": 2, "val/top1": val}) == "CONTINUE"
    # The sweep stops here. On --resume, Tune builds the scheduler afresh and re-adds the unfinished trials.
    resumed = asha(state)
    resumed.on_trial_add(None, FakeTrial("b"))
    late = FakeTrial("c")
    resumed.on_trial_add(None, late)
    assert resumed.on_trial_result(None, late, {"epochs_done": 2, "val/top1": 60.0}) == "STOP"
    # Without the state, the first result at a rung always goes on: the comparison it would have lost.
    forgetful = asha(None)
    forgetful.on_trial_add(None, late)
    assert forgetful.on_trial_result(None, late, {"epochs_done": 2, "val/top1": 60.0}) == "CONTINUE"


@pytest.mark.parametrize("trial_ended_its_run", [True, False])
def test_closing_trial_runs_beside_a_trial_that_tags_its_own_end(tmp_path, monkeypatch, trial_ended_its_run):
    """A stop signal reaches the sweep's driver and its trials at once: the driver's closing of a trial run and
    the trial's own end can write the run's end_reason at the same moment, and MLflow's SQL store then fails the
    second insert on the tag's unique key (seen in test_stopping's tune case: the driver ended in a traceback).
    The trial's own reason stands, and the run ends KILLED either way."""
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri)
    experiment = c.create_experiment("race")
    parent = c.create_run(experiment).info.run_id
    child = c.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    set_tag = mlflow.MlflowClient.set_tag

    def at_the_same_moment(self, run_id, key, value, *args, **kwargs):
        set_tag(self, run_id, key, "stopped by SIGTERM after epoch 2 of 6")  # the trial's process, first
        if trial_ended_its_run:
            self.set_terminated(run_id, "KILLED")
        raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", at_the_same_moment)
    trials.close_trial_runs(uri, "race", parent, epochs=6)
    run = c.get_run(child)
    assert run.info.status == "KILLED"
    assert run.data.tags["end_reason"] == "stopped by SIGTERM after epoch 2 of 6"
