"""The driver's per-epoch line and the console settings."""

from __future__ import annotations

import os

from pipeline import cli
from pipeline.tracking import console as progress


def metrics(**extra):
    return {"epoch": 2, "loss/total": 1.5, "loss/ce": 0.25, "loss/kd": 1.25, "train/acc": 81.25,
            "images_per_s": 1234.4, **extra}


def test_an_epoch_line_has_loss_terms_accuracies_speed_and_time_left():
    line = progress.format_line(metrics(**{"val/top1": 90.0, "test/top1": 89.5}), epochs=30, seconds_left=125)
    assert line == ("epoch  3/30  loss 1.500 (ce 0.250 kd 1.250)  train  81.2%  val  90.0%  test  89.5%  "
                    "  1234 img/s  2:05 left")


def test_an_epoch_without_evaluation_says_so_and_one_term_is_not_repeated():
    m = {k: v for k, v in metrics().items() if k != "loss/kd"}
    line = progress.format_line(m, epochs=3, seconds_left=None)
    assert "(not evaluated)" in line and "(ce" not in line and "left" not in line


def test_quiet_console_never_overrides_what_the_user_set(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    cli.quiet_console()
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"


def test_the_skipped_lines_are_ray_trains_reports_and_routine_cleanup_only():
    import re

    skip = re.compile(cli.QUIET_ENV["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert skip.search("(RayTrainWorker pid=1) Reporting training result 12: TrainingReport(checkpoint=None, ...")
    assert skip.search("(PlacementGroupCleaner pid=2) Detected that the Ray Train controller actor "
                       "(51405d7d323bc0dc208c5ec401000000) is dead. Cleaning up placement group = [...]")
    assert not skip.search("(RayTrainWorker pid=1) Traceback (most recent call last):")
    assert not skip.search("(PlacementGroupCleaner pid=2) Failed to query Ray Train Controller actor state.")
