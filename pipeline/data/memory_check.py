"""Will the split fit? Checked on the worker before ``data.in_memory`` loads it, so a run that cannot fit
stops at once with the numbers instead of an out-of-memory error halfway through loading or training.

What a worker needs with ``data.in_memory=true`` (see ``pipeline.train.worker_loop.make_feeds``):

- on its GPU: the whole train split (training and validation rows share one copy, carved by index) plus
  its part of the test split, labels and row indices included; and every trial that shares the GPU
  (``train.gpus_per_worker`` = 1/k puts up to k one-worker trials on one GPU) needs as much again, plus
  about 0.5 GiB of CUDA context per process;
- on its host: the train and test splits as decoded NumPy arrays while they load, with room for the
  Parquet reader's buffers (``HOST_PEAK_FACTOR``), for every worker and trial on the node; on a CPU
  worker the host *is* the device and the split stays there.

The arithmetic is pure (:func:`plan`, :func:`problems`); :func:`check_in_memory` reads the machine
(``torch.cuda.mem_get_info``, psutil or ``/proc/meminfo``) and raises :class:`InsufficientMemoryError`.
The model, optimizer and activations are not counted: the check catches the data that cannot fit, not
every out-of-memory error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2  # per process on a GPU: the CUDA context, cuDNN/cuBLAS handles and workspaces
# Host bytes per byte of split while it loads: the decoded arrays, one shard's Arrow table beside them, and
# the allocator's slack; the issue measured about 2x when the validation carve copied the split by boolean
# mask. Carving by index (make_feeds) lowers the real peak; the check keeps the margin.
HOST_PEAK_FACTOR = 2.0
LABEL_BYTES = 8  # int64
INDEX_BYTES = 8  # int64 row index on the device, one per train-split row


class InsufficientMemoryError(RuntimeError):
    """The in-memory split would not fit; the message gives the numbers and what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    device_split_bytes: int  # what one worker holds on its device
    host_split_bytes: int  # what one worker decodes on its host while loading
    trials_per_gpu: int  # processes (trials) that may share this worker's GPU
    workers_per_host: int  # this run's workers on this node
    cuda: bool

    @property
    def gpu_bytes(self) -> int:
        """What the trials sharing one GPU need together: their splits and CUDA contexts."""
        return self.trials_per_gpu * (self.device_split_bytes + CUDA_CONTEXT_BYTES)

    @property
    def host_bytes(self) -> int:
        """The host's peak while every worker and trial on it loads its split."""
        return math.ceil(self.workers_per_host * self.trials_per_gpu * HOST_PEAK_FACTOR * self.host_split_bytes)


def trials_per_gpu(gpus_per_worker: float, use_gpu: bool = True) -> int:
    """How many one-worker trials a fractional ``train.gpus_per_worker`` lets Ray put on one GPU (1/share)."""
    if not use_gpu or gpus_per_worker >= 1:
        return 1
    return max(1, math.floor(1 / gpus_per_worker + 1e-9))


def row_bytes(image_shape) -> int:
    return math.prod(int(x) for x in image_shape) + LABEL_BYTES


def plan(info: dict[str, Any], world: int, gpus_per_worker: float, cuda: bool,
         workers_per_host: int = 1) -> MemoryPlan:
    """The memory a worker of this run needs with ``data.in_memory=true``, from the driver's dataset summary
    (``train_rows`` after the validation carve, ``val_rows``, ``test_rows``, ``image_shape``)."""
    row = row_bytes(info["image_shape"])
    train_split = int(info["train_rows"]) + int(info.get("val_rows") or 0)  # training and validation rows
    test = int(info["test_rows"])
    device = train_split * (row + INDEX_BYTES) + math.ceil(test / max(world, 1)) * row
    host = (train_split + test) * row
    return MemoryPlan(device_split_bytes=device, host_split_bytes=host,
                      trials_per_gpu=trials_per_gpu(gpus_per_worker, cuda), workers_per_host=max(workers_per_host, 1),
                      cuda=cuda)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def problems(need: MemoryPlan, host_available: int, gpu_total: int | None = None,
             gpu_free: int | None = None) -> list[str]:
    """What does not fit, one sentence each with its numbers; empty when everything fits."""
    out = []
    fixes = ("set data.in_memory=false (stream the split from Parquet through Ray Data)"
             + (", or raise train.gpus_per_worker so that fewer trials share a GPU" if need.trials_per_gpu > 1
                else ""))
    if need.cuda and gpu_total is not None and need.gpu_bytes > gpu_total:
        share = f" x {need.trials_per_gpu} trials sharing the GPU" if need.trials_per_gpu > 1 else ""
        out.append(f"GPU memory: the in-memory split needs {gib(need.gpu_bytes)} = ({gib(need.device_split_bytes)} of "
                   f"data per worker + {gib(CUDA_CONTEXT_BYTES)} CUDA context){share}, and the GPU has "
                   f"{gib(gpu_total)} in all; {fixes}")
    if need.cuda and gpu_free is not None and need.device_split_bytes > gpu_free:
        out.append(f"GPU memory: the in-memory split needs {gib(need.device_split_bytes)} on this worker's GPU and "
                   f"{gib(gpu_free)} is free now (other processes hold the rest); {fixes}")
    if need.host_bytes > host_available:
        who = f"{need.workers_per_host} worker(s)"
        if need.trials_per_gpu > 1:
            who += f" x {need.trials_per_gpu} trials per GPU"
        out.append(f"host memory: loading the split needs about {gib(need.host_bytes)} at its peak "
                   f"({HOST_PEAK_FACTOR:g} x {gib(need.host_split_bytes)} per worker, {who} on this node), and "
                   f"{gib(host_available)} is available; {fixes}")
    return out


def check(need: MemoryPlan, host_available: int, gpu_total: int | None = None, gpu_free: int | None = None) -> None:
    found = problems(need, host_available, gpu_total, gpu_free)
    if found:
        raise InsufficientMemoryError("data.in_memory=true does not fit on this node:\n  - " + "\n  - ".join(found))


def host_available_bytes() -> int:
    """Memory the host can give without swapping: psutil's ``available``, else ``MemAvailable``."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with Ray
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise


def local_world_size() -> int:
    """This run's workers on this node (1 outside Ray Train)."""
    try:
        import ray.train

        return int(ray.train.get_context().get_local_world_size())
    except Exception:  # not in a Ray Train worker (unit tests, benchmarks)
        return 1


def check_in_memory(config: dict[str, Any], info: dict[str, Any], world: int, device) -> MemoryPlan:
    """Refuse, with the numbers, an in-memory split that this worker's GPU or host cannot hold."""
    import torch

    train = config["train"]
    cuda = device.type == "cuda"
    need = plan(info, world, train["gpus_per_worker"], cuda, local_world_size())
    gpu_total = gpu_free = None
    if cuda:
        gpu_free, gpu_total = torch.cuda.mem_get_info(device)
    check(need, host_available_bytes(), gpu_total, gpu_free)
    return need
