"""The project's model files: an architecture spec beside a state dict, loaded with ``weights_only=True``.

A training checkpoint is a directory holding ``checkpoint.pt``: ``{"model": spec, "student":
state_dict, ...}`` with optimizer, scheduler, epoch, RNG states and best accuracy. An MLflow model
logged by the trainer carries the same file under ``extra_files/``.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stkd import models

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this project, or one that cannot be read."""


def model_spec(name: str, num_classes: int, in_channels: int) -> dict[str, Any]:
    return {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels)}


def build_model(spec: dict[str, Any]) -> nn.Module:
    return models.create(spec["name"], spec["num_classes"], in_channels=spec["in_channels"])


def save(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` (must hold ``model`` spec and ``student`` state dict) as ``directory/checkpoint.pt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def find_file(path: str | Path) -> Path:
    """The checkpoint file for a file, a checkpoint directory, or an MLflow model directory."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / CHECKPOINT_FILE, path / "extra_files" / CHECKPOINT_FILE):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no checkpoint at {path}: expected a {CHECKPOINT_FILE} file, a directory holding one, "
                          "or an MLflow model logged by `stkd teacher`")


def safe_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``, its failures turned into a sentence about the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    try:
        # RepDistiller's `<model>_last.pth` also holds its argparse options: plain data, safe to allow.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        needs = next((line.split("Unsupported global:")[1].split(" was not")[0].strip()
                      for line in lines if "Unsupported global:" in line), None)
        if needs:
            raise CheckpointError(
                f"{path} holds pickled Python code ({needs}), which torch.load(weights_only=True) refuses: loading "
                "it would run code from the file. If you trust it, save only its weights where it was written "
                "(torch.save(ckpt['model'], 'weights.pth')) and use that") from None
        # The unpickler's own reason follows its "WeightsUnpickler error:" line.
        reason = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.endswith("WeightsUnpickler error:")),
                      lines[-1] if lines else "unreadable")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.load: {reason})") from None
    except Exception as e:  # a parser fed an arbitrary file fails in arbitrary ways (KeyError, struct.error ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.load: {type(e).__name__} {first_line})"
                              ) from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything else is refused with a clear error."""
    file = find_file(path)
    state = safe_load(file, map_location)
    if not isinstance(state, dict) or "model" not in state or "student" not in state:
        raise CheckpointError(f"{file} is a torch file but not a checkpoint of this project "
                              "(missing 'model' spec or 'student' weights)")
    return state
