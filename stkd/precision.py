"""Training precision by hardware: bf16 where the chip runs it natively, fp16 with loss scaling on older
GPUs, fp32 otherwise; channels_last where it pays.

Autocast is a training-speed setting only: evaluation always runs in fp32 (``stkd.training.eval_logits``).
The resolvers take the device's facts as arguments (CUDA compute capability, whether the CPU has native
bf16), so every device kind is testable on any machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CUDA_CAPABILITY = (8, 0)  # Ampere: the first CUDA generation with bf16 tensor cores


class PrecisionError(ValueError):
    """The requested precision cannot run on this device; the message names the device."""


def cpu_capabilities() -> dict[str, Any]:
    """What the CPU can do, as torch's ``torch.cpu.get_capabilities()`` reports it; a torch without that
    function (older releases, e.g. the GPU machine's) gets the bf16 flags and the model name from
    ``/proc/cpuinfo`` (Linux), else nothing."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return {**{flag: True for flag in flags if "bf16" in flag}, "cpu_name": name}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extensions).

    Without it oneDNN emulates bf16 through fp32 conversions, slower than plain fp32.
    """
    return any(value is True for key, value in cpu_capabilities().items() if "bf16" in key)


def cpu_name() -> str:
    return str(cpu_capabilities().get("cpu_name") or "this CPU")


def device_description(device: torch.device) -> str:
    """The device as a person names it: ``NVIDIA H200 (cuda:0, compute capability 9.0)``, ``Intel Xeon (cpu)``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} ({device}, compute capability {major}.{minor})"
    if device.type == "cpu":
        return f"{cpu_name()} (cpu)"
    return str(device)


def resolve_precision(requested: str, device_type: str, cuda_capability: tuple[int, int] | None = None,
                      cpu_native_bf16: bool = False, device_name: str | None = None) -> str:
    """``auto``: bf16 on CUDA capability >= 8.0 and on CPUs with native bf16, fp16 (with a GradScaler) on
    older CUDA devices, fp32 elsewhere. An explicit choice the device cannot run raises PrecisionError."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
    name = device_name or device_type
    if device_type == "cuda":
        if cuda_capability is None:
            raise ValueError("a CUDA device needs its compute capability")
        native_bf16 = tuple(cuda_capability) >= BF16_CUDA_CAPABILITY
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            raise PrecisionError(f"train.precision: bf16 needs compute capability 8.0 or newer, and {name} has "
                                 f"{cuda_capability[0]}.{cuda_capability[1]}; use fp16 (with loss scaling) or auto")
        return requested
    if device_type == "cpu":
        if requested == "auto":
            return "bf16" if cpu_native_bf16 else "fp32"
        if requested == "fp16":
            raise PrecisionError(f"train.precision: fp16 trains on CUDA devices only (with loss scaling), not on "
                                 f"{name}; use auto, bf16 or fp32")
        if requested == "bf16" and not cpu_native_bf16:
            raise PrecisionError(f"train.precision: {name} has no native bf16 (AVX512-BF16 or AMX), where bf16 "
                                 "is emulated and slower than fp32; use auto or fp32")
        return requested
    return "fp32" if requested == "auto" else requested


def resolve_channels_last(requested: bool | str, device_type: str, precision: str) -> bool:
    """``auto``: on for CUDA, and on the CPU when training in bf16 (oneDNN's bf16 convolutions are fastest
    in NHWC; bench/method_cost.py measures it). An explicit true or false is kept."""
    if requested != "auto":
        return bool(requested)
    return device_type == "cuda" or (device_type == "cpu" and precision == "bf16")


@dataclass
class Precision:
    """What a worker trains with: the resolved precision, its autocast, and a GradScaler for fp16."""

    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, name: str, device_type: str) -> "Precision":
        scaler = torch.amp.GradScaler(device_type) if name == "fp16" else None
        return cls(name, device_type, scaler)

    def autocast(self) -> ContextManager:
        """The forward pass's autocast region (a no-op in fp32); pass the bound method as a factory."""
        if self.name in DTYPES:
            return torch.autocast(self.device_type, dtype=DTYPES[self.name])
        return contextlib.nullcontext()


def resolve_for_device(requested: str, device: torch.device) -> str:
    """:func:`resolve_precision` with the facts read from ``device`` itself."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_precision(requested, device.type, capability,
                             cpu_native_bf16=device.type == "cpu" and cpu_has_native_bf16(),
                             device_name=device_description(device))
