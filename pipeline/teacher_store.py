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

from pipeline import checkpoint
from stkd.methods import freeze

log = logging.getLogger(__name__)

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")


def resolve_uri(source: str) -> str:
    """A registered name (``name``, ``name/3``, ``name@alias``) as a ``models:/`` URI; URIs and paths unchanged."""
    if source.startswith(URI_SCHEMES) or "/" in source.rstrip("/").split("/")[0] or source.startswith((".", "~")):
        return source
    import mlflow

    match = re.fullmatch(r"([\w.\-]+)(?:/(\d+)|@([\w\-]+))?", source)
    if match is None:
        return source
    name, version, alias = match.groups()
    if version or alias:
        return f"models:/{name}/{version}" if version else f"models:/{name}@{alias}"
    versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    if not versions:
        return source  # not a registered model; maybe a relative path
    latest = max(int(v.version) for v in versions)
    return f"models:/{name}/{latest}"


def fetch(source: str) -> tuple[dict[str, Any], str]:
    """Load the teacher checkpoint named by ``source``; returns ``(state, resolved_uri)``."""
    from pathlib import Path

    uri = resolve_uri(source)
    if Path(uri).expanduser().exists():
        return checkpoint.load(Path(uri).expanduser()), str(Path(uri).expanduser().resolve())
    if uri.startswith(URI_SCHEMES):
        import mlflow

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
