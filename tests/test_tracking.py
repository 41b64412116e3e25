"""MLflow conventions against a real SQLite store: experiment kind, dataset digest, where to browse."""

from __future__ import annotations

import os

import mlflow
import pytest

from pipeline import tracking
from pipeline.sweep import trials


def test_experiments_are_tagged_for_training_runs_even_when_they_already_existed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    old = c.create_experiment("made-before")
    assert tracking.experiment_id(c, "made-before") == old
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    new = tracking.experiment_id(c, "new")
    assert c.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_dataset_digest_follows_the_shards_content():
    manifest = {"splits": {"train": {"shards": [{"sha256": "a" * 64}]}, "test": {"shards": [{"sha256": "b" * 64}]}}}
    digest = tracking.dataset_digest(manifest)
    assert len(digest) == 12 and digest == tracking.dataset_digest(manifest)
    manifest["splits"]["test"]["shards"][0]["sha256"] = "c" * 64
    assert tracking.dataset_digest(manifest) != digest


def test_the_browse_hint_opens_the_experiments_training_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.experiment_id(tracking.client(uri), "stkd-demo")
    hint = tracking.ui_hint(uri, "stkd-demo")
    assert hint == (f"mlflow ui --backend-store-uri {uri}, then open "
                    f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning")
    assert tracking.ui_hint("http://mlflow:5000/", None) == "open http://mlflow:5000"
    mlflow.set_tracking_uri(None)


def ended(uri, run_id):
    run = tracking.client(uri).get_run(run_id)
    return run.info.status, run.data.tags.get("end_reason")


@pytest.mark.parametrize("driver_first", [True, False])
def test_a_trial_the_scheduler_stopped_keeps_the_drivers_ending_whoever_writes_last(tmp_path, driver_first):
    """ASHA's stop kills the trial's trainer, so the trial's own process raises (ActorDiedError) while
    the sweep's driver ends the run with the scheduler's reason; the dying trial must not overwrite it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.client(uri).create_run(tracking.experiment_id(tracking.client(uri), "sweep")).info.run_id
    with pytest.raises(RuntimeError):
        with tracking.tracked_run(uri, "sweep", "trial", {}, parent_run_id=parent) as run_id:
            tracking.client(uri).set_tag(run_id, tracking.SCHEDULER_STOP_TAG, "asha, after 2 epochs")
            if driver_first:
                trials.close_trial_runs(uri, "sweep", parent, epochs=4)
            raise RuntimeError("ActorDiedError: The actor died unexpectedly before finishing this task.")
    if not driver_first:
        trials.close_trial_runs(uri, "sweep", parent, epochs=4)
    status, reason = ended(uri, run_id)
    assert status == "KILLED"
    assert reason == "stopped early by the scheduler (asha, after 2 epochs) after 0 of 4 epochs"
    mlflow.set_tracking_uri(None)


def test_a_run_that_fails_on_its_own_keeps_its_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError):
        with tracking.tracked_run(uri, "runs", "run", {}) as run_id:
            raise RuntimeError("out of memory")
    assert ended(uri, run_id) == ("FAILED", "RuntimeError: out of memory")
    mlflow.set_tracking_uri(None)


def test_a_client_sets_nothing_process_wide_and_using_puts_back_what_was_there(tmp_path, monkeypatch):
    uri, other = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)  # as a user exports it; MLflow's own globals unset
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = tracking.compat.mlflow_global_uris()
    tracking.client(uri).search_experiments()
    assert tracking.compat.mlflow_global_uris() == before and os.environ["MLFLOW_TRACKING_URI"] == other
    with tracking.using(uri):
        assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
        with tracking.using(uri):  # nested, as the demo's runs inside its parent run
            pass
        assert mlflow.get_tracking_uri() == uri
    assert tracking.compat.mlflow_global_uris() == before
    assert os.environ["MLFLOW_TRACKING_URI"] == other and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == other, "MLflow's default (the variable) is back"


def test_a_run_ends_in_its_own_store_and_leaves_mlflow_as_it_found_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = tracking.compat.mlflow_global_uris()
    with tracking.tracked_run(uri, "runs", "run", {"a": 1}) as run_id:
        assert mlflow.active_run().info.run_id == run_id
        mlflow.log_text("fluent", "note.txt")  # the fluent API writes into the run's store
    assert mlflow.active_run() is None
    assert tracking.compat.mlflow_global_uris() == before and "MLFLOW_TRACKING_URI" not in os.environ
    c = tracking.client(uri)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(run_id)] == ["note.txt"]


def log_the_same_dataset(uri: str, folder: str, barrier, out) -> None:
    """In a process of its own: a run of experiment 'race' logs the prepared dataset at ``folder`` as its
    input once every process has its run open; puts the run id, or the error."""
    with tracking.using(uri):
        run = mlflow.start_run(experiment_id=tracking.experiment_id(tracking.client(uri), "race"))
        barrier.wait()
        try:
            tracking.log_dataset(run.info.run_id, "digits", folder, "d1g3st", {"train_rows": 1})
            out.put(run.info.run_id)
        except Exception as e:
            out.put(f"{type(e).__name__}: {tracking.first_line(e)}")
        finally:
            mlflow.end_run()


def test_runs_logging_the_same_new_dataset_at_once_all_get_it(tmp_path):
    """MLflow's SQL store looks a dataset up and then inserts it, so the first trials of a sweep, logging one
    new dataset at the same moment, can collide on its unique key (test_stopping's study once did). Six
    processes at a barrier: without the retry in log_dataset, 2 of 6 such rounds (the same processes, calling
    mlflow.log_input directly) failed here, so this catches its removal about one run in three."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.experiment_id(tracking.client(uri), "race")  # the store and the experiment exist, as in a sweep
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=log_the_same_dataset, args=(uri, str(tmp_path), barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(len(r) == 32 for r in results), results
    c = tracking.client(uri)
    for run_id in results:
        assert [d.dataset.digest for d in c.get_run(run_id).inputs.dataset_inputs] == ["d1g3st"]
