"""``stkd study``: a paper's table in one command.

A study spec (YAML, ``tune_spaces/studies/``) names a grid of pairs (recipes, each with its teacher
and student) x methods (a label for each method with its variant's hyperparameters) x seeds. Every
cell is one Ray Tune trial training one run with its validation split; each pair's teacher is loaded
and put into the object store once and shared by all its trials. The result is one MLflow parent run
holding the table (mean +- std of test top-1 at the selected and at the last epoch, per pair and
method, the teacher and the CE student beside them), a plot, and every run's figures. An
interrupted study resumes like a sweep: finished runs are not run again.

A spec::

    description: what the study asks
    pairs: [cifar10_resnet56_resnet20]       # recipes (shipped names or paths)
    methods:                                 # label -> method; hyperparameters follow the method
      ce: {name: ce}
      kd: {name: kd}
      stkd-std: {name: stkd, standardize: true}
    seeds: [0, 1, 2]
    overrides: {data.val_fraction: 0.1}      # dotted keys for every run (optional)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any


from pipeline import config as config_lib, run as run_lib, sweep_progress, tracking, tune

log = logging.getLogger(__name__)

STUDIES_DIR = Path(__file__).resolve().parent.parent / "tune_spaces" / "studies"
LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")  # what MLflow accepts in a metric name


class StudyError(config_lib.ConfigError):
    """A study spec is invalid; the message names the file and the key."""


def find_study(name_or_path: str | Path) -> Path:
    found = config_lib.find_shipped(name_or_path, STUDIES_DIR)
    if found is None:
        raise StudyError(f"study {str(name_or_path)!r} not found (shipped: {config_lib.shipped_names(STUDIES_DIR)})")
    return found


def load_study(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read and check a spec, and resolve every cell's config before anything is scheduled.

    Returns ``{"file", "name", "description", "pairs", "methods", "seeds", "configs"}`` where
    ``configs[(pair, label, seed)]`` is the validated config of that run.
    """
    path = find_study(name_or_path)
    where = str(path)
    spec = config_lib.read_mapping(path, StudyError, "pairs, methods and seeds")
    unknown = set(spec) - {"description", "pairs", "methods", "seeds", "overrides"}
    if unknown:
        raise StudyError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                         "expected description, pairs, methods, seeds, overrides")
    pairs, method_specs, seeds = spec.get("pairs"), spec.get("methods"), spec.get("seeds")
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) for p in pairs):
        raise StudyError(f"{where}: pairs: expected a non-empty list of recipe names, got {pairs!r}")
    if len({pair_name(p) for p in pairs}) != len(pairs):
        raise StudyError(f"{where}: pairs: two recipes share a name: {pairs}")
    if not isinstance(method_specs, dict) or not method_specs:
        raise StudyError(f"{where}: methods: expected a mapping label -> {{name: method, ...}}, got {method_specs!r}")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"{where}: seeds: expected a non-empty list of distinct integers, got {seeds!r}")
    for label, method in method_specs.items():
        if not isinstance(label, str) or not LABEL.match(label):
            raise StudyError(f"{where}: methods: label {label!r} may hold only letters, digits, '_', '.' and '-'")
        if not isinstance(method, dict) or "name" not in method:
            raise StudyError(f"{where}: methods.{label}: expected {{name: method, hyperparameter: value, ...}}, "
                             f"got {method!r}")
    extra = spec.get("overrides") or {}
    if not isinstance(extra, dict):
        raise StudyError(f"{where}: overrides: expected a mapping of dotted keys, got {extra!r}")
    common = [f"{k}={json.dumps(v)}" for k, v in extra.items()] + list(overrides or [])

    configs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for pair in pairs:
        try:
            base = config_lib.load(pair, common)
        except config_lib.ConfigError as e:
            raise StudyError(f"{where}: pair {pair!r}: {e}") from None
        if base["method"]["name"] != "ce" and not base["teacher"]["source"]:
            raise StudyError(f"{where}: pair {pair!r} names no teacher (teacher.source)")
        base = tune.with_validation_split(base)
        for label, method in method_specs.items():
            for seed in seeds:
                cell = config_lib.merge(base, {"train": {"seed": seed}})
                if method["name"] == "ce":
                    cell["teacher"]["source"] = None
                try:
                    configs[(pair, label, seed)] = config_lib.with_method(cell, method)
                except config_lib.ConfigError as e:
                    raise StudyError(f"{where}: methods.{label} on pair {pair!r}: {e}") from None
    return {"file": where, "name": path.stem, "description": spec.get("description", ""), "pairs": pairs,
            "methods": method_specs, "seeds": seeds, "configs": configs}


