"""The ``stkd`` command line: prepare, verify-data, teacher, import-teacher, distill, log-run, eval, tune,
study, demo."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Sequence

log = logging.getLogger("stkd")

EPILOG = "Overrides: dotted keys after the options, e.g. optim.lr=0.1 method.temperature=6 train.workers=2"


QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read when mlflow is imported
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per copied file when a model is logged
    # Lines the driver does not print (Ray's log files keep them): each worker's report, logged by a
    # Ray Train module whose logger name escapes ray.train.LoggingConfig's level; and the routine note of
    # Ray Train's placement-group cleaner at every run's end.
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"Reporting training result \d+: TrainingReport"
                                 r"|Detected that the Ray Train controller actor \(\w+\) is dead",
    # Tune's output engine prints an experiment box and a TensorBoard hint even at verbose=0; the legacy
    # one is silent there, and the sweep's own progress (pipeline.sweep.progress) is the console.
    "RAY_AIR_NEW_OUTPUT": "0",
}


def quiet_console() -> None:
    """Ray's and MLflow's routine lines off the console unless ``-v``; a variable the user set wins.
    Must run before ray or mlflow is imported."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML path or shipped recipe name (pipeline/recipes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, section.key=value")


def load_config(args: argparse.Namespace, **sections: Any) -> dict[str, Any]:
    from pipeline import config

    return config.load(args.recipe, args.overrides, **sections)


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data import prepare

    return prepare.run(args)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import run
    from pipeline.data.dataset import PreparedDataset
    from pipeline.tracking import tracking_uri, ui_hint

    sections: dict[str, Any] = {}
    if getattr(args, "teacher", None):
        sections["teacher"] = {"source": args.teacher}
    cfg = load_config(args, **sections)
    if args.command == "teacher":
        if cfg["method"]["name"] != "ce":
            from pipeline.config import ConfigError

            raise ConfigError(f"`stkd teacher` trains with method 'ce'; the recipe says {cfg['method']['name']!r}")
        if not cfg["mlflow"]["register_as"]:
            dataset_name = PreparedDataset.open(cfg["data"]["path"], verify=False).name
            cfg["mlflow"]["register_as"] = f"teacher-{dataset_name}-{cfg['model']['student']}"
    outcome = run.train(cfg)
    chosen = (f"epoch {outcome.selected_epoch + 1} selected on validation ({outcome.val_top1:.2f}%)"
              if outcome.val_top1 is not None else "no validation split: the last epoch")
    print(f"run {outcome.run_name} ({outcome.run_id}): test top-1 {outcome.selected_top1:.2f}% at the selected "
          f"epoch ({chosen}), {outcome.last_top1:.2f}% at the last; {outcome.wall_time_s:.0f} s")
    print(f"model: {outcome.model_uri}" + (f"  registered as {cfg['mlflow']['register_as']}"
                                           if cfg["mlflow"]["register_as"] else ""))
    print(f"checkpoint: {outcome.checkpoint_path}")
    print(f"browse: {ui_hint(tracking_uri(cfg), cfg['mlflow']['experiment'])}")
    return 0


