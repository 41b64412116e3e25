"""Accuracy study on real CIFAR-10 with a reduced CPU budget: teacher resnet56 (ce), students resnet20
with ce, kd, dkd and stkd, several seeds each, same recipe and epochs, through the project's pipeline.

Every run is ``pipeline.run.train`` (Ray Train, 1 worker, ``train.cpus_per_worker: 1``) on a recipe
``pipeline/recipes/bench_cifar10_<method>.yaml`` and is logged to MLflow (``$MLFLOW_TRACKING_URI``,
default ``sqlite:////tmp/bench/mlflow.db``). The training images are a class-balanced subset of the
CIFAR-10 train split (``--train-per-class``, first N file names of each class); the test split is whole.

The teacher trains first; it is then evaluated once on the test split and each student run is a child
process (``--child METHOD SEED``) joining this script's Ray cluster, ``--parallel`` (default 2) at a
time: with 1 CPU per worker, two student runs share the 2-core machine. Children load the teacher
from its checkpoint with ``teacher.evaluate: false``.

Resumable: each finished run is recorded in ``bench/results/accuracy_study.json`` and skipped when the
script runs again (the teacher too). ``--measure-epoch`` trains one epoch of the teacher and of a KD
and an STKD student and prints the times, to size the budget.

    python bench/accuracy_study.py [--seeds 0 1 2] [--methods ce kd dkd stkd] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{common.WORK / 'mlflow.db'}")

from pipeline import config as config_lib, run  # noqa: E402

RESULT = common.RESULTS / "accuracy_study.json"
CHILDREN = common.WORK / "study_runs"
PLOT = common.RESULTS / "accuracy_study.png"
METHODS = ("ce", "kd", "dkd", "stkd")


def overrides(data_path: str, tag: str, extra: list[str]) -> list[str]:
    return [f"data.path={data_path}", f"train.run_name=bench-{tag}-{uuid.uuid4().hex[:6]}",
            f"train.storage_path={common.WORK / 'ray_runs'}",
            f"mlflow.tracking_uri={os.environ['MLFLOW_TRACKING_URI']}", *extra]


def run_record(outcome: run.Outcome, config: dict) -> dict:
    return {
        "run_id": outcome.run_id, "run_name": outcome.run_name, "model_uri": outcome.model_uri,
        "checkpoint_path": outcome.checkpoint_path, "best_top1": outcome.best_top1, "last_top1": outcome.last_top1,
        "wall_time_s": outcome.wall_time_s, "epochs": config["optim"]["epochs"], "seed": config["train"]["seed"],
        "method": config["method"], "student": config["model"]["student"],
        "test_top1_per_epoch": [h["test/top1"] for h in outcome.history],
        "epoch_time_s": [h["epoch_time_s"] for h in outcome.history],
        "images_per_s": [h["images_per_s"] for h in outcome.history],
    }


def load_results() -> dict:
    if RESULT.exists():
        return json.loads(RESULT.read_text())
    return {"teacher": None, "runs": {}}


def save(results: dict, settings: dict) -> None:
    results["settings"] = settings
    results["summary"] = summarize(results)
    payload = {k: v for k, v in results.items() if k not in ("benchmark", "machine")}
    common.write_result("accuracy_study", payload)
    try:
        plot(results)
    except Exception as e:  # noqa: BLE001 - a plot failure must not lose the numbers
        print(f"plot failed: {e}")


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def summarize(results: dict) -> dict:
    by_method: dict[str, dict] = {}
    for method in METHODS:
        runs = [r for r in results["runs"].values() if r["method"]["name"] == method]
        if not runs:
            continue
        by_method[method] = {"best_top1": mean_std([r["best_top1"] for r in runs]),
                             "last_top1": mean_std([r["last_top1"] for r in runs]),
                             "wall_time_s": mean_std([r["wall_time_s"] for r in runs]),
                             "seeds": sorted(r["seed"] for r in runs)}
    summary: dict = {"methods": by_method}
    if results.get("teacher"):
        summary["teacher"] = {k: results["teacher"][k] for k in ("best_top1", "last_top1", "wall_time_s")}
        summary["teacher"]["test_top1_as_loaded"] = results["teacher"].get("test_top1_as_loaded")
    wall = sum(r["wall_time_s"] for r in results["runs"].values()) + (results.get("teacher") or {}).get(
        "wall_time_s", 0.0)
    summary["total_run_wall_time_s"] = wall
    if "stkd" in by_method and "kd" in by_method:
        cmp = {}
        for key in ("best_top1", "last_top1"):
            s, k = by_method["stkd"][key], by_method["kd"][key]
            diff = s["mean"] - k["mean"]
            se = math.sqrt(s["std"] ** 2 / s["n"] + k["std"] ** 2 / k["n"]) if s["n"] > 1 and k["n"] > 1 else None
            cmp[key] = {"stkd_minus_kd": diff, "welch_t": diff / se if se else None,
                        "beyond_seed_spread": diff > s["std"] + k["std"],
                        "ranges_disjoint_stkd_higher": s["min"] > k["max"]}
        summary["stkd_vs_kd"] = cmp
    return summary


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]["methods"]
    names = [m for m in METHODS if m in summary]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for i, method in enumerate(names):
        for offset, key, marker, label in ((-0.12, "best_top1", "o", "best"), (0.12, "last_top1", "s", "last")):
            s = summary[method][key]
            ax.scatter([i + offset] * len(s["values"]), s["values"], marker=marker, s=14, alpha=0.5,
                       color="C0" if key == "best_top1" else "C1", label=label if i == 0 else None)
            ax.errorbar(i + offset, s["mean"], yerr=s["std"], fmt="_", markersize=14, capsize=4,
                        color="C0" if key == "best_top1" else "C1")
    teacher = results.get("teacher")
    if teacher:
        ax.axhline(teacher["best_top1"], color="grey", linestyle="--", linewidth=1,
                   label=f"teacher resnet56 (best {teacher['best_top1']:.1f})")
    ax.set_xticks(range(len(names)), [f"{m}\n(n={summary[m]['best_top1']['n']})" for m in names])
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    s = results["settings"]
    ax.set_title(f"resnet56 -> resnet20, {s['train_images']} train imgs, {s['student_epochs']} epochs "
                 "(mean ± std over seeds)", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)


def student_config(method: str, seed: int, data_path: str, teacher_source: str | None) -> dict:
    extra = [f"train.seed={seed}"]
    if method != "ce":
        extra += [f"teacher.source={teacher_source}", "teacher.evaluate=false"]
    return config_lib.load(f"bench_cifar10_{method}", overrides=overrides(data_path, method, extra))


def child(method: str, seed: int, data_path: str, teacher_source: str | None, out: str) -> None:
    """One student run, in its own process, on the parent's Ray cluster (RAY_ADDRESS)."""
    config = student_config(method, seed, data_path, teacher_source)
    outcome = run.train(config, extra_tags={"study": "bench-accuracy"})
    Path(out).write_text(json.dumps(run_record(outcome, config), default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=2, help="student runs at a time")
    parser.add_argument("--measure-epoch", action="store_true", help="time one epoch of teacher and students")
    parser.add_argument("--replot", action="store_true", help="draw the plot again from the results file")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-source", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.replot:
        plot(load_results())
        return

    import ray

    data_path = str(common.prepare_subset(args.train_per_class))
    if args.child:
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
        try:
            child(args.child[0], int(args.child[1]), data_path, args.teacher_source, args.child_out)
        finally:
            ray.shutdown()
        return
    ray.init(logging_level="WARNING", include_dashboard=False)
    try:
        if args.measure_epoch:
            measure_epoch(data_path)
            return
        results = load_results()
        teacher_cfg = config_lib.load("bench_cifar10_teacher", overrides=overrides(data_path, "teacher", []))
        student_cfg = config_lib.load("bench_cifar10_ce", overrides=overrides(data_path, "ce", []))
        info = run.dataset_info(teacher_cfg)
        settings = {"dataset": data_path, "train_images": info["train_rows"], "test_images": info["test_rows"],
                    "teacher_epochs": teacher_cfg["optim"]["epochs"], "student_epochs": student_cfg["optim"]["epochs"],
                    "seeds": args.seeds, "methods": args.methods, "workers": 1,
                    "cpus_per_worker": student_cfg["train"]["cpus_per_worker"], "parallel_student_runs": args.parallel,
                    "recipes": [f"pipeline/recipes/bench_cifar10_{m}.yaml" for m in ("teacher", *METHODS)],
                    "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}
        study_start = time.perf_counter()
        if not results.get("teacher"):
            print("training the teacher (resnet56, ce)", flush=True)
            outcome = run.train(teacher_cfg, extra_tags={"study": "bench-accuracy"})
            results["teacher"] = run_record(outcome, teacher_cfg)
            save(results, settings)
            print(f"teacher: best {outcome.best_top1:.2f} last {outcome.last_top1:.2f} "
                  f"({outcome.wall_time_s:.0f}s)", flush=True)
        teacher_source = results["teacher"]["checkpoint_path"]
        if results["teacher"].get("test_top1_as_loaded") is None:
            # The teacher as the students load it, evaluated once on the whole test split.
            config = student_config("kd", 0, data_path, teacher_source)
            config["teacher"]["evaluate"] = True
            results["teacher"]["test_top1_as_loaded"] = run.load_teacher(config, info).accuracy
            save(results, settings)
        pending = [(m, seed) for seed in args.seeds for m in args.methods if f"{m}/seed{seed}" not in results["runs"]]
        CHILDREN.mkdir(parents=True, exist_ok=True)
        lock = threading.Lock()
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

        def launch(job: tuple[str, int]) -> None:
            method, seed = job
            key = f"{method}/seed{seed}"
            out = CHILDREN / f"{method}-seed{seed}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--child", method, str(seed), "--child-out", str(out),
                   "--train-per-class", str(args.train_per_class), "--teacher-source", teacher_source]
            for attempt in range(2):
                print(f"{key}: training (attempt {attempt + 1})", flush=True)
                with open(CHILDREN / f"{method}-seed{seed}.log", "a") as log:
                    code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if code == 0 and out.exists():
                    break
                print(f"{key}: child exited with {code}; see {CHILDREN / f'{method}-seed{seed}.log'}", flush=True)
            else:
                return
            record = json.loads(out.read_text())
            with lock:
                results["runs"][key] = record
                save(results, settings)
            print(f"{key}: best {record['best_top1']:.2f} last {record['last_top1']:.2f} "
                  f"({record['wall_time_s']:.0f}s; study so far {time.perf_counter() - study_start:.0f}s)", flush=True)

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(launch, pending))
        results["study_wall_time_s_this_invocation"] = time.perf_counter() - study_start
        save(results, settings)
        print(json.dumps(results["summary"], indent=1, default=float), flush=True)
    finally:
        ray.shutdown()


