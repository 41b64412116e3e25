"""The set-up every Ray worker process of an stkd job runs first: it names the worker's own cluster."""

from __future__ import annotations

import os

import pytest

from pipeline import ray_worker


@pytest.mark.parametrize("given", [None, "local", "auto", " local "])
def test_no_address_or_one_that_names_no_cluster_becomes_the_workers_own(ray_session, monkeypatch, given):
    if given is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", given)
    ray_worker.pin_cluster_address()
    assert os.environ["RAY_ADDRESS"] == ray_session.get_runtime_context().gcs_address


def test_an_address_the_user_set_is_kept(ray_session, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    ray_worker.pin_cluster_address()
    assert os.environ["RAY_ADDRESS"] == "10.1.2.3:6379"
