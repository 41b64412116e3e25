"""`stkd demo` as a user runs it: its whole console output, and the MLflow parent run that groups its runs;
and the rule by which it says two students differ by less than their seed spread."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

import pytest

from pipeline import demo

MAX_LINES = 80  # the demo's whole output fits on one screen
ANOTHER_RAY = re.compile(r"\(PlacementGroupCleaner pid=\d+\)")
LABELS = ("ce", "kd", "stkd")


@pytest.mark.parametrize("a, b, within", [
    ((94.0, 0.5), (93.6, 0.4), True),  # 0.4 points apart, spread 0.9
    ((94.0, 0.5), (92.0, 0.4), False),  # 2.0 points apart
    ((94.0, 0.5), (93.1, 0.4), False),  # exactly the spread apart: told apart
    ((90.0, 0.0), (90.0, 0.0), False),  # no spread, no difference: nothing to say they differ by less than
    ((90.0, 2.0), (93.0, 1.5), True),  # order does not matter
])
def test_within_spread_compares_the_mean_gap_with_the_sum_of_the_stds(a, b, within):
    assert demo.within_spread(a, b) is within
    assert demo.within_spread(b, a) is within


def student(label: str, values: list[float]) -> demo.Student:
    spread = statistics.fmean(values), statistics.stdev(values)
    return demo.Student(f"{label} student resnet8", label, [0, 1, 2], spread, spread, values, [3, 3, 3], 3)


def test_one_seed_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(demo.config_lib.ConfigError, match="--seeds: give at least two distinct seeds"):
        demo.run_demo(tmp_path, workers=1, seed=0, seeds=[4, 4])
    assert not list(tmp_path.iterdir())


def test_each_pair_of_students_gets_one_line_saying_whether_seeds_tell_them_apart():
    students = [student("ce", [92.0, 92.5, 93.0]), student("kd", [95.0, 95.5, 96.0]),
                student("stkd", [94.0, 95.0, 96.0])]
    lines = demo.spread_lines(students)
    assert lines == ["kd is ahead of ce by more than their seed spread: 3.00 points >= 1.00",
                     "stkd is ahead of ce by more than their seed spread: 2.50 points >= 1.50",
                     "kd and stkd differ by less than their seed spread: 0.50 points < 1.50"]


def test_the_table_gives_each_student_mean_and_std_at_the_selected_and_last_epoch():
    teacher = demo.Teacher("teacher wrn_16_2", 98.06, 98.33, 10, 30, "run")
    students = [student("ce", [92.0, 92.5, 93.0]), student("kd", [95.0, 95.5, 96.0])]
    table = demo.format_table(demo.Result(teacher, students, ["stkd on demo_student, seed 1: boom"], "parent"))
    assert re.search(r"^teacher wrn_16_2 +1 +98\.06 +98\.33 +10/30$", table, re.M), table
    assert re.search(r"^ce student resnet8 +3 +92\.50 ± 0\.50 +92\.00 92\.50 93\.00 +92\.50 ± 0\.50 +3,3,3/3$",
                     table, re.M), table
    assert "|mean a - mean b| < std a + std b" in table
    assert "  kd is ahead of ce by more than their seed spread: 3.00 points >= 1.00" in table
    assert "  failed: stkd on demo_student, seed 1: boom" in table


@pytest.mark.slow
@pytest.mark.e2e
def test_the_demo_reads_on_one_screen_and_groups_its_runs_in_mlflow(tmp_path, another_ray):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=uri)
    done = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--out", str(tmp_path / "demo"),
                           "--teacher-epochs", "2", "--student-epochs", "1", "--seeds", "3", "5"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    # This suite's Ray runs beside the demo's: Ray Train's placement-group cleaner must still find its
    # own (pipeline/ray_worker.py), or it prints a traceback every run and leaks stopped trials' groups.
    assert not ANOTHER_RAY.search(output), output
    lines = output.splitlines()
    assert len(lines) <= MAX_LINES, output
    assert not [line for line in lines if "Reporting training result" in line or "PreemptionWatcher" in line], output
    # The teacher's epochs on the driver; the students' are Tune trials, shown by the study's progress line.
    assert sum(bool(re.match(r"epoch +\d+/\d+ ", line)) for line in lines) == 2, output
    assert any("pipeline.sweep.progress: trials:" in line for line in lines), output
    assert re.search(r"^teacher wrn_16_2 +1 +\d+\.\d\d ", output, re.M), output
    # Two seeds, not the default three: the suite's time; the rule and the table are the same.
    for label in LABELS:  # every student over its 2 seeds: mean ± std, the seeds' values, the last epoch's mean ± std
        assert re.search(rf"^{label} student resnet8 +2 +\d+\.\d\d ± \d+\.\d\d +(\d+\.\d\d ){{2}} *\d+\.\d\d ± "
                         rf"\d+\.\d\d +1,1/1$", output, re.M), label
    pairs = [line.strip() for line in lines if re.match(r"  \w+ (and \w+ differ by less than|is ahead of \w+ by more "
                                                        r"than) their seed spread: \d+\.\d\d points [<>]=? \d+\.\d\d$",
                                                        line)]
    assert len(pairs) == 3, output

    c = mlflow.MlflowClient(tracking_uri=uri)
    experiment = c.get_experiment_by_name("stkd-demo")
    [parent] = c.search_runs([experiment.experiment_id], "tags.kind = 'demo'")
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("demo-")
    children = c.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name.rsplit("-", 1)[0] for r in children)
    assert names == sorted(["ce-wrn_16_2-s0"] + [f"ce-resnet8-s{s}" for s in (3, 5)]
                           + [f"{m}-wrn_16_2-resnet8-s{s}" for m in ("kd", "stkd") for s in (3, 5)])
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"demo_table.md", "study_table.md",
                                                                      "study_plot.png"}
    stkd = [r.data.metrics["final/test_top1_selected"] for r in children if r.info.run_name.startswith("stkd")]
    assert parent.data.metrics["demo_student/stkd/test_top1_selected_mean"] == pytest.approx(statistics.fmean(stkd))
    assert parent.data.metrics["demo_student/stkd/test_top1_selected_std"] == pytest.approx(statistics.stdev(stkd))
