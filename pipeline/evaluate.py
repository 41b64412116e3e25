"""`stkd eval MODEL --data PREPARED`: measure any model the pipeline can load, and log it as an MLflow run.

Training reports top-1 only; choosing and trusting a teacher (or judging what distillation did to a
student) also needs top-5, per-class accuracy and calibration (ECE, NLL), measured the same way every time:
on the CPU, in fp32 (``stkd.training.eval_logits``, the project's one precision policy), on a prepared
split: ``test``, or ``val`` carved from train exactly as training carves it (:mod:`pipeline.data.val_split`,
the same fraction and seed give the same rows), so a model's validation figures can be checked afterwards.

MODEL is anything ``teacher.source`` takes (registered name, ``name/3``, ``name@alias``, ``models:/``,
``runs:/``, a checkpoint path), loaded by :func:`pipeline.train.teachers.fetch`; or, with ``--arch``, a
published RepDistiller/mdistiller checkpoint or plain state dict, read by :mod:`pipeline.import_teacher`.

The evaluation run is linked to what it measured: tags ``eval.model_uri`` and ``eval.source_run_id`` (the
run that produced the model, where one is known), and a registered version gets the tag
``eval.<split>.run_id`` naming the evaluation run. The MLflow client is given the tracking URI explicitly;
the process-wide tracking URI is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline import tracking
from pipeline.data import val_split
from pipeline.train import checkpoint, teachers
from pipeline.train.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.data.dataset import PreparedDataset
from stkd.calibration import DEFAULT_BINS, calibration_bins, ece_from_bins, negative_log_likelihood

log = logging.getLogger(__name__)

SPLITS = ("test", "val")
TOP_K = 5
SHOWN_CLASSES = 20  # the console lists every class up to this many; beyond, the worst ones (the CSV has all)
METRIC_KEY_UNSAFE = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in a metric name


@dataclass
class Evaluation:
    """What `stkd eval` measured; accuracies in percent, ECE a fraction in [0, 1], NLL in nats."""

    source: str  # what the user named
    model_uri: str  # what it resolved to (a registered version, a URI, an absolute path)
    spec: dict[str, Any]
    dataset: str  # its name
    data_path: str
    data_digest: str  # tracking.dataset_digest: which content was measured
    split: str
    rows: int
    top1: float
    top5: float
    ece: float
    nll: float
    classes: list[str]
    class_rows: np.ndarray  # images per true class
    class_correct: np.ndarray  # of them predicted right
    confusion: np.ndarray  # [true, predicted] counts
    bins: np.ndarray  # calibration_bins: (bins, 3) count, confidence sum, correct
    wall_s: float = 0.0
    links: dict[str, str] = field(default_factory=dict)  # source_run_id, model_name, model_version

    @property
    def class_top1(self) -> np.ndarray:
        return 100.0 * self.class_correct / np.maximum(self.class_rows, 1)


# --- what is measured --------------------------------------------------------------------------------


def split_arrays(dataset: PreparedDataset, split: str, val_fraction: float = 0.1,
                 val_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of ``split``: ``test`` as prepared; ``val`` the rows training holds out of
    train with ``data.val_fraction`` / ``data.val_seed`` equal to these (the same :func:`val_split.carve`)."""
    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r} is not a split `stkd eval` measures; choose {' or '.join(SPLITS)}")
    if split == "test":
        return dataset.load_numpy("test")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction: must be in (0, 1) for --split val, got {val_fraction}")
    images, labels = dataset.load_numpy("train")
    try:
        carved = val_split.carve(images, labels, val_fraction, val_seed, dataset.classes)
    except ValueError as e:
        raise ConfigError(str(e).replace("data.val_fraction=", "--val-fraction ")) from None
    return images[carved.positions], labels[carved.positions]


