"""One short pipeline run per precision: `stkd distill` (1 worker) in fp32 and with `train.precision=auto`,
the same data, teacher and budget; images/s read back from each run's MLflow metrics.

A ce teacher (resnet20) is trained once first (`stkd teacher`, fp32, 2 epochs: its accuracy does not matter
here, only the step's cost); then KD resnet8 students, fp32 and auto alternated ``--repeats`` times so the
machine's drift hits both alike. Reported: the median over epochs 2.. of ``images_per_s`` per run (the first
epoch holds one-off set-up), the resolved precision and memory format (run tags), and auto / fp32.

    python bench/precision_pipeline.py [--per-class 500] [--epochs 3] [--repeats 2]

Writes ``bench/results/precision_pipeline.json``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def stkd(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([common.stkd_cli(), *args], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import mlflow

    data = common.prepare_subset(args.per_class)
    work = Path(tempfile.mkdtemp(prefix="precision-pipeline-", dir=common.WORK))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    shared = [f"data.path={data}", f"train.storage_path={work / 'runs'}", "train.workers=1",
              "train.cpus_per_worker=1", "data.eval_every=100", "optim.schedule=cosine",
              "mlflow.experiment=precision-pipeline"]
    stkd(["teacher", "--recipe", "bench_cifar10_ce", *shared, "model.student=resnet20", "optim.epochs=2",
          "train.precision=fp32", "mlflow.register_as=precision-pipeline-teacher"], env)
    names = []
    for repeat in range(args.repeats):
        for precision in ("fp32", "auto"):
            name = f"kd-{precision}-{repeat}"
            stkd(["distill", "--recipe", "bench_cifar10_ce", *shared, "method.name=kd",
                  "teacher.source=precision-pipeline-teacher", "model.student=resnet8",
                  f"optim.epochs={args.epochs}", f"train.precision={precision}", f"train.run_name={name}"], env)
            names.append((precision, name))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("precision-pipeline")
    runs = []
    for precision, name in names:
        [run] = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")
        rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "images_per_s"),
                                          key=lambda m: m.step)]
        runs.append({"requested": precision, "run_name": name, "resolved": run.data.tags.get("hardware.precision"),
                     "memory_format": run.data.tags.get("hardware.memory_format"),
                     "device": run.data.tags.get("hardware.device"), "images_per_s_per_epoch": rates,
                     "images_per_s": statistics.median(rates[1:] or rates)})
    by = {p: statistics.median(r["images_per_s"] for r in runs if r["requested"] == p) for p in ("fp32", "auto")}
    for r in runs:
        print(f"{r['run_name']}: {r['resolved']} {r['memory_format']}: {r['images_per_s']:.0f} img/s "
              f"(per epoch {', '.join(f'{x:.0f}' for x in r['images_per_s_per_epoch'])})")
    print(f"auto / fp32 images/s: {by['auto'] / by['fp32']:.2f}")
    common.write_result("precision_pipeline", {
        "description": "stkd distill (KD, resnet20 teacher -> resnet8, 1 worker, 1 CPU) on a CIFAR-10 subset, "
                       "train.precision fp32 against auto, alternated; images/s from MLflow, median over epochs "
                       "after the first",
        "settings": vars(args), "runs": runs, "median_images_per_s": by, "auto_over_fp32": by["auto"] / by["fp32"],
    })


if __name__ == "__main__":
    main()
