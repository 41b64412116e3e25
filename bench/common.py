"""Shared helpers for the benchmark scripts: machine description, results files, data subsets.

Every script writes ``bench/results/<name>.json`` holding ``machine`` (what it ran on) and the
numbers it measured in that one run. Data and MLflow files live outside the repository
(default ``/tmp/bench``, override with ``STKD_BENCH_DIR``); ``STKD_BENCH_RESULTS`` redirects the
results files (smoke runs that must not replace the recorded ones).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("STKD_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
WORK = Path(os.environ.get("STKD_BENCH_DIR", "/tmp/bench"))
CIFAR_TARBALL = Path(os.environ.get("STKD_CIFAR10_JPG", "/work/shared/datasets/cifar10-jpg.tar.gz"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        # 1-, 5- and 15-minute load averages when the result is written: other work on the machine shows here.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        info["ray"] = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(total_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2, default=float) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def stkd_cli() -> str:
    exe = Path(sys.executable).with_name("stkd")
    return str(exe) if exe.exists() else "stkd"


def prepare_full(out: Path | None = None) -> Path:
    """The whole CIFAR-10 (JPEG) prepared as Parquet shards (skipped if already there)."""
    out = out or WORK / "cifar10"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([stkd_cli(), "prepare", str(CIFAR_TARBALL), "--out", str(out), "--no-progress"], check=True)
    return out


def prepare_subset(train_per_class: int, test_per_class: int | None = None, out: Path | None = None) -> Path:
    """A class-balanced subset of CIFAR-10: the first ``N`` images (sorted by file name) of each class.

    ``test_per_class=None`` keeps the full test split. The images are extracted from the tarball into
    an image-folder tree under WORK and prepared with ``stkd prepare``; the result is reused.
    """
    tag = f"cifar10-{train_per_class}pc" + ("" if test_per_class is None else f"-test{test_per_class}pc")
    out = out or WORK / tag
    if (out / "manifest.json").exists():
        return out
    src = WORK / f"{tag}-src"
    if not src.exists():
        keep = {"train": train_per_class, "test": test_per_class}
        tmp = src.with_name(src.name + ".tmp")
        # Two streaming passes over the .tar.gz (random access into gzip is very slow): names, then files.
        by_class: dict[tuple[str, str], list[str]] = {}
        with tarfile.open(CIFAR_TARBALL, "r|gz") as tar:
            for m in tar:
                if m.isfile() and m.name.count("/") == 2:
                    split, cls, _ = m.name.split("/")
                    by_class.setdefault((split, cls), []).append(m.name)
        chosen: set[str] = set()
        for (split, _cls), names in by_class.items():
            limit = keep.get(split)
            names = sorted(names)
            chosen.update(names if limit is None else names[:limit])
        with tarfile.open(CIFAR_TARBALL, "r|gz") as tar:
            for m in tar:
                if m.name in chosen:
                    tar.extract(m, tmp, filter="data")
        tmp.rename(src)
    subprocess.run([stkd_cli(), "prepare", str(src), "--kind", "imagefolder", "--out", str(out), "--no-progress"],
                   check=True)
    return out


def rss_kib() -> dict[str, int]:
    """This process's memory from /proc/self/status and /proc/self/smaps_rollup, in KiB."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"):
                    out[key] = int(line.split()[1])
        out["USS"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    except OSError:
        pass
    return out

