"""Teachers: found by registered name, MLflow URI or checkpoint path; shared through Ray's object store.

The driver loads a teacher once and ``ray.put``s its weights as NumPy arrays once per job or sweep.
Workers rebuild it from the shared arrays without copying them (``torch.from_numpy`` +
``load_state_dict(assign=True)``): on one node every worker's teacher reads the same buffer.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline import tracking
from pipeline.train import checkpoint
from stkd.methods import freeze

log = logging.getLogger(__name__)

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")

CHAMPION = "champion"  # the registered version with the best test accuracy; moved by `record_version`
LATEST = "latest"  # MLflow's own alias for the newest version: reserved, never set by hand
ACCURACY_TAG = "test_top1"  # on each registered version: its test top-1 (%), what `champion` is chosen by
DATA_TAG = "test_data"  # the digest (tracking.dataset_digest) of the dataset whose test split gave test_top1
ACCURACY_DIGITS = 4  # the tag's decimals; a new version is compared at this rounding too, so ties stay ties

REGISTERED = re.compile(r"(?:models:/)?([\w.\-]+)(?:/(\d+)|@([\w\-]+))?")


LOGGED_MODEL = re.compile(r"models:/m-[0-9a-f]{32}")


PATH_PREFIXES = (".", "~", "/")  # a source starting so is a path, never a registered name


def is_path(source: str) -> bool:
    """``source`` is a path (by its prefix) or an existing file or folder: no registry lookup needed."""
    from pathlib import Path

    return source.startswith(PATH_PREFIXES) or Path(source).expanduser().exists()


def resolve_uri(source: str, tracking_uri: str) -> str:
    """A registered name as a ``models:/name/<version>`` URI (looked up in the registry of the store at
    ``tracking_uri``); other URIs and paths unchanged.

    ``name/3`` is version 3; ``name@alias`` (or ``models:/name@alias``) the version the alias points
    to now; a bare ``name`` resolves through ``champion``, else MLflow's ``latest``. Aliases are
    resolved to their version here, so a run records the exact teacher it used even if an alias
    later moves.
    """
    if source.startswith(URI_SCHEMES) and not source.startswith("models:/") or source.startswith(PATH_PREFIXES):
        return source
    if LOGGED_MODEL.fullmatch(source):  # MLflow 3's logged model (models:/m-<id>): one model, no registry
        return source
    match = REGISTERED.fullmatch(source)
    if match is None:
        return source
    name, version, alias = match.groups()
    if version:
        return f"models:/{name}/{version}"
    from mlflow.exceptions import MlflowException

    client = tracking.client(tracking_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        if alias or source.startswith("models:/"):
            raise checkpoint.CheckpointError(f"no registered model {name!r} in {tracking_uri}") from None
        return source  # not a registered model; maybe a relative path
    if alias is None:
        alias = CHAMPION if CHAMPION in registered.aliases else LATEST
        how = "its champion" if alias == CHAMPION else "no champion alias, so its latest version"
    else:
        how = f"alias {alias}"
    try:
        resolved = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        known = ", ".join(sorted(registered.aliases)) or "none"
        raise checkpoint.CheckpointError(f"registered model {name!r} has no version under alias {alias!r} "
                                         f"(its aliases: {known}; `latest` once it has a version)") from None
    top1 = resolved.tags.get(ACCURACY_TAG)
    log.info("teacher %s: %s -> version %s (test top-1 %s)", source, how, resolved.version,
             f"{float(top1):.2f}%" if top1 else "not recorded")
    return f"models:/{name}/{resolved.version}"


def record_version(name: str, version: str | int, test_top1: float, tracking_uri: str,
                   tags: dict[str, str] | None = None) -> str:
    """Tag a newly registered version with its test accuracy and make it ``champion`` if it beats the
    current champion's (or there is none). Returns the version ``champion`` points to now.

    ``latest`` needs nothing: MLflow resolves that alias to the newest version itself.
    """
    client = tracking.client(tracking_uri)
    version = str(version)
    # The champion's accuracy is read back from its tag, so the newcomer is compared at the tag's
    # rounding: an unrounded 78.33333 against a stored "78.3333" would win a tie.
    test_top1 = round(test_top1, ACCURACY_DIGITS)
    for key, value in {ACCURACY_TAG: f"{test_top1:.{ACCURACY_DIGITS}f}", **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, str(value))
    current = client.get_registered_model(name).aliases.get(CHAMPION)
    current = None if current is None else str(current)  # an int from the SQL store
    if current == version:
        return current
    if current is not None:
        best = client.get_model_version(name, current).tags.get(ACCURACY_TAG)
        if best is None:
            # Set by hand (no accuracy recorded): a person's choice, kept.
            log.warning("%s version %s: champion is version %s, which records no %s; left as it is",
                        name, version, current, ACCURACY_TAG)
            return current
        if test_top1 <= float(best):
            log.info("%s version %s: test top-1 %.2f%%, not above champion version %s (%.2f%%); champion kept",
                     name, version, test_top1, current, float(best))
            return current
        log.info("%s version %s: test top-1 %.2f%% beats champion version %s (%.2f%%); now champion",
                 name, version, test_top1, current, float(best))
    else:
        log.info("%s version %s: test top-1 %.2f%%, the first champion", name, version, test_top1)
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def recorded_accuracy(uri: str, data_digest: str, tracking_uri: str) -> float | None:
    """The test top-1 recorded on registered version ``uri`` (``models:/name/N``) when it was measured on
    the dataset with ``data_digest``; None for anything else (a path, another dataset, no record)."""
    match = re.fullmatch(r"models:/([\w.\-]+)/(\d+)", uri)
    if match is None:
        return None
    tags = tracking.client(tracking_uri).get_model_version(*match.groups()).tags
    if tags.get(DATA_TAG) != data_digest or ACCURACY_TAG not in tags:
        return None
    return float(tags[ACCURACY_TAG])


def fetch(source: str, tracking_uri: str) -> tuple[dict[str, Any], str]:
    """Load the teacher checkpoint named by ``source`` (a registered name or ``models:/`` URI from the store
    at ``tracking_uri``); returns ``(state, resolved_uri)``."""
    from pathlib import Path

    uri = resolve_uri(source, tracking_uri)
    if Path(uri).expanduser().exists():
        return checkpoint.load(Path(uri).expanduser()), str(Path(uri).expanduser().resolve())
    if uri.startswith(URI_SCHEMES):
        import mlflow

        with tracking.using(tracking_uri):  # models:/ is resolved in MLflow's process-wide registry
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        return checkpoint.load(local), uri
    raise checkpoint.CheckpointError(
        f"teacher {source!r} is neither a file, a checkpoint directory, an MLflow URI, nor a registered model")


def to_arrays(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """State dict as NumPy arrays: Ray stores these zero-copy in shared memory."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state_dict.items()}


