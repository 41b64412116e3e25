"""MLflow conventions against a real SQLite store: experiment kind, dataset digest, where to browse."""

from __future__ import annotations

import mlflow

from pipeline import tracking


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