def load_model(source: str, dataset: PreparedDataset, arch: str | None, tracking_uri: str
               ) -> tuple[nn.Module, dict, str]:
    """``(model in eval mode on the CPU, its spec, the resolved URI or path)``; refuses a model that does
    not fit ``dataset``'s classes and channels. A registered name is looked up in the store at
    ``tracking_uri``."""
    from mlflow.exceptions import MlflowException

    if arch:  # a file of the literature: the reading and the key checks of `stkd import-teacher`
        from pipeline import import_teacher
        from stkd import models

        if arch not in models.names():
            raise CheckpointError(f"--arch: unknown architecture {arch!r}; known: {', '.join(models.names())}")
        path = Path(source).expanduser().resolve()
        state_dict, about = import_teacher.read(path)
        spec = checkpoint.model_spec(arch, dataset.num_classes, dataset.image_shape[2])
        model = checkpoint.build_model(spec)
        import_teacher.load_into(model, state_dict, f"{arch} for {dataset.num_classes} classes and "
                                 f"{spec['in_channels']} channel(s) ({dataset.name})", path)
        log.info("%s (%s) read as %s", path, about["format"], arch)
        return model.eval(), spec, str(path)
    try:
        state, uri = teachers.fetch(source, tracking_uri)
    except CheckpointError as e:
        if Path(source).expanduser().is_file() and "not a checkpoint of this project" in str(e):
            raise CheckpointError(f"{e}; a RepDistiller/mdistiller checkpoint or a plain state dict needs "
                                  "--arch ARCH") from None
        raise
    except MlflowException as e:  # a version, run or artifact that is not there
        raise CheckpointError(f"model {source!r}: {tracking.first_line(e)}") from None
    spec = state["model"]
    if spec["num_classes"] != dataset.num_classes or spec["in_channels"] != dataset.image_shape[2]:
        raise ConfigError(f"model {uri} was trained for {spec['num_classes']} classes and {spec['in_channels']} "
                          f"channel(s); dataset {dataset.root} has {dataset.num_classes} classes and "
                          f"{dataset.image_shape[2]} channel(s)")
    model = checkpoint.build_model(spec)
    model.load_state_dict(state["student"])
    return model.eval(), spec, uri


def predict(model: nn.Module, images: np.ndarray, mean, std, batch_size: int = 512) -> torch.Tensor:
    """float32 logits of uint8 NHWC ``images``, on the CPU, autocast off: as ``teachers.accuracy``."""
    from stkd.augment import nhwc_to_nchw, normalize
    from stkd.training import eval_logits

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalize(nhwc_to_nchw(torch.from_numpy(images[start:start + batch_size])), mean, std)
            out.append(eval_logits(model, x))
    return torch.cat(out) if out else torch.empty(0, 0)


def summarize(logits: torch.Tensor, labels: np.ndarray, classes: list[str], bins: int = DEFAULT_BINS
              ) -> dict[str, Any]:
    """Top-1 and top-k (%), per-class counts, confusion matrix, calibration bins, ECE and NLL."""
    target = torch.from_numpy(labels).long()
    n, c = len(target), len(classes)
    prediction = logits.argmax(1)
    k = min(TOP_K, c)
    in_top_k = (logits.topk(k, dim=1).indices == target[:, None]).any(1)
    confusion = torch.bincount(target * c + prediction, minlength=c * c).reshape(c, c).numpy()
    calibration = calibration_bins(logits, target, bins)
    return {"top1": 100.0 * float((prediction == target).sum()) / n, "top5": 100.0 * float(in_top_k.sum()) / n,
            "ece": ece_from_bins(calibration), "nll": negative_log_likelihood(logits, target),
            "class_rows": confusion.sum(1), "class_correct": np.diag(confusion).copy(), "confusion": confusion,
            "bins": calibration.numpy()}