def cmd_verify_data(args: argparse.Namespace) -> int:
    import time

    from pipeline.data.dataset import PreparedDataset
    from pipeline.data.prepare import _human

    start = time.perf_counter()
    dataset = PreparedDataset.open(args.path, verify=True)
    shards = [s for info in dataset.splits.values() for s in info["shards"]]
    size = sum((dataset.root / s["file"]).stat().st_size for s in shards)
    counts = ", ".join(f"{split} {info['rows']}" for split, info in dataset.splits.items())
    print(f"{dataset.root}: {dataset.name}, {counts} rows; {len(shards)} shards ({_human(size)}) match their "
          f"sha256 in the manifest ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_log_run(args: argparse.Namespace) -> int:
    from pipeline.tracking import outage

    record, logged, model_uri = outage.log_later(args.checkpoint, args.wait)
    where = f"run {record['run_name']} ({record['run_id']}) at {record['tracking_uri']}"
    if not logged:
        print(f"{where}: nothing left to log")
        return 0
    print(f"{where}: logged " + "; ".join(logged))
    if model_uri:
        print(f"model: {model_uri}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline import evaluate

    return evaluate.run_cli(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.sweep import search

    return search.run_cli(args)


def cmd_study(args: argparse.Namespace) -> int:
    from pipeline.sweep import study

    return study.run_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    return demo.run(args)


def cmd_import_teacher(args: argparse.Namespace) -> int:
    from pipeline import import_teacher

    return import_teacher.run_cli(args)


def module_arguments(module: str):
    """A subcommand whose module declares its own arguments (``add_arguments``); imported when the parser is built."""
    return lambda parser: importlib.import_module(module).add_arguments(parser)


def verify_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the folder `stkd prepare` wrote")


def distill_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--teacher", help="registered model name (its champion, else latest), name/version, "
                                          "name@alias, models:/ URI, or checkpoint path (overrides teacher.source)")


def log_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the run's final checkpoint (the path its message printed)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the tracking server if it is still away (default 60)")


def tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    module_arguments("pipeline.sweep.search")(parser)


# name, help, its arguments, its handler, whether it takes a recipe (and so shows EPILOG)
COMMANDS = (
    ("prepare", "turn a dataset into Parquet shards + manifest", module_arguments("pipeline.data.prepare"),
     cmd_prepare, False),
    ("verify-data", "check every shard of a prepared dataset against its sha256", verify_data_arguments,
     cmd_verify_data, False),
    ("teacher", "train a teacher (method ce) and register it in MLflow", add_recipe_arguments, cmd_train, True),
    ("import-teacher", "register a published teacher (RepDistiller/mdistiller checkpoint or state dict) in MLflow, "
     "measured on a prepared test split", module_arguments("pipeline.import_teacher"), cmd_import_teacher, False),
    ("distill", "train a student with a teacher shared through the object store", distill_arguments, cmd_train,
     True),
    ("log-run", "log what a run could not log while MLflow was away, from its checkpoint", log_run_arguments,
     cmd_log_run, False),
    ("eval", "measure a model on a prepared split (top-1, top-5, per-class, ECE, NLL) and log it to MLflow, linked "
     "to the model", module_arguments("pipeline.evaluate"), cmd_eval, False),
    ("tune", "Ray Tune sweep over a search space", tune_arguments, cmd_tune, True),
    ("study", "a grid of pairs x methods x seeds as parallel runs: the table a paper prints",
     module_arguments("pipeline.sweep.study"), cmd_study, True),
    ("demo", "the whole pipeline on scikit-learn's digits, in minutes on a laptop", module_arguments("pipeline.demo"),
     cmd_demo, False),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stkd", description="STKD knowledge distillation on Ray, logged to MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, arguments, handler, recipe in COMMANDS:
        command = sub.add_parser(name, help=text, epilog=EPILOG if recipe else None)
        arguments(command)
        command.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before the parser is built: building it imports the subcommands' modules, and with them Ray.
    if "-v" in argv or "--verbose" in argv:
        os.environ["STKD_VERBOSE"] = "1"  # Ray Train's INFO lines too (pipeline.train.run.verbose)
    else:
        quiet_console()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Ray Tune reads this when its experiment starts (ray.tune.tune._setup_signal_catching): Ctrl-C is
    # ours, so that SIGTERM and SIGINT stop a sweep alike (pipeline.stopping.tune_stopper).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    from pipeline.stopping import Stopped, signals

    signals.install()
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.tracking import TrackingIncomplete

    from pipeline.data.dataset import DatasetError
    from pipeline.data.memory_check import InsufficientMemoryError
    from pipeline.data.prepare import PrepareError
    from pipeline.sweep.space import SpaceError
    from stkd.precision import PrecisionError

    # The project's own errors are the user's input: one line, exit 2. Anything else keeps its traceback.
    user_errors = (ConfigError, CheckpointError, DatasetError, PrepareError, SpaceError, PrecisionError,
                   InsufficientMemoryError)
    try:
        return args.func(args)
    except user_errors as e:
        print(f"stkd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrackingIncomplete as e:  # trained and checkpointed; the tracking server was away
        print(f"stkd {args.command}: {e}", file=sys.stderr)
        return 3
    except Stopped as e:
        print(f"stkd {args.command}: {e}" + (f"; continue with: {e.continue_with}" if e.continue_with else ""),
              file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"stkd {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        signals.uninstall()
