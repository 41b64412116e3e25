"""`stkd import-teacher`: a published teacher into the MLflow registry, measured on a prepared test split.

Reads RepDistiller's and mdistiller's checkpoints (``{"model": state_dict, "epoch": ..., "accuracy" or
"best_acc": ..., "optimizer": ...}``, e.g. ``resnet56_vanilla/ckpt_epoch_240.pth``; mdistiller's whole
distiller states, whose keys start ``module.student.``) and plain state dicts, always with
``torch.load(weights_only=True)``. Their key names are this zoo's (checked for all 22 architectures
against both repositories' model code). The teacher is registered like one trained by `stkd teacher`:
the same model files, its test accuracy on the version, ``champion`` if it is the best so far.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline import tracking
from pipeline.train import checkpoint, teachers
from pipeline.train.checkpoint import CheckpointError
from stkd import models

log = logging.getLogger(__name__)

STATE_DICT_KEYS = ("model", "state_dict", "student")  # where checkpoints of the literature keep the weights
SHOWN = 6  # names listed per kind of mismatch before "... and N more"


@dataclass
class Imported:
    name: str
    version: str
    test_top1: float
    champion: str  # the version `champion` points to now
    run_id: str
    model_uri: str


def is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.``; of a distiller's state (``student.*`` + ``teacher.*``), keep the student."""
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("student.") for k in state_dict) and all(
            k.startswith(("student.", "teacher.")) for k in state_dict):
        log.info("a distiller's state (student and teacher): importing its student")
        state_dict = {k.removeprefix("student."): v for k, v in state_dict.items() if k.startswith("student.")}
    return state_dict


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights in a checkpoint or plain state dict, and what the file says about them (epoch, accuracy)."""
    path = Path(path).expanduser()
    loaded = checkpoint.safe_load(path)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict or a state dict")
    if is_state_dict(loaded):
        return strip_prefixes(loaded), {"format": "state dict"}
    for key in STATE_DICT_KEYS:
        if is_state_dict(loaded.get(key)):
            about = {"format": f"checkpoint['{key}']"}
            for name in ("epoch", "accuracy", "best_acc"):
                value = loaded.get(name)
                if isinstance(value, (int, float)) or isinstance(value, torch.Tensor) and value.numel() == 1:
                    about[name] = float(value)
            return strip_prefixes(loaded[key]), about
    keys = ", ".join(map(repr, list(loaded)[:10])) + (", ..." if len(loaded) > 10 else "")
    raise CheckpointError(f"{path} is a dict without weights: no state dict under {', '.join(STATE_DICT_KEYS)} "
                          f"and not a state dict itself (its keys: {keys})")


def listed(names: list[str]) -> str:
    shown = "; ".join(names[:SHOWN])
    return shown + (f"; ... and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """``load_state_dict`` with every missing and unexpected key and mismatched shape named on failure."""
    expected = model.state_dict()
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    # BatchNorm's step counter: absent from files of old PyTorch versions, unused in eval.
    state_dict = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state_dict}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (file {list(state_dict[k].shape)}, model {list(v.shape)})"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict)
        return
    problems = [f"{len(names)} {kind}: {listed(names)}" for kind, names in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if names]
    hint = ""
    if not (missing or unexpected):
        hint = ("\nSame architecture, other sizes: the file was trained for another number of classes or input "
                "channels than the dataset's")
    else:
        fits = [name for name in models.names() if name != what.split()[0] and given ==
                {k for k in models.create(name, 10).state_dict() if not k.endswith("num_batches_tracked")}]
        if fits:
            hint = f"\nIts keys are those of {' or '.join(fits)}: try --model {fits[0]}"
    raise CheckpointError(f"{path} does not fit {what}:\n  " + "\n  ".join(problems) + hint)


def register(model: nn.Module, spec: dict[str, Any], image_shape: tuple[int, ...], name: str) -> tuple[str, str]:
    """Log the teacher as `stkd teacher` logs its model (our checkpoint file beside it) and register it."""
    info = tracking.log_model({"model": spec, "student": model.state_dict()}, image_shape, name)
    return str(info.registered_model_version), info.model_uri


def import_teacher(path: str | Path, model_name: str, data: str | Path, register_as: str | None = None,
                   experiment: str = "stkd", uri: str | None = None) -> Imported:
    """Load ``path`` into the zoo's ``model_name``, measure it on ``data``'s test split, register it."""
    from pipeline.data.dataset import PreparedDataset

    path = Path(path).expanduser().resolve()
    if model_name not in models.names():
        raise CheckpointError(f"--model: unknown model {model_name!r}; known: {', '.join(models.names())}")
    dataset = PreparedDataset.open(data, verify=True)
    state_dict, about = read(path)
    spec = checkpoint.model_spec(model_name, dataset.num_classes, dataset.image_shape[2])
    model = checkpoint.build_model(spec)
    load_into(model, state_dict, f"{model_name} for {dataset.num_classes} classes and {spec['in_channels']} "
                                 f"channel(s) ({dataset.name})", path)
    images, labels = dataset.load_numpy("test")
    top1 = teachers.accuracy(model, images, labels, dataset.mean, dataset.std)
    log.info("%s (%s) as %s: test top-1 %.2f%% on %s", path, about["format"], model_name, top1, dataset.name)
    name = register_as or f"teacher-{dataset.name}-{model_name}"
    uri = uri or tracking.tracking_uri()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = {"imported_from": str(path), "imported_sha256": digest, "imported_format": about["format"],
              **{f"imported_{k}": f"{v:g}" for k, v in about.items() if k != "format"}}
    params = {"model.student": model_name, "data.path": str(Path(data).resolve()), **source}
    tags = {"method": "import", "student": model_name, "dataset": str(Path(data).resolve())}
    with tracking.tracked_run(uri, experiment, f"import-{model_name}-{uuid.uuid4().hex[:4]}", params, tags) as run_id:
        tracking.log_metrics(uri, run_id, {"final/test_top1_selected": top1}, step=0)
        version, model_uri = register(model, spec, dataset.image_shape, name)
        champion = teachers.record_version(name, version, top1, uri, {
            "imported_sha256": digest, teachers.DATA_TAG: tracking.dataset_digest(dataset.manifest)})
    return Imported(name=name, version=version, test_top1=top1, champion=champion, run_id=run_id,
                    model_uri=model_uri)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.config import DEFAULTS

    parser.add_argument("path", metavar="PATH", help="RepDistiller/mdistiller checkpoint (e.g. "
                        "resnet56_vanilla/ckpt_epoch_240.pth) or a plain state dict")
    parser.add_argument("--model", required=True, help=f"zoo architecture ({', '.join(models.names())})")
    parser.add_argument("--data", required=True, metavar="PREPARED_DATASET",
                        help="prepared dataset (`stkd prepare`) whose test split measures the teacher")
    parser.add_argument("--register-as", metavar="NAME", help="registered model name "
                        "(default teacher-<dataset>-<model>, the name `stkd teacher` would give)")
    parser.add_argument("--experiment", default=DEFAULTS["mlflow"]["experiment"],
                        help="MLflow experiment of the import run (default %(default)s)")


def run_cli(args: argparse.Namespace) -> int:
    imported = import_teacher(args.path, args.model, args.data, args.register_as, args.experiment)
    aliases = ("champion, latest" if imported.champion == imported.version
               else f"latest (champion stays version {imported.champion})")
    print(f"registered {imported.name} version {imported.version}: test top-1 {imported.test_top1:.2f}%, "
          f"aliases {aliases}")
    print(f"use it: stkd distill --recipe ... teacher.source={imported.name}")
    return 0
