"""What a sweep shows while it runs: the summary line, the trial table, and the wait for resources
that ends a sweep whose cluster never grows."""

from __future__ import annotations

import time

import pytest

from pipeline.sweep import progress as sweep_progress
from pipeline.sweep.progress import Progress, trial_table


class FakeTrial:
    def __init__(self, trial_id, status="RUNNING", config=None, **result):
        self.trial_id, self.status, self.config, self.last_result = trial_id, status, config or {}, result


def sweep_trials():
    return [FakeTrial("a_00000", "TERMINATED", {"optim.lr": 0.05, "kd.T": 4.0}, epochs_done=6,
                      **{"selected/val_top1": 71.25, "images_per_s": 812.4}),
            FakeTrial("a_00001", "TERMINATED", {"optim.lr": 0.1, "kd.T": 2.0}, epochs_done=6,
                      **{"selected/val_top1": 80.5, "images_per_s": 790.0}),
            FakeTrial("a_00002", "TERMINATED", {"optim.lr": 0.2, "kd.T": 8.0}, epochs_done=2,
                      **{"selected/val_top1": 40.0}),
            FakeTrial("a_00003", "RUNNING", {"optim.lr": 0.01, "kd.T": 1.0}, epochs_done=3,
                      **{"selected/val_top1": 55.0, "images_per_s": 640.0}),
            FakeTrial("a_00004", "RUNNING", {"optim.lr": 0.3, "kd.T": 3.0}),
            FakeTrial("a_00005", "PENDING", {"optim.lr": 0.4, "kd.T": 5.0}),
            FakeTrial("a_00006", "ERROR", {"optim.lr": 0.5, "kd.T": 6.0}, epochs_done=1)]


def test_the_table_lists_parameters_and_the_metric_running_first_then_best_first():
    lines = trial_table(sweep_trials(), "selected/val_top1", 6, reported={"a_00003"})
    header, *rows = lines
    assert header.split() == ["trial", "status", "kd.T", "optim.lr", "epoch", "selected/val_top1", "img/s"]
    assert [row.split()[:2] for row in rows] == [
        ["a_00003", "running"], ["a_00004", "starting"], ["a_00005", "pending"], ["a_00001", "done"],
        ["a_00000", "done"], ["a_00002", "stopped"], ["a_00006", "error"]]
    assert rows[3].split()[2:] == ["2", "0.1", "6/6", "80.5", "790"]
    assert rows[1].split()[2:] == ["3", "0.3", "-/6", "-", "-"]
    assert len({len(line) for line in lines}) == 1, "aligned columns, numbers right-aligned"


def test_the_table_is_cut_at_its_limit_and_says_how_many_more():
    lines = trial_table(sweep_trials(), "selected/val_top1", 6, reported=set(), limit=3)
    assert len(lines) == 5 and lines[-1].startswith("... and 4 more")


def test_a_study_cell_reads_as_words():
    trial = FakeTrial("s_00000", "TERMINATED", {"cell": ["digits", "kd", 1]}, epochs_done=1,
                      **{"selected/val_top1": 90.0})
    assert trial_table([trial], "selected/val_top1", 1, set())[1].split()[:5] == ["s_00000", "done", "digits", "kd", "1"]


def test_the_table_comes_every_minute_and_at_the_end(ray_session, caplog):
    now = [0.0]
    progress = Progress("selected/val_top1", 6, {"CPU": 1.0}, timeout_s=600, pending=lambda: [], clock=lambda: now[0])
    trials = sweep_trials()
    caplog.set_level("INFO", logger=sweep_progress.__name__)
    for t in range(0, 121, 5):
        now[0] = t
        progress.on_step_end(0, trials)
    summaries = [r.message for r in caplog.records if r.message.startswith("trials:")]
    tables = [r.message for r in caplog.records if r.message.startswith("\ntrial ")]
    assert len(summaries) == 8 and len(tables) == 2, "a summary every 15 s, a table every 60 s"
    assert summaries[0].startswith("trials: 2 running, 2 finished, 1 stopped early, 1 errored, 1 pending")
    progress.on_experiment_end(trials)
    assert [r.message for r in caplog.records][-1].startswith("\ntrial "), "the last word is the table"


def test_waiting_for_resources_is_shown_and_ends_the_sweep(ray_session, caplog):
    now = [0.0]
    pending = [[{"CPU": 2.0}]]
    progress = Progress("val/top1", 2, {"CPU": 2.0}, timeout_s=60, pending=lambda: pending[0], clock=lambda: now[0],
                        interrupt=lambda: False)  # as where Tune's fit runs outside the main thread
    stopper = sweep_progress.ResourceStopper(progress)
    trials = [FakeTrial("t1"), FakeTrial("t2", "PENDING")]
    caplog.set_level("INFO", logger=sweep_progress.__name__)
    for t in range(0, 50, 5):
        now[0] = t
        progress.on_step_end(0, trials)
    assert not stopper.stop_all()
    assert "1 trial(s) wait for resources ({'CPU': 2.0} each; 1 placement group(s) pending" in caplog.text
    progress.on_trial_result(0, trials, trials[0], {"val/top1": 50.0})  # a trial progressed: the clock restarts
    for t in range(50, 105, 5):
        now[0] = t
        progress.on_step_end(0, trials)
    assert not stopper.stop_all()
    for t in range(105, 125, 5):
        now[0] = t
        progress.on_step_end(0, trials)
    assert stopper.stop_all() and "for 60 s no trial progressed" in progress.timed_out
    with pytest.raises(sweep_progress.ResourceTimeout,
                       match="sweep s: for 60 s no trial progressed.*--resource-timeout.*continue it with: stkd"):
        sweep_progress.check_timed_out(progress, "sweep s", "--resource-timeout SECONDS", "stkd tune --resume")
    pending[0] = []  # resources arrived: waiting is no failure
    fresh = Progress("val/top1", 2, {"CPU": 2.0}, timeout_s=60, pending=lambda: pending[0], clock=lambda: now[0])
    for t in range(125, 400, 5):
        now[0] = t
        fresh.on_step_end(0, trials)
    assert fresh.timed_out is None


def test_a_sweep_the_resource_timeout_ended_resumes_every_trial(ray_session, tmp_path):
    """The timeout stops Tune as a stop signal does: the restored sweep runs the trial it cut short and
    the trials it had not started yet (a Stopper's ``stop_all`` marks the search finished: none would run)."""
    from ray import tune

    from pipeline.sweep import trials

    def trainable(config):
        for step in range(3):
            time.sleep(0.5)
            tune.report({"val/top1": float(step)})

    base = {"tune": {"max_failures": 0}}
    stalled = Progress("val/top1", 3, {"CPU": 1.0}, timeout_s=1, pending=lambda: [{"CPU": 1.0}])
    space = {"x": tune.grid_search([1, 2, 3])}
    tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 1}), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=1),
                       run_config=trials.run_config(base, "stalled", str(tmp_path), stalled))
    first = tuner.fit()
    assert stalled.timed_out
    assert len(first) < 3, "the timeout came before the last trial started"

    progress = Progress("val/top1", 3, {"CPU": 1.0}, timeout_s=60, pending=lambda: [])
    results = trials.restore(str(tmp_path / "stalled"), tune.with_resources(trainable, {"CPU": 1}), space, base,
                            progress).fit()
    assert progress.timed_out is None
    assert sorted(r.config["x"] for r in results) == [1, 2, 3]
    assert [r.metrics["training_iteration"] for r in results] == [3, 3, 3] and not [r for r in results if r.error]
