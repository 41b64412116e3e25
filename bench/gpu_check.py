"""Every GPU-only check in one command, sized for a short lease of a GPU machine (at most about 8 minutes).

The GPU machine has torch, torchvision, pyarrow and pytest but neither Ray nor MLflow, and installs
nothing: every step here runs the training step and ``stkd/`` without Ray. Steps, each with its own time
limit, each result written as it comes (a step that fails or runs out of time is recorded and the next one
runs):

1. ``cuda_tests``: the test files holding the CUDA-only tests (``GPU_TEST_FILES``), ``pytest -rs``, so any
   skip is listed with its reason.
2. ``gpu_throughput`` / ``gpu_throughput_compile``: ``bench/gpu_throughput.py`` (classic loop against this
   project's step, both pairs), without and with ``--compile``.
3. ``method_cost_cuda``: ``bench/method_cost.py --device cuda`` in bf16, fp16 and fp32 (channels_last).
4. ``cifar10_epoch``: one full-speed epoch of the real CIFAR-10 (the JPEG tarball, prepared on the spot)
   through the worker step (``InMemoryFeed``, ``InputTransform``, ``train_batch`` in ``train.precision=auto``), then the
   test split evaluated: images/s, seconds, peak GPU memory.

Everything goes to one folder (``$OUT`` when the device tool runs it, else ``bench/results/gpu_check``):
``summary.json`` (GPU name, driver, torch and CUDA versions, each step's status and seconds) and a file per
step. ``--cpu-smoke`` runs every step tiny on the CPU (test files only collected, digits instead of CIFAR,
no ``--compile``) so the script cannot rot; the test suite runs it.

    scripts/gpu-check [--out DIR] [--cifar PATH/cifar10-jpg.tar.gz]
    scripts/gpu-check --cpu-smoke --out /tmp/gpu-check-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Every test file with a test that needs CUDA (tests/test_gpu_check.py checks the list is complete).
GPU_TEST_FILES = ["tests/test_gpu_ready.py", "tests/test_methods.py", "tests/test_precision.py",
                  "tests/test_models.py", "tests/test_calibration.py", "tests/test_multi_gpu_path.py",
                  "tests/test_crd.py"]
CIFAR_CANDIDATES = [ROOT / ".cifar" / "cifar10-jpg.tar.gz", common.CIFAR_TARBALL]


def gpu_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            facts["driver"] = None
    return facts


class Steps:
    """Runs the steps in order, each within its time limit, and keeps ``summary.json`` current."""

    def __init__(self, out: Path, facts: dict[str, Any], smoke: bool) -> None:
        self.out, self.summary = out, {"facts": facts, "cpu_smoke": smoke, "steps": {}}
        self.started = time.monotonic()

    def command(self, name: str, argv: list[str], timeout_s: float, result_json: str | None = None,
                env: dict[str, str] | None = None) -> None:
        """A subprocess step; its output goes to ``<name>.txt`` unless it writes a JSON result."""
        start = time.monotonic()
        scratch = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
        run_env = {**os.environ, "STKD_BENCH_RESULTS": str(scratch), "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            done = subprocess.run(argv, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout_s)
            status, text = ("ok" if done.returncode == 0 else f"exit {done.returncode}"), done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {timeout_s:.0f} s"
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        produced = scratch / result_json if result_json else None
        if produced is not None and produced.exists():
            shutil.copy(produced, self.out / f"{name}.json")
        if produced is None or status != "ok":
            (self.out / f"{name}.txt").write_text(text)
        shutil.rmtree(scratch, ignore_errors=True)
        self.record(name, status, time.monotonic() - start, text.strip().splitlines()[-1:] if text.strip() else [])

    def record(self, name: str, status: str, seconds: float, last_lines: list[str]) -> None:
        self.summary["steps"][name] = {"status": status, "seconds": round(seconds, 1), "last_line": last_lines}
        self.summary["total_seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        print(f"gpu-check: {name}: {status} ({seconds:.0f} s)", flush=True)


def cifar10_epoch(data: str, out: Path, smoke: bool) -> None:
    """One epoch of STKD (resnet56 teacher, untrained: the step's cost does not depend on its weights ->
    resnet20) over the prepared split, then the test split evaluated; written to ``cifar10_epoch.json``."""
    from pipeline.data.feeds import InMemoryFeed
    from pipeline.data.dataset import PreparedDataset
    from pipeline.train.worker_loop import EpochSums, InputTransform, evaluate, make_generators, train_batch
    from stkd import methods, models
    from stkd.precision import Precision, resolve_channels_last, resolve_for_device

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dataset = PreparedDataset.open(data, verify=False)
    precision = resolve_for_device("auto", device)
    channels_last = resolve_channels_last("auto", device.type, precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: every batch but the last is 64 images
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    shape = dataset.image_shape
    teacher = methods.freeze(models.create("resnet56", dataset.num_classes, in_channels=shape[2]).to(device))
    student = models.create("resnet20", dataset.num_classes, in_channels=shape[2]).to(device)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    generators = make_generators(device, 0, 0)
    method = methods.create("stkd", student, teacher, generator=generators["method"])
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = InputTransform(dataset.mean, dataset.std, 4, True, channels_last, generators["augment"])
    amp = Precision.create(precision, device.type)
    load_start = time.perf_counter()
    feed = InMemoryFeed.from_split(dataset, "train", 64, 0, 1, device, shuffle=True, seed=0)
    load_s = time.perf_counter() - load_start
    limit = 5 if smoke else None
    method.train()
    sums = EpochSums(method.term_names(), device)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(feed.batches(0)):
        if limit is not None and i >= limit:
            break
        train_batch(method, optimizer, step, images, labels, amp, sums)
    totals = sums.totals()  # reads the device: the epoch's work is done when this returns
    train_s = time.perf_counter() - start
    eval_start = time.perf_counter()
    test = InMemoryFeed.from_split(dataset, "test", 512, 0, 1, device, shuffle=False)
    metrics = evaluate(student, test, step)
    eval_s = time.perf_counter() - eval_start
    result = {"device": str(device), "precision": precision, "channels_last": channels_last,
              "train_images": int(totals[-1]), "train_s": train_s, "images_per_s": totals[-1] / train_s,
              "load_to_device_s": load_s, "test_images": metrics["test/seen"], "eval_s": eval_s,
              "test_images_per_s": metrics["test/seen"] / eval_s, "loss_per_image": totals[0] / totals[-1],
              "dataset": str(data)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (out / "cifar10_epoch.json").write_text(json.dumps(result, indent=2) + "\n")


def prepare_data(args: argparse.Namespace, work: Path) -> str:
    from pipeline.data.prepare import prepare

    out = work / "prepared"
    if args.cpu_smoke:
        prepare("digits", out, progress=False)
        return str(out)
    tarball = next((p for p in ([Path(args.cifar)] if args.cifar else CIFAR_CANDIDATES) if p.exists()), None)
    if tarball is None:
        raise FileNotFoundError("no CIFAR-10 tarball: copy cifar10-jpg.tar.gz into .cifar/ and carry it")
    prepare(str(tarball), out, progress=False)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every step tiny, on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(BENCH / "results" / "gpu_check"))
    parser.add_argument("--cifar", help="the CIFAR-10 JPEG tarball (default: .cifar/ or ../shared/datasets/)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on the GPU machine, or --cpu-smoke", file=sys.stderr)
        return 2
    facts = gpu_facts()
    print(f"gpu-check: {json.dumps(facts)}", flush=True)
    steps = Steps(out, facts, smoke)
    python = sys.executable

    steps.command("cuda_tests", [python, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider",
                                 *(["--collect-only"] if smoke else []), *GPU_TEST_FILES], 40 if smoke else 110)
    throughput = ["--cpu-smoke"] if smoke else ["--steps", "150", "--warmup", "20"]
    steps.command("gpu_throughput", [python, "bench/gpu_throughput.py", *throughput, "--result-name", "tp"],
                  120 if smoke else 75, "tp.json")
    if smoke:  # inductor's CPU compile of both pairs takes minutes on a small machine: GPU only
        steps.record("gpu_throughput_compile", "skipped (cpu smoke)", 0.0, [])
    else:
        steps.command("gpu_throughput_compile", [python, "bench/gpu_throughput.py", *throughput, "--compile",
                                                 "--result-name", "tp"], 110, "tp.json")
    cost = (["--device", "cpu", "--precisions", "fp32", "bf16_cl", "--rounds", "1", "--steps", "1", "--warmup", "1",
             "--batch-sizes", "8", "--variants", "kd", "stkd"] if smoke else
            ["--device", "cuda", "--precisions", "bf16_cl", "fp16_cl", "fp32_cl", "--rounds", "5", "--steps", "10",
             "--warmup", "5", "--batch-sizes", "64", "128"])
    steps.command("method_cost_cuda", [python, "bench/method_cost.py", *cost, "--result-name", "mc"],
                  60 if smoke else 60, "mc.json")

    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-data-"))
    try:
        cifar10_epoch(prepare_data(args, work), out, smoke)
        status = "ok"
    except Exception as e:  # recorded, like every other step's failure
        status = f"failed: {type(e).__name__}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps.record("cifar10_epoch", status, time.monotonic() - start, [])
    failed = [name for name, s in steps.summary["steps"].items() if not s["status"].startswith(("ok", "skipped"))]
    print(f"gpu-check: done in {steps.summary['total_seconds']:.0f} s; results in {out}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