def evaluate(source: str, data: str | Path, split: str = "test", batch_size: int = 512, val_fraction: float = 0.1,
             val_seed: int = 0, arch: str | None = None, tracking_uri: str | None = None) -> Evaluation:
    """Load ``source`` (a registered name from the store at ``tracking_uri``, by default
    :func:`tracking.tracking_uri`'s), measure it on ``data``'s ``split``; nothing logged (see
    :func:`log_evaluation`)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    start = time.perf_counter()
    dataset = PreparedDataset.open(data, verify=True)
    images, labels = split_arrays(dataset, split, val_fraction, val_seed)
    if len(labels) == 0:
        raise ConfigError(f"{dataset.root}: the {split} split has no images")
    model, spec, uri = load_model(source, dataset, arch, tracking_uri or tracking.tracking_uri())
    logits = predict(model, images, dataset.mean, dataset.std, batch_size)
    measured = summarize(logits, labels, dataset.classes)
    return Evaluation(source=source, model_uri=uri, spec=spec, dataset=dataset.name, data_path=str(dataset.root),
                      data_digest=tracking.dataset_digest(dataset.manifest), split=split, rows=len(labels),
                      classes=list(dataset.classes), wall_s=time.perf_counter() - start, **measured)


# --- what links the evaluation to the model ---------------------------------------------------------


def links_of(model_uri: str, client) -> dict[str, str]:
    """The run that produced the model and, for a registered version, its name and version."""
    registered = re.fullmatch(r"models:/([\w.\-]+)/(\d+)", model_uri)
    if registered:
        version = client.get_model_version(registered[1], registered[2])
        return {"source_run_id": version.run_id or "", "model_name": registered[1], "model_version": registered[2]}
    logged = teachers.LOGGED_MODEL.fullmatch(model_uri)
    if logged:
        return {"source_run_id": client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id or ""}
    run = re.match(r"runs:/([0-9a-f]+)/", model_uri)
    if run:
        return {"source_run_id": run[1]}
    path = Path(model_uri)
    if path.exists():  # a training checkpoint: its run is in the record beside the final one
        from pipeline.tracking.outage import RUN_FILE, read_json

        file = checkpoint.find_file(path)
        for folder in (file.parent, file.parent.parent):
            record = read_json(folder / RUN_FILE)
            if record and record.get("run_id"):
                return {"source_run_id": record["run_id"]}
    return {}


def metric_names(classes: list[str]) -> list[str]:
    """``eval/class_top1/<class>``, with characters MLflow refuses replaced; prefixed by the class index
    when that would make two names equal."""
    safe = [METRIC_KEY_UNSAFE.sub("_", name) for name in classes]
    if len(set(safe)) < len(safe):
        safe = [f"{i}_{name}" for i, name in enumerate(safe)]
    return [f"eval/class_top1/{name}" for name in safe]


def log_evaluation(result: Evaluation, uri: str, experiment: str | None = None, params: dict[str, Any] | None = None
                   ) -> tuple[str, str]:
    """Log ``result`` as a FINISHED MLflow run (FAILED if logging breaks off); returns ``(run_id,
    experiment_id)``. Without ``experiment``, the run goes beside the model's own run (else ``stkd``)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    from pipeline.config import DEFAULTS

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    result.links = {k: v for k, v in links_of(result.model_uri, client).items() if v}
    source_run = result.links.get("source_run_id")
    experiment_id = None
    if experiment is None and source_run:
        try:
            experiment_id = client.get_run(source_run).info.experiment_id
        except MlflowException:  # a checkpoint's run in another store
            experiment_id = None
    if experiment_id is None:
        experiment_id = tracking.experiment_id(client, experiment or DEFAULTS["mlflow"]["experiment"])
    commit = tracking.git_commit()
    tags = {"method": "eval", "student": result.spec["name"], "dataset": result.dataset, "eval.split": result.split,
            "eval.model_uri": result.model_uri, "eval.model_source": result.source, "git_commit": commit,
            "mlflow.source.git.commit": commit, "torch_version": torch.__version__,
            **{f"eval.{k}": v for k, v in result.links.items()}}
    run_name = f"eval-{result.spec['name']}-{result.split}-{uuid.uuid4().hex[:4]}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    status = "FAILED"
    try:
        all_params = {"model.arch": result.spec["name"], "model.num_classes": result.spec["num_classes"],
                      "data.path": result.data_path, "data.name": result.dataset, "data.digest": result.data_digest,
                      "eval.split": result.split, "eval.rows": result.rows, "eval.ece_bins": len(result.bins),
                      "eval.precision": "fp32", "eval.device": "cpu", **(params or {})}
        now = int(time.time() * 1000)
        metrics = {"eval/top1": result.top1, "eval/top5": result.top5, "eval/ece": result.ece, "eval/nll": result.nll,
                   **dict(zip(metric_names(result.classes), map(float, result.class_top1)))}
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in all_params.items()])
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            client.log_batch(run_id, metrics=batch[start:start + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_artifacts(result, Path(tmp)):
                client.log_artifact(run_id, str(path))
        if "model_version" in result.links:
            name, version = result.links["model_name"], result.links["model_version"]
            client.set_model_version_tag(name, version, f"eval.{result.split}.run_id", run_id)
            client.set_model_version_tag(name, version, f"eval.{result.split}.ece", f"{result.ece:.4f}")
        client.log_batch(run_id, tags=[RunTag("eval.wall_s", f"{result.wall_s:.1f}")])
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id, experiment_id


# --- artifacts and console -------------------------------------------------------------------------


def write_artifacts(result: Evaluation, folder: Path) -> list[Path]:
    """per_class.csv, confusion_matrix.csv, calibration_bins.csv, confusion_matrix.png, reliability_diagram.png."""
    per_class = folder / "per_class.csv"
    with per_class.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_index", "class", "images", "correct", "top1_percent"])
        for i, name in enumerate(result.classes):
            writer.writerow([i, name, int(result.class_rows[i]), int(result.class_correct[i]),
                             f"{result.class_top1[i]:.4f}"])
    confusion = folder / "confusion_matrix.csv"
    with confusion.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *result.classes])
        for name, row in zip(result.classes, result.confusion):
            writer.writerow([name, *map(int, row)])
    bins = folder / "calibration_bins.csv"
    with bins.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["low", "high", "images", "mean_confidence", "accuracy"])
        n = len(result.bins)
        for b, (count, conf, correct) in enumerate(result.bins):
            writer.writerow([f"{b / n:.4f}", f"{(b + 1) / n:.4f}", int(count),
                             f"{conf / count:.6f}" if count else "", f"{correct / count:.6f}" if count else ""])
    return [per_class, confusion, bins, confusion_plot(result, folder / "confusion_matrix.png"),
            reliability_diagram(result, folder / "reliability_diagram.png")]


