"""The CPU accuracy study on the real CIFAR-10, through `stkd study` (studies/cifar10_cpu.yaml).

Prepares the data (the full CIFAR-10 for the teacher, a class-balanced 1,000-per-class subset for the
students), trains and registers the teacher unless it is already registered, runs the study, and copies
its table, plot and per-run figures into ``bench/results/accuracy_study.*`` with the machine it ran on.
Run it on an otherwise idle machine.

    python bench/accuracy_study.py [--resume NAME]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time

import common


def teacher_registered(uri: str, name: str) -> bool:
    import mlflow

    return bool(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", help="resume the named, interrupted study")
    args = parser.parse_args()
    from pipeline import config, tracking
    from pipeline.sweep import study as study_lib, trials

    common.prepare_full(common.WORK / "cifar10-full")
    common.prepare_subset(1000)
    teacher_cfg = config.load("study_cifar10_teacher")
    uri = tracking.tracking_uri(teacher_cfg)
    start = time.time()
    if not teacher_registered(uri, teacher_cfg["mlflow"]["register_as"]):
        subprocess.run([common.stkd_cli(), "teacher", "--recipe", "study_cifar10_teacher"], check=True)
    teacher_s = time.time() - start
    study_cmd = [common.stkd_cli(), "study", "--spec", "cifar10_cpu"] + (["--resume", "--name", args.resume]
                                                                          if args.resume else [])
    start = time.time()
    subprocess.run(study_cmd, check=True)
    study_s = time.time() - start
    runs = config.load("study_cifar10_resnet20_resnet8")["train"]["storage_path"]
    name = args.resume or trials.latest_sweep(runs, "study-cifar10_cpu-")
    folder = common.Path(runs) / name
    summary = json.loads((folder / "study_summary.json").read_text())
    shutil.copy(folder / "study_plot.png", common.RESULTS / "accuracy_study.png")
    shutil.copy(folder / "study_table.md", common.RESULTS / "accuracy_study.md")
    common.write_result("accuracy_study", {"study": name, "wall_time_s": {"teacher": teacher_s, "study": study_s},
                                           "spec": str(study_lib.find_study("cifar10_cpu")), **summary})


if __name__ == "__main__":
    main()
