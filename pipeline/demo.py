"""``stkd demo``: the whole pipeline on scikit-learn's digits, a few minutes on a 2-core machine.

Prepares the data, trains a teacher (registered in MLflow), then runs the demo study
(``studies/demo.yaml``: CE, KD and STKD students, seeds 0, 1 and 2) as Ray Tune trials that
share one teacher object, and prints each student's test top-1 as mean ± std over the seeds, saying which
students differ by less than their seed spread. Digits' test split has 360 images (one image is 0.28
points), so one seed of each student says little about KD against STKD.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import config as config_lib, stopping, tracking
from pipeline.sweep import study as study_lib
from pipeline.train import run as run_lib

log = logging.getLogger(__name__)

EXPERIMENT = "stkd-demo"  # as in the demo's recipes
STUDY = "demo"  # studies/demo.yaml: the students, their methods and seeds
# One Ray Train worker per student (0.5 CPU): three trials fit Ray's 2 logical CPUs of this machine at
# once, where 2 workers each would run the 9 trials one after the other (Ray Train's fixed cost of a fit,
# 12-16 s, is then paid 9 times in a row instead of hidden behind the other trials' epochs).
STUDENT_WORKERS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="stkd-demo", help="folder for the prepared data and run storage")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of the teacher's run")
    parser.add_argument("--student-workers", type=int, default=STUDENT_WORKERS,
                        help="Ray Train workers of each student's run (one Ray Tune trial each)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="override the recipe's teacher epochs")
    parser.add_argument("--student-epochs", type=int, default=None, help="override the recipe's student epochs")
    parser.add_argument("--seed", type=int, default=0, help="the teacher's seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="the students' seeds, at least two (default: the demo study's 0 1 2); more seeds, "
                             "a tighter mean ± std, one Ray Tune trial more per method each")


@dataclass
class Teacher:
    what: str
    selected_top1: float
    last_top1: float
    selected_epoch: int  # counted from 1
    epochs: int
    run_id: str


@dataclass
class Student:
    """One method's runs over the seeds: test top-1 (mean, sample std) at the selected and last epochs."""

    what: str
    label: str
    seeds: list[int]
    selected: tuple[float, float]
    last: tuple[float, float]
    per_seed: list[float]  # test top-1 at the selected epoch, in the order of seeds
    selected_epochs: list[int]  # per seed, counted from 1
    epochs: int


@dataclass
class Result:
    teacher: Teacher
    students: list[Student]
    errors: list[str]
    parent_run_id: str


