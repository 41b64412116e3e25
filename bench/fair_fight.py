"""The fair fight on the real CIFAR-10: every student method tuned on validation with the same budget,
then scored on test over seeds (BENCHMARKS §6, ``studies/cifar10_fair.yaml``).

1. Data: the full CIFAR-10 (the teacher's) and the class-balanced 1,000-per-class subset (the students').
2. The budget and the teacher, side by side: ``bench/ce_plateau.py`` trains the CE student at each
   candidate budget while ``stkd teacher --recipe study_cifar10_teacher`` trains and registers the teacher
   (skipped when registered). The budget is the CE plateau (the smallest E whose doubling gains under a
   point of validation top-1) or ``--max-epochs`` when the plateau lies beyond what fits.
3. ``stkd study --spec cifar10_fair`` at that budget (ASHA's first rung a quarter of it).

Every step is skipped when its result exists, so ``--resume`` continues an interrupted fight (the study
with ``stkd study --resume``). Long: start it detached from a clone of a fixed commit::

    STKD_BENCH_DIR=/work/studies/fair STKD_BENCH_RESULTS=/work/studies/fair/results \\
        setsid nohup python bench/fair_fight.py > /work/studies/fair/fight.log 2>&1 &

Writes ``fair_fight.json`` (and the study's table and plot as ``fair_fight.md``/``.png``) to the results folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

import common

STATE = common.WORK / "fair_fight_state.json"


def teacher_registered(uri: str, name: str) -> bool:
    import mlflow

    return bool(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'"))


def paths() -> list[str]:
    """Overrides that move every run's data, Ray storage and MLflow into the bench folder."""
    return [f"train.storage_path={common.WORK / 'ray_runs'}",
            f"mlflow.tracking_uri=sqlite:///{common.WORK / 'mlflow.db'}"]


def budget_and_teacher(state: dict, max_epochs: int) -> None:
    """Measure the CE plateau and train the teacher at the same time; record the budget."""
    from pipeline import config

    teacher_cfg = config.load("study_cifar10_teacher")
    uri = f"sqlite:///{common.WORK / 'mlflow.db'}"
    plateau = None if (common.RESULTS / "ce_plateau.json").exists() else subprocess.Popen(
        [sys.executable, str(common.ROOT / "bench" / "ce_plateau.py"), "--epochs", "10", "20", "40"])
    start = time.time()
    if not teacher_registered(uri, teacher_cfg["mlflow"]["register_as"]):
        subprocess.run([common.stkd_cli(), "teacher", "--recipe", "study_cifar10_teacher",
                        f"data.path={common.WORK / 'cifar10-full'}", *paths()], check=True)
        state["teacher_wall_s"] = time.time() - start
    if plateau is not None and plateau.wait() != 0:
        raise SystemExit("bench/ce_plateau.py failed")
    measured = json.loads((common.RESULTS / "ce_plateau.json").read_text())
    state["plateau_epochs"] = measured["plateau_epochs"]
    state["epochs"] = min(measured["plateau_epochs"] or max_epochs, max_epochs)
    state["gain_to_double"] = measured["gain_to_double"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue an interrupted fight")
    parser.add_argument("--max-epochs", type=int, default=20, help="the most the study can afford (default 20)")
    args = parser.parse_args()
    from pipeline.sweep import trials

    state = json.loads(STATE.read_text()) if args.resume and STATE.exists() else {}
    common.prepare_full(common.WORK / "cifar10-full")
    subset = common.prepare_subset(1000)
    if "epochs" not in state:
        budget_and_teacher(state, args.max_epochs)
        STATE.write_text(json.dumps(state, indent=2))
    epochs = state["epochs"]
    print(f"fair fight: {epochs} epochs per run (CE plateau: {state['plateau_epochs'] or 'beyond the budgets'})",
          flush=True)
    overrides = [f"data.path={subset}", *paths(), f"optim.epochs={epochs}",
                 f"tune.grace_period={max(1, epochs // 4)}"]
    command = [common.stkd_cli(), "study", "--spec", "cifar10_fair", *overrides]
    if state.get("study"):
        command += ["--resume", "--name", state["study"]]
    else:
        state["study"] = trials.new_sweep_name("study-cifar10_fair")
        command += ["--name", state["study"]]
        STATE.write_text(json.dumps(state, indent=2))
    start = time.time()
    subprocess.run(command, check=True)
    state["study_wall_s"] = state.get("study_wall_s", 0) + time.time() - start
    STATE.write_text(json.dumps(state, indent=2))
    folder = common.WORK / "ray_runs" / state["study"]
    summary = json.loads((folder / "study_summary.json").read_text())
    shutil.copy(folder / "study_plot.png", common.RESULTS / "fair_fight.png")
    shutil.copy(folder / "study_table.md", common.RESULTS / "fair_fight.md")
    common.write_result("fair_fight", {"state": state, **summary})


if __name__ == "__main__":
    main()