def build(spec: dict[str, Any], arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> nn.Module:
    """A frozen teacher whose CPU tensors are views of ``arrays`` (the object store's buffers).

    The arrays Ray returns are read-only; the teacher never writes to its weights (frozen,
    eval mode), so the non-writable warning from ``torch.from_numpy`` is expected and silenced.
    """
    import warnings

    # Built on the CPU, not the meta device: the first meta-device build in a process imports ~800
    # torch modules (~68 MiB private per worker, bench/teacher_memory.py), more than a small teacher;
    # the freshly initialised weights are released by the assignment below.
    model = checkpoint.build_model(spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    model.load_state_dict(tensors, assign=True)
    model = freeze(model)
    return model.to(device)


def holding(model: nn.Module, arrays: dict[str, np.ndarray]) -> str:
    """How ``model`` holds the shared weights ``arrays``: ``zero-copy`` when every tensor is a view of its
    array in the object store, else how many are copies (moved to a GPU, or reordered to channels_last)."""
    state = model.state_dict()
    copied = [k for k, t in state.items() if t.data_ptr() != arrays[k].ctypes.data]
    return "zero-copy" if not copied else f"copied ({len(copied)} of {len(state)} tensors)"


def put(state: dict[str, Any]):
    """``ray.put`` the teacher once: ``(spec, arrays)``; returns the ObjectRef every worker shares."""
    import ray

    return ray.put({"spec": state["model"], "arrays": to_arrays(state["student"])})


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean, std, batch_size: int = 512) -> float:
    """Top-1 test accuracy (%) of ``model`` on uint8 NHWC ``images``, on the CPU, in fp32: the same
    precision policy as the students' evaluation (``stkd.training.eval_logits``)."""
    from stkd.augment import nhwc_to_nchw, normalize
    from stkd.training import eval_logits

    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalize(nhwc_to_nchw(torch.from_numpy(images[start:start + batch_size])), mean, std)
            pred = eval_logits(model, x).argmax(1)
            correct += int((pred == torch.from_numpy(labels[start:start + batch_size])).sum())
    return 100.0 * correct / max(len(images), 1)