def within_spread(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """The demo's noise rule on two ``(mean, std)`` over seeds: the means differ by less than the sum of
    the two sample stds, so these seeds do not tell the two apart."""
    return abs(a[0] - b[0]) < a[1] + b[1]


def spread_lines(students: list[Student]) -> list[str]:
    """For each pair of students, at the selected epoch: whether they differ by less than their seed
    spread (:func:`within_spread`), or which one is ahead by more than it."""
    lines = []
    for a, b in itertools.combinations(students, 2):
        gap, spread = abs(a.selected[0] - b.selected[0]), a.selected[1] + b.selected[1]
        if within_spread(a.selected, b.selected):
            lines.append(f"{a.label} and {b.label} differ by less than their seed spread: "
                         f"{gap:.2f} points < {spread:.2f}")
        else:
            ahead, behind = (a, b) if a.selected[0] > b.selected[0] else (b, a)
            lines.append(f"{ahead.label} is ahead of {behind.label} by more than their seed spread: "
                         f"{gap:.2f} points >= {spread:.2f}")
    return lines


def run_demo(out: Path, workers: int, seed: int, teacher_epochs: int | None = None,
             student_epochs: int | None = None, student_workers: int = STUDENT_WORKERS,
             seeds: list[int] | None = None) -> Result:
    """Run the demo as one MLflow parent run holding the comparison: the teacher's run, then the demo
    study's student runs over ``seeds`` (every run selected on its validation split), its table and plot."""
    from pipeline.data.prepare import prepare

    if seeds is not None and len(set(seeds)) < 2:
        raise config_lib.ConfigError(f"--seeds: give at least two distinct seeds (a std needs two), got {seeds}")

    data = out / "digits"
    if not (data / "manifest.json").exists():
        log.info("preparing scikit-learn digits into %s", data)
        prepare("digits", data, progress=False)
    uri = tracking.tracking_uri()
    name = f"demo-{uuid.uuid4().hex[:4]}"
    # Not the seeds: the study logs the ones it runs into this run, and MLflow refuses a param logged twice
    # with two values (None here, the spec's [0, 1, 2] there, when --seeds is not given).
    params = {"workers": workers, "student_workers": student_workers, "seed": seed,
              "teacher_epochs": teacher_epochs, "student_epochs": student_epochs}
    with tracking.tracked_run(uri, EXPERIMENT, name, params, {"kind": "demo"}) as parent_id:
        common = [f"data.path={data}", f"train.storage_path={(out / 'ray_results').resolve()}"]
        try:
            teacher, register_as = train_teacher(common + [f"train.workers={workers}", f"train.seed={seed}"],
                                                 teacher_epochs)
            result = train_students(common + [f"train.workers={student_workers}"], register_as, student_epochs,
                                    teacher, parent_id, seeds)
        except stopping.Stopped as e:
            # The teacher's run and the study say how to continue themselves (train.run_name=..., --resume),
            # which `stkd demo` does not take: a stopped demo starts over (here before the parent run's tag).
            e.continue_with = stopping.continue_command()
            raise
        log_comparison(uri, parent_id, result)
    return result


def train_teacher(overrides: list[str], epochs: int | None) -> tuple[Teacher, str]:
    """The teacher's run (method ce); returns it and the name it is registered as."""
    cfg = config_lib.load("demo_teacher", overrides)
    if epochs:
        cfg = config_lib.load("demo_teacher", config_lib.with_epochs(overrides, cfg, epochs))
    print(f"[1/2] teacher {cfg['model']['student']} (method ce), {cfg['optim']['epochs']} epochs")
    outcome = run_lib.train(cfg)
    teacher = Teacher(f"teacher {cfg['model']['student']}", outcome.selected_top1, outcome.last_top1,
                      outcome.selected_epoch + 1, len(outcome.history), outcome.run_id)
    return teacher, cfg["mlflow"]["register_as"]


def train_students(overrides: list[str], register_as: str, epochs: int | None, teacher: Teacher,
                   parent_id: str, seeds: list[int] | None = None) -> Result:
    """The demo study: every (method, seed) a Ray Tune trial, one teacher object for all of them."""
    # @latest: the teacher just trained (a bare name means the registry's champion, maybe an earlier one).
    # Its test top-1 is read from that registered version, measured by its run on this test split.
    overrides = overrides + [f"teacher.source={register_as}@latest"]
    spec = study_lib.load_study(STUDY, overrides, seeds)
    if epochs:  # the budget moves for every student alike, the CE student's included
        overrides = config_lib.with_epochs(overrides, config_lib.load(spec["pairs"][0], overrides), epochs)
        spec = study_lib.load_study(STUDY, overrides, seeds)
    cells = spec["configs"]
    first = next(iter(cells.values()))
    print(f"[2/2] students {first['model']['student']}: {', '.join(spec['methods'])} x seeds "
          f"{', '.join(map(str, spec['seeds']))} ({len(cells)} Ray Tune trials, {first['optim']['epochs']} epoch(s), "
          f"{first['train']['workers']} worker(s) each)")
    progress = logging.getLogger("pipeline.sweep.progress")
    progress.addFilter(no_trial_table)
    try:
        summary = study_lib.run_study(spec, parent_run_id=parent_id)
    finally:
        progress.removeFilter(no_trial_table)
    return Result(teacher, students_of(spec, summary["rows"]), summary["errors"], parent_id)


def no_trial_table(record: logging.LogRecord) -> bool:
    """Keeps the study's progress line (every 15 s) and drops its table of trials (every minute): the
    demo prints its own table at the end, and with 9 trials those tables would push it off the screen."""
    return not record.getMessage().startswith("\n")


def students_of(spec: dict[str, Any], rows: list[dict[str, Any]]) -> list[Student]:
    """Each method's finished runs, in the study's order, as mean ± std over their seeds."""
    students = []
    for label in spec["methods"]:
        runs = sorted((r for r in rows if r["method"] == label), key=lambda r: r["seed"])
        if not runs:
            continue
        cfg = spec["configs"][(spec["pairs"][0], label, runs[0]["seed"])]
        students.append(Student(
            f"{label} student {cfg['model']['student']}", label, [r["seed"] for r in runs],
            study_lib.mean_std([r["test_top1_selected"] for r in runs]),
            study_lib.mean_std([r["test_top1_last"] for r in runs]),
            [r["test_top1_selected"] for r in runs], [r["selected_epoch"] for r in runs], runs[0]["epochs"]))
    return students


def log_comparison(uri: str, parent_id: str, result: Result) -> None:
    """The parent run's own table (the study's table, runs and plot are logged beside it)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "demo_table.md"
        table.write_text("```\n" + format_table(result) + "\n```\n")
        mlflow.log_artifact(str(table))
    tracking.log_metrics(uri, parent_id, {"teacher/test_top1_selected": result.teacher.selected_top1}, step=0)


def pm(value: tuple[float, float]) -> str:
    return f"{value[0]:.2f} ± {value[1]:.2f}"


def format_table(result: Result) -> str:
    t = result.teacher
    rule = "-" * 86
    lines = [f"{'run':<21} {'seeds':>5}  {'test top-1 %, selected epoch':<32} {'test top-1 %':>13}  selected",
             f"{'':<21} {'':>5}  {'mean ± std':>13}  {'per seed':<17} {'last epoch':>13}  epoch(s)",
             rule,
             f"{t.what:<21} {1:>5}  {t.selected_top1:>13.2f}  {'':<17} {t.last_top1:>13.2f}  "
             f"{t.selected_epoch}/{t.epochs}"]
    for s in result.students:
        per_seed = " ".join(f"{v:.2f}" for v in s.per_seed)
        lines.append(f"{s.what:<21} {len(s.seeds):>5}  {pm(s.selected):>13}  {per_seed:<17} {pm(s.last):>13}  "
                     f"{','.join(map(str, s.selected_epochs))}/{s.epochs}")
    seeds = sorted({seed for s in result.students for seed in s.seeds})
    lines += [rule,
              f"mean ± sample std over seeds {', '.join(map(str, seeds))}; selected = each run's epoch with the "
              "best validation top-1", "(10% of train held out); test is only reported",
              "",
              "seed spread rule: two students differ by less than their seed spread when, at the selected epoch,",
              "|mean a - mean b| < std a + std b"]
    lines += [f"  {line}" for line in spread_lines(result.students)]
    lines += [f"  failed: {error}" for error in result.errors]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = run_demo(Path(args.out), args.workers, args.seed, args.teacher_epochs, args.student_epochs,
                      args.student_workers, args.seeds)
    print()
    print(format_table(result))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; MLflow parent run {result.parent_run_id}")
    print(f"browse the runs: {tracking.ui_hint(tracking.tracking_uri(), EXPERIMENT)}")
    return 0
