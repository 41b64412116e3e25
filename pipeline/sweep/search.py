"""``stkd tune``: Ray Tune sweeps, one ``TorchTrainer`` per trial, nested MLflow runs.

The driver loads the teacher once and ``ray.put``s it once; every trial (and every worker of every
trial) receives that one ObjectRef through ``functools.partial``, never through
``tune.with_parameters`` (which would dereference it into a copy per trial).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline import config as config_lib, stopping, tracking
from pipeline.sweep import space as search_space, trials
from pipeline.train import run as run_lib, teachers
from pipeline.storage import read_text, write_text
from pipeline.sweep.progress import Progress

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="search space YAML path or shipped name (tune_spaces/)")
    parser.add_argument("--samples", type=int, default=8, help="trials to sample (each grid point this many times)")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    parser.add_argument("--name", help="sweep name (default: a new unique one); with --resume, the sweep to resume")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted sweep (the latest one of this "
                                                               "space unless --name says which)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials running at once (default: tune.max_concurrent, else every trial; the autoscaler "
                             "adds nodes for those waiting)")
    parser.add_argument("--resource-timeout", type=float, default=None, metavar="SECONDS",
                        help="end the sweep when trials wait this long for resources and none progresses "
                             "(default: tune.resource_timeout_s, 1800)")


def trial(params: dict[str, Any], *, base: dict[str, Any], teacher: run_lib.Teacher | None,
          parent_run_id: str, sweep_dir: str) -> None:
    """One trial: the base config with the sampled parameters, trained by its own TorchTrainer."""
    config = search_space.apply(base, params)
    trials.train_trial(config, teacher, parent_run_id, sweep_dir, {"sweep_parent": parent_run_id})


def sweep(base: dict[str, Any], space: dict[str, Any], samples: int, scheduler: str, name: str | None = None,
          resume: bool = False, max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep. Returns a summary with the best trial and the MLflow parent run."""
    from ray import tune

    base = trials.with_validation_split(config_lib.with_method(base, {"name": space["method"]}))
    if space["method"] != "ce" and not base["teacher"]["source"]:
        raise config_lib.ConfigError(f"the space trains {space['method']!r}, which needs teacher.source")
    info = run_lib.dataset_info(base)
    run_lib.ensure_ray()
    storage = base["train"]["storage_path"]  # a local path (made absolute by config.load) or a URI
    stem = Path(space["file"]).stem
    name = name or (trials.latest_sweep(storage, f"tune-{stem}-") if resume else None) or trials.new_sweep_name(f"tune-{stem}")
    sweep_dir = f"{storage.rstrip('/')}/{name}"
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise config_lib.ConfigError(f"no sweep to resume at {sweep_dir}")
    teacher = run_lib.load_teacher(base, info) if base["teacher"]["source"] else None
    uri = tracking.tracking_uri(base)
    metric, epochs = space["metric"], base["optim"]["epochs"]
    state = json.loads(read_text(f"{sweep_dir}/{trials.SWEEP_FILE}") or "{}") if resume else {}

    params = {"space": space["file"], "samples": samples, "scheduler": scheduler, "metric": metric,
              **{f"space.{k}": json.dumps(v) for k, v in space["parameters"].items()},
              **config_lib.flatten(base)}
    tags = {"sweep": name, "method": space["method"], "student": base["model"]["student"]}
    if teacher:
        tags.update({"teacher_uri": teacher.uri,
                     "teacher_test_top1": f"{teacher.accuracy:.{teachers.ACCURACY_DIGITS}f}"})
    with tracking.tracked_run(uri, base["mlflow"]["experiment"], name, params if not state else {}, tags,
                              resume_run_id=state.get("parent_run_id")) as parent_run_id:
        write_text(f"{sweep_dir}/{trials.SWEEP_FILE}", json.dumps({"parent_run_id": parent_run_id}))
        trainable = functools.partial(trial, base=base, teacher=teacher, parent_run_id=parent_run_id,
                                      sweep_dir=sweep_dir)
        trainable = tune.with_resources(trainable, {"CPU": trials.TRIAL_CPU})
        count = search_space.trial_count(space["parameters"], samples)
        concurrent = trials.concurrency(base, count, max_concurrent, trials.fixed_cluster())
        progress = Progress(metric, epochs, trials.trial_resources(base), base["tune"]["resource_timeout_s"])
        param_space = search_space.to_tune(space["parameters"])
        if resume:
            tuner = trials.restore(sweep_dir, trainable, param_space, base, progress)
        else:
            sched = trials.make_scheduler(scheduler, base, (uri, base["mlflow"]["experiment"], parent_run_id),
                                          state_file=f"{sweep_dir}/{trials.ASHA_STATE}")
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=samples, scheduler=sched,
                                            max_concurrent_trials=concurrent),
                run_config=trials.run_config(base, name, storage, progress),
            )
        log.info("sweep %s: %d trial(s), %s, up to %d at once", name, count, scheduler, concurrent)
        results = trials.fit(tuner, progress, f"sweep {name}", "tune.resource_timeout_s=SECONDS or --resource-timeout "
                             "SECONDS", (uri, base["mlflow"]["experiment"], parent_run_id), epochs,
                             stopping.continue_command(resume_name=name))
        return summarize(results, base, space, uri, parent_run_id, name)


