"""``stkd demo``: the whole pipeline on scikit-learn's digits, a few minutes on a 2-core machine.

Prepares the data, trains a teacher (registered in MLflow), then CE, KD and STKD students on 2
Ray Train workers with one shared teacher object, and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline import config as config_lib, run as run_lib, tracking

log = logging.getLogger(__name__)

EXPERIMENT = "stkd-demo"  # as in the demo's recipes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="stkd-demo", help="folder for the prepared data and run storage")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers per run")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="override the recipe's teacher epochs")
    parser.add_argument("--student-epochs", type=int, default=None, help="override the recipe's student epochs")
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class Row:
    what: str
    selected_top1: float
    last_top1: float
    selected_epoch: int
    epochs: int
    wall_s: float
    run_id: str
    phases: dict[str, float]


    history: list[dict[str, float]]


def row(what: str, outcome: run_lib.Outcome) -> Row:
    return Row(what, outcome.selected_top1, outcome.last_top1, outcome.selected_epoch, len(outcome.history),
               outcome.wall_time_s, outcome.run_id, outcome.phases, outcome.history)


def run_demo(out: Path, workers: int, seed: int, teacher_epochs: int | None = None,
             student_epochs: int | None = None) -> list[Row]:
    """Run the demo as one MLflow parent run holding the comparison: the teacher, then ce, kd and stkd
    students, every run selected on its validation split."""
    from pipeline.prepare import prepare

    data = out / "digits"
    if not (data / "manifest.json").exists():
        log.info("preparing scikit-learn digits into %s", data)
        prepare("digits", data, progress=False)
    uri = tracking.tracking_uri()
    name = f"demo-s{seed}-{uuid.uuid4().hex[:4]}"
    params = {"workers": workers, "seed": seed, "teacher_epochs": teacher_epochs, "student_epochs": student_epochs}
    with tracking.tracked_run(uri, EXPERIMENT, name, params,
                              {"kind": "demo"}) as parent_id:
        rows = train_all(data, out, workers, seed, teacher_epochs, student_epochs)
        log_comparison(uri, parent_id, rows)
    return rows


def train_all(data: Path, out: Path, workers: int, seed: int, teacher_epochs: int | None,
              student_epochs: int | None) -> list[Row]:
    common = {"data.path": str(data), "train.workers": workers, "train.seed": seed,
              "train.storage_path": str((out / "ray_results").resolve())}
    overrides = [f"{k}={v}" for k, v in common.items()]
    rows = []

    teacher_cfg = config_lib.load("demo_teacher", overrides)
    if teacher_epochs:
        teacher_cfg = config_lib.load("demo_teacher", config_lib.with_epochs(overrides, teacher_cfg, teacher_epochs))
    print(f"[1/4] teacher {teacher_cfg['model']['student']} (method ce), {teacher_cfg['optim']['epochs']} epochs")
    rows.append(row(f"teacher {teacher_cfg['model']['student']}", run_lib.train(teacher_cfg)))

    # @latest: the teacher just trained (a bare name means the registry's champion, maybe an earlier one)
    student_overrides = overrides + [f"teacher.source={teacher_cfg['mlflow']['register_as']}@latest"]
    if student_epochs:
        student_overrides = config_lib.with_epochs(student_overrides, config_lib.load("demo_student", student_overrides),
                                                   student_epochs)
    base = config_lib.load("demo_student", student_overrides + ["teacher.evaluate=false"])
    info = run_lib.dataset_info(base, verify=False)  # the teacher's run checksummed it
    teacher = run_lib.load_teacher(base, info)  # loaded and put into the object store once, for every student
    # Not measured again: the teacher run measured these weights (its selected epoch's) on this test split.
    teacher.accuracy = rows[0].selected_top1
    for i, method in enumerate(("ce", "kd", "stkd"), start=2):
        method_overrides = [f"method.name={method}"] + (["teacher.source=null"] if method == "ce" else [])
        cfg = config_lib.load("demo_student", student_overrides + method_overrides)
        print(f"[{i}/4] student {cfg['model']['student']}, method {method}, {cfg['optim']['epochs']} epochs")
        outcome = run_lib.train(cfg, teacher=None if method == "ce" else teacher, verify_data=False)
        rows.append(row(f"{method} student {cfg['model']['student']}", outcome))
    return rows


def log_comparison(uri: str, parent_id: str, rows: list[Row]) -> None:
    """The parent run's artifacts: every student's test curve on one chart, and the table."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "demo_table.md"
        table.write_text("```\n" + format_table(rows) + "\n```\n")
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(comparison_plot(rows, Path(tmp) / "demo_comparison.png")))
    tracking.log_metrics(uri, parent_id, {f"{r.what.split()[0]}/test_top1_selected": r.selected_top1 for r in rows},
                         step=0)


def comparison_plot(rows: list[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, students = rows[0], rows[1:]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in students:
        measured = [(h["epoch"] + 1, h["test/top1"]) for h in r.history if "test/top1" in h]
        ax.plot(*zip(*measured), marker="o", label=f"{r.what} (selected {r.selected_top1:.2f}%)")
    ax.axhline(teacher.selected_top1, color="black", linestyle="--",
               label=f"{teacher.what} ({teacher.selected_top1:.2f}%, {teacher.epochs} epochs)")
    ax.set(xlabel="epoch", ylabel="test top-1 %", title="demo: students on digits")
    ax.set_xticks(range(1, max(r.epochs for r in students) + 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(rows: list[Row]) -> str:
    lines = [f"{'run':<26} {'test top-1 %':>12} {'(epoch)':>8} {'last epoch %':>13} {'wall s':>7}  mlflow run",
             f"{'':<26} {'at selected':>12}", "-" * 104]
    lines += [f"{r.what:<26} {r.selected_top1:>12.2f} {f'({r.selected_epoch + 1}/{r.epochs})':>8} "
              f"{r.last_top1:>13.2f} {r.wall_s:>7.1f}  {r.run_id}" for r in rows]
    lines.append("selected = the epoch with the best validation top-1 (10% of train held out); "
                 "test is only reported")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    rows = run_demo(out, args.workers, args.seed, args.teacher_epochs, args.student_epochs)
    print()
    print(format_table(rows))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    print(f"browse the runs: {tracking.ui_hint(tracking.tracking_uri(), EXPERIMENT)}")
    return 0