def pair_name(pair: str) -> str:
    """A pair's name in tables and metric names: its recipe's file stem."""
    return Path(pair).stem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="study YAML path or shipped name (tune_spaces/studies/)")
    parser.add_argument("--name", help="study name (default: a new unique one); with --resume, the study to resume")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted study (the latest one of this "
                                                               "spec unless --name says which)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="runs training at once (default: tune.max_concurrent, else every run)")
    parser.add_argument("--resource-timeout", type=float, default=None, metavar="SECONDS",
                        help="end the study when runs wait this long for resources and none progresses "
                             "(default: tune.resource_timeout_s, 1800)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, section.key=value")


def study_trial(params: dict[str, Any], *, configs: dict, teachers: dict, study_name: str,
                parent_run_id: str, study_dir: str) -> None:
    """One cell of the grid: one run of one method on one pair with one seed."""
    pair, label, seed = params["cell"]
    config = config_lib.merge(configs[(pair, label, seed)], {})
    teacher = teachers.get(pair) if config["method"]["name"] != "ce" else None
    tune.train_trial(config, teacher, parent_run_id, study_dir, {"study": study_name, "pair": pair, "variant": label})


def run_study(study: dict[str, Any], name: str | None = None, resume: bool = False,
              max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) a study; returns the summary (rows, table, files, parent run)."""
    from ray import tune as ray_tune

    configs = study["configs"]
    first = next(iter(configs.values()))
    storage = first["train"]["storage_path"]
    name = name or (tune.latest_sweep(storage, f"study-{study['name']}-") if resume else None) \
        or tune.new_sweep_name(f"study-{study['name']}")
    study_dir = f"{storage.rstrip('/')}/{name}"
    if resume and not ray_tune.Tuner.can_restore(study_dir):
        raise StudyError(f"no study to resume at {study_dir}")
    teacher_configs = {pair: next(c for (p, _, _), c in configs.items() if p == pair and c["teacher"]["source"])
                       for pair in study["pairs"]}
    infos, checked = {}, set()
    for pair, cfg in teacher_configs.items():  # refuses a bad split early
        path = cfg["data"]["path"]
        infos[pair] = run_lib.dataset_info(cfg, verify=path not in checked)  # checksums once per dataset, not per pair
        checked.add(path)
    run_lib.ensure_ray()
    teachers, by_source = {}, {}
    for pair, cfg in teacher_configs.items():
        source = cfg["teacher"]["source"]
        if source not in by_source:  # one load and one object per teacher, however many pairs share it
            by_source[source] = run_lib.load_teacher(cfg, infos[pair])
        teachers[pair] = by_source[source]
    uri = tracking.tracking_uri(first)
    experiment = first["mlflow"]["experiment"]
    state = json.loads(tune.read_text(f"{study_dir}/{tune.SWEEP_FILE}") or "{}") if resume else {}
    params = {"spec": study["file"], "pairs": json.dumps(study["pairs"]), "methods": json.dumps(study["methods"]),
              "seeds": json.dumps(study["seeds"])}
    tags = {"study": name, "mlflow.note.content": study["description"]}
    cells = sorted(configs, key=lambda k: (k[2], study["pairs"].index(k[0]), list(study["methods"]).index(k[1])))
    epochs = max(c["optim"]["epochs"] for c in configs.values())
    with tracking.tracked_run(uri, experiment, name, params if not state else {}, tags,
                              resume_run_id=state.get("parent_run_id")) as parent_run_id:
        tune.write_text(f"{study_dir}/{tune.SWEEP_FILE}", json.dumps({"parent_run_id": parent_run_id}))
        trainable = functools.partial(study_trial, configs=configs, teachers=teachers, study_name=name,
                                      parent_run_id=parent_run_id, study_dir=study_dir)
        trainable = ray_tune.with_resources(trainable, {"CPU": tune.TRIAL_CPU})
        concurrent = tune.concurrency(first, len(cells), max_concurrent, tune.fixed_cluster())
        progress = sweep_progress.Progress("selected/val_top1", epochs, tune.trial_resources(first),
                                           first["tune"]["resource_timeout_s"])
        try:
            if resume:
                tuner = tune.restore(study_dir, trainable, first, progress)
            else:
                tuner = ray_tune.Tuner(
                    trainable, param_space={"cell": ray_tune.grid_search([list(c) for c in cells])},
                    tune_config=ray_tune.TuneConfig(max_concurrent_trials=concurrent),
                    run_config=tune.run_config(first, name, storage, progress))
            log.info("study %s: %d runs (%d pair(s) x %d method(s) x %d seed(s)), up to %d at once", name, len(cells),
                     len(study["pairs"]), len(study["methods"]), len(study["seeds"]), concurrent)
            results = tuner.fit()
            sweep_progress.check_timed_out(progress, f"study {name}", "--resource-timeout SECONDS")
        finally:
            tune.close_trial_runs(uri, experiment, parent_run_id, epochs)
        return summarize(study, results, teachers, name, parent_run_id, uri, storage)


def run_rows(results) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished run; the errors of the others."""
    rows, errors = [], []
    for result in results:
        pair, label, seed = result.config["cell"]
        m = result.metrics or {}
        if result.error is not None or "selected/test_top1" not in m:
            errors.append(f"{label} on {pair}, seed {seed}: "
                          + (str(result.error).strip().splitlines()[-1] if result.error else "no result"))
            continue
        rows.append({"pair": pair_name(pair), "method": label, "seed": seed, "test_top1_selected": m["selected/test_top1"],
                     "test_top1_last": m["test/top1"], "val_top1_selected": m["selected/val_top1"],
                     "selected_epoch": int(m["selected/epoch"]) + 1, "epochs": int(m["epoch"]) + 1,
                     "run_name": result.path.rsplit("/", 1)[-1]})
    return rows, errors


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(study: dict[str, Any], rows: list[dict[str, Any]], teachers: dict) -> list[dict[str, Any]]:
    """Per pair: the teacher, then each method: n, mean and std of test top-1 at the selected and last epochs."""
    table = []
    for pair in study["pairs"]:
        teacher, name = teachers[pair], pair_name(pair)
        table.append({"pair": name, "method": f"teacher {teacher.spec['name']}", "n": 1,
                      "selected": (teacher.accuracy, 0.0) if teacher.accuracy is not None else None, "last": None,
                      "val": None})
        for label in study["methods"]:
            runs = [r for r in rows if r["pair"] == name and r["method"] == label]
            if not runs:
                continue
            table.append({"pair": name, "method": label, "n": len(runs),
                          "selected": mean_std([r["test_top1_selected"] for r in runs]),
                          "last": mean_std([r["test_top1_last"] for r in runs]),
                          "val": mean_std([r["val_top1_selected"] for r in runs])})
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    def cell(value):
        return "-" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"

    lines = ["| pair | method | n | test top-1, selected epoch | test top-1, last epoch | val top-1, selected |",
             "|---|---|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['pair']} | {row['method']} | {row['n']} | {cell(row['selected'])} | "
                     f"{cell(row['last'])} | {cell(row['val'])} |")
    return "\n".join(lines)


def plot(study: dict[str, Any], rows: list[dict[str, Any]], table: list[dict[str, Any]], path: Path) -> Path:
    """Per pair: every run's test top-1 (selected epoch and last epoch) per method, the mean ± std, the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, labels = study["pairs"], list(study["methods"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(1.6 * len(labels) + 2, 4.2), squeeze=False)
    for ax, pair in zip(axes[0], map(pair_name, pairs)):
        for i, label in enumerate(labels):
            for offset, key, color, name in ((-0.15, "test_top1_selected", "C0", "selected epoch"),
                                             (0.15, "test_top1_last", "C1", "last epoch")):
                values = [r[key] for r in rows if r["pair"] == pair and r["method"] == label]
                if not values:
                    continue
                mean, std = mean_std(values)
                ax.scatter([i + offset] * len(values), values, color=color, alpha=0.45, s=14)
                ax.errorbar(i + offset, mean, yerr=std, fmt="_", color=color, capsize=5, markersize=16,
                            label=name if i == 0 else None)
        teacher = next(r for r in table if r["pair"] == pair and r["method"].startswith("teacher"))
        if teacher["selected"] is not None:
            ax.axhline(teacher["selected"][0], color="grey", linestyle="--", linewidth=1,
                       label=f"{teacher['method']} ({teacher['selected'][0]:.1f})")
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set(title=pair, ylabel="test top-1 % (mean ± std over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(study, results, teachers, name, parent_run_id, uri, storage) -> dict[str, Any]:
    import csv

    import mlflow

    rows, errors = run_rows(results)
    if not rows:
        raise RuntimeError(f"study {name}: no run finished; first error: {errors[0] if errors else 'none'}")
    table = aggregate(study, rows, teachers)
    out_dir = tune.results_dir(storage, name)
    text = format_table(table)
    (out_dir / "study_table.md").write_text(f"# {name}\n\n{study['description']}\n\n{text}\n")
    with open(out_dir / "study_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["pair"], r["method"], r["seed"])))
    (out_dir / "study_summary.json").write_text(json.dumps({"study": name, "spec": study["file"], "table": table,
                                                            "runs": rows, "errors": errors}, indent=1))
    figure = plot(study, rows, table, out_dir / "study_plot.png")
    files = [out_dir / f for f in ("study_table.md", "study_runs.csv", "study_summary.json", "study_plot.png")]
    for file in files:
        mlflow.log_artifact(str(file))
    stored_dir = tune.publish(out_dir, storage, name, files)[0].rsplit("/", 1)[0]
    metrics = {}
    for row in table:
        if row["method"].startswith("teacher") or row["selected"] is None:
            continue
        key = f"{row['pair']}/{row['method']}"
        metrics.update({f"{key}/test_top1_selected_mean": row["selected"][0],
                        f"{key}/test_top1_selected_std": row["selected"][1],
                        f"{key}/test_top1_last_mean": row["last"][0], f"{key}/test_top1_last_std": row["last"][1]})
    tracking.log_metrics(uri, parent_run_id, {**metrics, "runs_finished": len(rows), "runs_failed": len(errors)}, 0)
    return {"name": name, "parent_run_id": parent_run_id, "rows": rows, "errors": errors, "table": table,
            "text": text, "dir": stored_dir, "plot": str(figure)}


def run_cli(args: argparse.Namespace) -> int:
    options = [f"tune.resource_timeout_s={args.resource_timeout}"] if args.resource_timeout else []
    study = load_study(args.spec, [*options, *args.overrides])
    summary = run_study(study, args.name, args.resume, args.max_concurrent)
    print(f"\nstudy {summary['name']}: {len(summary['rows'])} runs finished, {len(summary['errors'])} failed")
    for error in summary["errors"]:
        print(f"  failed: {error}")
    print(summary["text"])
    print(f"\nselected epoch = best validation top-1; test is only reported. Files: {summary['dir']}")
    print(f"MLflow parent run: {summary['parent_run_id']}  ({tracking.ui_hint(tracking.tracking_uri())})")
    return 0