def summarize(results, base, space, uri, parent_run_id, name) -> dict[str, Any]:
    """Log the trial table, the accuracy-vs-hyperparameter plot and the best recipe on the parent run."""
    import mlflow

    frame = results.get_dataframe()
    metric = space["metric"]
    if metric not in frame or frame[metric].isna().all():
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
        raise RuntimeError(f"sweep {name}: no trial reported {metric}; {len(errors)} of {len(results)} trials "
                           f"failed" + (f", first error: {errors[0]}" if errors else ""))
    # Each trial's score is its selected epoch's validation accuracy; its test accuracy is only reported.
    best = results.get_best_result(metric=trials.SELECTED_VAL, mode="max", scope="last")
    best_params = {k: best.config[k] for k in space["parameters"]}
    best_config = search_space.apply(base, best_params)
    best_config["name"] = f"{base['name']}-best-{name}"
    best_config["train"]["run_name"] = None
    best_config["data"]["val_fraction"] = 0.0  # the winner retrains on the whole train split
    storage = base["train"]["storage_path"]
    out_dir = trials.results_dir(storage, name)
    table = out_dir / "trials.csv"
    frame.to_csv(table, index=False)
    recipe = out_dir / "best_recipe.yaml"
    recipe.write_text(f"# Best trial of sweep {name}: validation top-1 {best.metrics.get(trials.SELECTED_VAL):.2f} at its "
                      f"selected epoch (test top-1 there {best.metrics.get(trials.SELECTED_TEST):.2f}, reported only).\n"
                      "# Retrains on the whole train split (data.val_fraction: 0).\n"
                      + yaml.safe_dump(best_config, sort_keys=False))
    plot = plot_trials(frame, list(space["parameters"]), trials.SELECTED_VAL, out_dir / "accuracy_vs_hyperparameters.png")
    for path in (table, recipe, plot):
        mlflow.log_artifact(str(path))
    table_at, recipe_at, plot_at = trials.publish(out_dir, storage, name, [table, recipe, plot])
    best_value, best_test = float(best.metrics[trials.SELECTED_VAL]), float(best.metrics[trials.SELECTED_TEST])
    tracking.log_metrics(uri, parent_run_id, {"best/val_top1": best_value, "best/test_top1_selected": best_test,
                                              "trials": float(len(frame))}, step=0)
    tracking.set_tags(uri, parent_run_id, {"best_trial": best.metrics.get("trial_id", ""),
                                           **{f"best.{k}": v for k, v in best_params.items()}})
    return {"name": name, "parent_run_id": parent_run_id, "trials": len(frame), "best_params": best_params,
            "best_value": best_value, "best_test": best_test, "best_recipe": str(recipe), "table": table_at,
            "plot": plot_at, "stored_recipe": recipe_at}


def plot_trials(frame, keys: list[str], metric: str, path: Path) -> Path:
    """Final accuracy against each hyperparameter, one panel per hyperparameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        column = f"config/{key}"
        if column in frame and metric in frame:
            values = frame[column]
            if values.dtype == object:
                labels = sorted(values.astype(str).unique())
                ax.scatter([labels.index(str(v)) for v in values], frame[metric])
                ax.set_xticks(range(len(labels)), labels, rotation=20)
            else:
                ax.scatter(values, frame[metric])
        ax.set(xlabel=key, ylabel=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_cli(args: argparse.Namespace) -> int:
    space = search_space.load_space(args.space)
    # The space's method replaces the recipe's: hyperparameters follow the method (config.load).
    options = [f"tune.resource_timeout_s={args.resource_timeout}"] if args.resource_timeout else []
    base = config_lib.load(args.recipe, [f"method.name={space['method']}", *options, *args.overrides])
    summary = sweep(base, space, args.samples, args.scheduler, args.name, args.resume, args.max_concurrent)
    print(f"sweep {summary['name']}: {summary['trials']} trials; best validation top-1 {summary['best_value']:.2f} "
          f"(test top-1 at its selected epoch {summary['best_test']:.2f}) with {summary['best_params']}")
    print(f"MLflow parent run: {summary['parent_run_id']}")
    print(f"best recipe: {summary['best_recipe']}  (run it: stkd distill --recipe {summary['best_recipe']})"
          + (f"; stored at {summary['stored_recipe']}" if summary["stored_recipe"] != summary["best_recipe"] else ""))
    print(f"trials table: {summary['table']}; plot: {summary['plot']}")
    return 0
