"""The tracking path under concurrent trials (bench/tracking_load.py, made short): simulated trials in
processes of their own, each through the project's run start, epoch logger and run end, against the real
MLflow server (here on SQLite; on PostgreSQL in test_postgres_server.py, on that test's server); every
metric point stored exactly once, every run FINISHED."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def bench_module():
    """bench/tracking_load.py, imported by name: its trials run in spawned processes, which find their
    function by the module's name (on the path they inherit)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import tracking_load

    return tracking_load


def check_load(load, uri: str, state: Path) -> None:
    row = load.load(uri, trials=4, epochs=5, period_s=0.5, metrics=12, state=state)
    assert row["expected"] == 4 * 5 * 12
    assert not row["crashed_trials"], row
    assert (row["lost"], row["doubled"], row["unfinished_runs"], row["never_stored_epochs"]) == (0, 0, 0, 0), row
    assert row["delay_median_s"] is not None and row["server_cpu_s"] > 0, row


def test_concurrent_trials_store_every_point_once_on_sqlite():
    load = bench_module()
    with load.Server("sqlite", workers=1) as server:
        check_load(load, server.uri, server.state)
