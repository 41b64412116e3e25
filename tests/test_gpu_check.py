"""`scripts/gpu-check`, the one command for a lent GPU machine: its CPU smoke run completes every step, and
its list of CUDA test files holds every test file with a CUDA-only test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_every_test_file_with_a_cuda_only_test_is_in_the_gpu_check():
    cuda_only = re.compile(r"needs CUDA|cuda\.is_available\(\)")
    holding = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if cuda_only.search(p.read_text())}
    holding.discard("tests/test_gpu_check.py")
    assert holding <= set(gpu_check.GPU_TEST_FILES), f"add to bench/gpu_check.py GPU_TEST_FILES: {holding - set(gpu_check.GPU_TEST_FILES)}"


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step(tmp_path):
    done = subprocess.run([str(ROOT / "scripts" / "gpu-check"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cpu_smoke"] is True and summary["facts"]["torch"] == __import__("torch").__version__
    statuses = {name: step["status"] for name, step in summary["steps"].items()}
    assert statuses == {"cuda_tests": "ok", "gpu_throughput": "ok", "gpu_throughput_compile": "skipped (cpu smoke)",
                        "method_cost_cuda": "ok", "cifar10_epoch": "ok"}
    epoch = json.loads((tmp_path / "cifar10_epoch.json").read_text())
    assert epoch["train_images"] == 5 * 64 and epoch["test_images"] == 360 and epoch["images_per_s"] > 0
    cost = json.loads((tmp_path / "method_cost_cuda.json").read_text())
    assert set(cost["results"]["8"]) == {"kd/fp32", "kd/bf16_cl", "stkd/fp32", "stkd/bf16_cl"}
    throughput = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert throughput["settings"]["device"] == "cpu" and throughput["settings"]["smoke"] is True
    assert set(throughput["results"]) == {"resnet56->resnet20", "resnet32x4->resnet8x4"}
    for pair in throughput["results"].values():
        loops = {"classic", "classic_bf16_cl", "project"}
        assert all(pair[loop]["images_per_s"] > 0 for loop in loops)
        # The data path's share and the precision/layout share multiply to the whole speed-up.
        assert pair["speedup"] == pytest.approx(pair["project"]["images_per_s"] / pair["classic"]["images_per_s"])
        assert pair["speedup"] == pytest.approx(pair["speedup_precision_layout"] * pair["speedup_data_path"])