def title_of(result: Evaluation) -> str:
    return f"{result.spec['name']} ({result.model_uri}) on {result.dataset} {result.split}, {result.rows} images"


def confusion_plot(result: Evaluation, path: Path) -> Path:
    """Row-normalized confusion matrix (each true class sums to 1), counts written in when it is small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(result.classes)
    rates = result.confusion / np.maximum(result.confusion.sum(1, keepdims=True), 1)
    size = min(4 + 0.45 * c, 16)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if c <= 30:
        ax.set_xticks(range(c), result.classes, rotation=90 if c > 10 else 0)
        ax.set_yticks(range(c), result.classes)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if result.confusion[i, j]:
                    ax.text(j, i, int(result.confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix, top-1 {result.top1:.2f}%")
    fig.suptitle(title_of(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(result: Evaluation, path: Path) -> Path:
    """Accuracy against mean confidence per equal-width bin (the diagonal is perfect calibration), with
    the share of images per bin below: the ECE is the gap weighted by that share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.bins)
    count, conf, correct = result.bins[:, 0], result.bins[:, 1], result.bins[:, 2]
    filled = count > 0
    centers = (np.arange(n) + 0.5) / n
    accuracy = np.divide(correct, count, out=np.zeros(n), where=filled)
    confidence = np.divide(conf, count, out=np.zeros(n), where=filled)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers[filled], accuracy[filled], width=1 / n, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=1 / n,
           edgecolor="tab:red", color="tab:red", alpha=0.3, hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in the bin",
           title=f"ECE {result.ece:.4f} ({n} bins), NLL {result.nll:.4f}, top-1 {result.top1:.2f}%")
    ax.legend(loc="upper left")
    ax_n.bar(centers, count / max(count.sum(), 1), width=1 / n, edgecolor="black", color="grey")
    ax_n.set(xlabel="confidence (max softmax probability)", ylabel="share of images")
    fig.suptitle(title_of(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def class_table(result: Evaluation, width: int = 100) -> list[str]:
    """Per-class top-1 as cells ``class  top-1% (images)``, as many to a line as fit in ``width``; with
    more than SHOWN_CLASSES classes, the SHOWN_CLASSES worst (per_class.csv in the run lists all)."""
    order = list(range(len(result.classes)))
    header = "per-class top-1 % (images):"
    if len(order) > SHOWN_CLASSES:
        order = sorted(order, key=lambda i: (result.class_top1[i], i))[:SHOWN_CLASSES]
        header = (f"per-class top-1 % (images), the {SHOWN_CLASSES} lowest of {len(result.classes)} "
                  "(per_class.csv in the run lists all):")
    names = {i: result.classes[i][:24] for i in order}
    name_w = max(len(v) for v in names.values())
    count_w = len(str(int(result.class_rows.max())))
    cells = [f"{names[i]:<{name_w}} {result.class_top1[i]:6.2f} ({int(result.class_rows[i]):>{count_w}})"
             for i in order]
    per_line = max(1, (width - 2) // (len(cells[0]) + 3))
    return [header] + ["  " + "   ".join(cells[s:s + per_line]) for s in range(0, len(cells), per_line)]


def report(result: Evaluation) -> list[str]:
    k = min(TOP_K, len(result.classes))
    named = result.source if result.source == result.model_uri else f"{result.source} -> {result.model_uri}"
    return [f"{named}: {result.spec['name']}, {result.spec['num_classes']} classes",
            f"{result.dataset} {result.split} split, {result.rows} images, fp32 on the CPU, {result.wall_s:.1f} s",
            f"top-1 {result.top1:.2f}%   top-{k} {result.top5:.2f}%   ECE {result.ece:.4f} "
            f"({len(result.bins)} equal-width bins, fraction)   NLL {result.nll:.4f} nats",
            *class_table(result)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="registered name (its champion, else latest), name/version, "
                        "name@alias, models:/ or runs:/ URI, or checkpoint path (what teacher.source takes); with "
                        "--arch, a RepDistiller/mdistiller checkpoint or plain state dict")
    parser.add_argument("--data", required=True, metavar="PREPARED", help="prepared dataset (`stkd prepare`)")
    parser.add_argument("--split", default="test", metavar="{test,val}",
                        help="test, or val: the validation rows training holds out of train (default test)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="--split val: data.val_fraction of the training run (default %(default)s)")
    parser.add_argument("--val-seed", type=int, default=0,
                        help="--split val: data.val_seed of the training run (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default %(default)s)")
    parser.add_argument("--arch", help="zoo architecture of a file not in this project's format "
                                       "(as `stkd import-teacher --model`)")
    parser.add_argument("--experiment", help="MLflow experiment of the evaluation run (default: the model's "
                                             "own run's, else stkd)")


def run_cli(args: argparse.Namespace) -> int:
    uri = tracking.tracking_uri()
    result = evaluate(args.model, args.data, args.split, args.batch_size, args.val_fraction, args.val_seed, args.arch,
                      uri)
    print("\n".join(report(result)))
    params = {"eval.batch_size": args.batch_size,
              **({"eval.val_fraction": args.val_fraction, "eval.val_seed": args.val_seed}
                 if args.split == "val" else {})}
    run_id, experiment_id = log_evaluation(result, uri, args.experiment, params)
    linked = ", ".join(f"{k} {v}" for k, v in result.links.items()) or "no source run known"
    print(f"mlflow run {run_id} ({linked}): eval/top1, eval/top5, eval/ece, eval/nll, eval/class_top1/*; "
          "confusion_matrix.png, reliability_diagram.png")
    print(f"browse: {tracking.ui_hint(uri)}/#/experiments/{experiment_id}/runs/{run_id}")
    return 0
