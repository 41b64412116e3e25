"""Search spaces as YAML data, validated on load; turned into Ray Tune distributions.

A space file::

    method: stkd                       # the method every trial trains
    metric: val/top1                   # optional (the default), reported per epoch; maximised
    parameters:
      method.temperature: {distribution: loguniform, low: 1.0, high: 10.0}
      method.teacher_target: {distribution: choice, values: [mixed_input, mixed_output]}
      optim.lr: {distribution: grid, values: [0.01, 0.05]}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline import ROOT, config as config_lib
from stkd import methods

SPACES_DIR = ROOT / "tune_spaces"
DISTRIBUTIONS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "randint": ("low", "high"),
                 "choice": ("values",), "grid": ("values",)}
# Config keys outside the method that a sweep may search.
OPTIM_KEYS = {"optim.lr", "optim.weight_decay", "optim.momentum", "optim.batch_size"}
POSITIVE = {"optim.lr", "optim.batch_size"}  # a method's own bounds: stkd.methods.check_hparam
NON_NEGATIVE = {"optim.weight_decay", "optim.momentum"}

class SpaceError(ValueError):
    """A search space file is invalid; the message names the file and the key."""

def find_space(name_or_path: str | Path) -> Path:
    found = config_lib.find_shipped(name_or_path, SPACES_DIR)
    if found is None:
        raise SpaceError(f"search space {str(name_or_path)!r} not found (shipped: "
                         f"{config_lib.shipped_names(SPACES_DIR)})")
    return found

def load_space(name_or_path: str | Path) -> dict[str, Any]:
    """Read and validate a space; returns ``{"file", "method", "metric", "parameters"}``."""
    path = find_space(name_or_path)
    where = str(path)
    data = config_lib.read_mapping(path, SpaceError, "'method' and 'parameters'")
    unknown = set(data) - {"method", "metric", "parameters", "description"}
    if unknown:
        raise SpaceError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                         "expected method, metric, parameters, description")
    method = data.get("method")
    if method not in methods.REGISTRY:
        raise SpaceError(f"{where}: method: unknown method {method!r}; known: {', '.join(methods.names())}")
    parameters = data.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SpaceError(f"{where}: parameters: expected a non-empty mapping of key -> distribution")
    takes = {f"method.{k}" for k in methods.hparam_defaults(method)}
    for key, spec in parameters.items():
        check_parameter(where, method, key, spec, takes)
    metric = data.get("metric", "val/top1")
    if not isinstance(metric, str) or not metric.startswith("val/"):
        raise SpaceError(f"{where}: metric: trials are compared on the validation split (val/top1, val/top5), "
                         f"never on test; got {metric!r}")
    return {"file": where, "method": method, "metric": metric, "parameters": parameters}

def check_parameter(where: str, method: str, key: str, spec: Any, takes: set[str]) -> None:
    if key not in takes | OPTIM_KEYS:
        allowed = ", ".join(sorted(takes | OPTIM_KEYS))
        raise SpaceError(f"{where}: {key}: method {method!r} does not take this parameter (searchable: {allowed})")
    if not isinstance(spec, dict) or spec.get("distribution") not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: {key}: expected {{distribution: one of {sorted(DISTRIBUTIONS)}, ...}}, "
                         f"got {spec!r}")
    dist = spec["distribution"]
    needed = DISTRIBUTIONS[dist]
    extra = set(spec) - set(needed) - {"distribution"}
    if extra or any(k not in spec for k in needed):
        raise SpaceError(f"{where}: {key}: distribution {dist!r} takes exactly {list(needed)}, got {sorted(spec)}")
    if "values" in needed:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: {key}: 'values' must be a non-empty list, got {values!r}")
        allowed = values
        bound_values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    else:
        low, high = spec["low"], spec["high"]
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SpaceError(f"{where}: {key}: {name} must be a number, got {v!r}")
        if low >= high:
            raise SpaceError(f"{where}: {key}: empty range, low ({low}) must be < high ({high})")
        if dist == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: {key}: loguniform needs low > 0, got {low}")
        allowed = bound_values = [low, high]
    if key.startswith("method."):
        cls = methods.method_class(method)
        for value in allowed:
            try:
                methods.check_hparam(cls, key.removeprefix("method."), value)
            except ValueError as e:
                raise SpaceError(f"{where}: {key}: the space allows {value!r}, but {e}") from None
    if key in POSITIVE and any(v <= 0 for v in bound_values):
        raise SpaceError(f"{where}: {key}: must be > 0, but the space allows {min(bound_values)}")
    if key in NON_NEGATIVE and any(v < 0 for v in bound_values):
        raise SpaceError(f"{where}: {key}: must be >= 0, but the space allows {min(bound_values)}")

def to_tune(parameters: dict[str, Any]) -> dict[str, Any]:
    """The Tune param_space: one flat key per dotted config key."""
    from ray import tune

    out = {}
    for key, spec in parameters.items():
        dist = spec["distribution"]
        if dist == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        elif dist == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        elif dist == "randint":
            out[key] = tune.randint(spec["low"], spec["high"])
        elif dist == "choice":
            out[key] = tune.choice(spec["values"])
        else:
            out[key] = tune.grid_search(spec["values"])
    return out

def trial_count(parameters: dict[str, Any], samples: int) -> int:
    """Trials a sweep runs: Tune samples every grid point ``samples`` times."""
    return samples * math.prod(len(spec["values"]) for spec in parameters.values() if spec["distribution"] == "grid")


def apply(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's config: the base config with the sampled dotted keys set, validated."""
    return config_lib.validate(config_lib.merge(base, config_lib.nest(params)))