def measure_epoch(data_path: str) -> None:
    """One epoch of the teacher recipe and of a KD student (random-weight teacher), timed."""
    import tempfile

    import torch

    from pipeline import checkpoint
    from stkd import models

    teacher_cfg = config_lib.load("bench_cifar10_teacher", overrides=overrides(
        data_path, "measure-teacher", ["optim.epochs=1", "optim.milestones=[]", "mlflow.register_as=null",
                                       "mlflow.experiment=stkd-bench-measure"]))
    start = time.perf_counter()
    outcome = run.train(teacher_cfg)
    print(f"teacher epoch: train {outcome.history[0]['epoch_time_s']:.1f}s, run wall {time.perf_counter() - start:.1f}s",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = checkpoint.model_spec("resnet56", 10, 3)
        checkpoint.save({"model": spec, "student": models.create("resnet56", 10).state_dict()}, tmp)
        for method in ("kd", "stkd"):
            cfg = config_lib.load(f"bench_cifar10_{method}", overrides=overrides(
                data_path, f"measure-{method}", ["optim.epochs=1", "optim.milestones=[]", f"teacher.source={tmp}",
                                                 "teacher.evaluate=false", "mlflow.experiment=stkd-bench-measure"]))
            start = time.perf_counter()
            outcome = run.train(cfg)
            print(f"{method} student epoch: train {outcome.history[0]['epoch_time_s']:.1f}s, "
                  f"run wall {time.perf_counter() - start:.1f}s", flush=True)
    del torch


if __name__ == "__main__":
    main()
