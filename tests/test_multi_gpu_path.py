"""The multi-worker / multi-GPU path (issue 23), pinned on the CPU.

Equal steps per worker on the streaming feed (no DDP join: it cannot stand in for SyncBatchNorm's
collectives), when SyncBatchNorm pays and what it refuses, per-(seed, rank, stream) generators, the memory
check before an in-memory split loads, one GPU per worker, checkpoints on the CPU, and the Ray Data feed's
fixed-size, device-side batches.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import config as config_lib
from pipeline.data import memory_check
from pipeline.train import worker_loop
from pipeline.config import ConfigError
from pipeline.data.feeds import (SYNC_BN_BELOW, InMemoryFeed, RayDataFeed, decode_collate, epoch_steps,
                                per_worker_batch, sync_bn_pays)
from pipeline.data.dataset import PreparedDataset

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# The GPU machine of scripts/gpu-check has torch and pytest, not Ray: its tests skip there, the CUDA ones run.
needs_ray = pytest.mark.skipif(not importable("ray"), reason="needs Ray (not installed here)")


def dataset_info(cfg) -> dict:
    """``pipeline.train.run.dataset_info``; ``pipeline.train.run`` imports Ray Train, which the GPU machine of
    scripts/gpu-check lacks: there these tests skip, the CUDA-only ones still run."""
    pytest.importorskip("ray")
    from pipeline.train import run

    return run.dataset_info(cfg, verify=False)


def resolved(data=None, optim=None, **train) -> dict:
    raw = config_lib.merge(config_lib.DEFAULTS, {"data": {"path": "/data", **(data or {})},
                                                 "model": {"student": "resnet8"}, "optim": optim or {},
                                                 "train": train})
    return config_lib.validate(raw)


# --- 1. every worker takes the same steps on the streaming feed -----------------------------------------------

def test_epoch_steps_roll_the_partial_batch_into_the_next_epoch():
    carry, steps = 0, []
    for _ in range(4):
        n, carry = epoch_steps(23, 4, carry)
        steps.append(n)
    assert steps == [5, 6, 6, 6] and carry == 0  # 23+0, 23+3, 23+2, 23+1 rows: 4 x 23 = 92 = 23 batches of 4
    assert epoch_steps(32, 4) == (8, 0)


class FakeShard:
    """A shard that hands out prepared batches and records what it was asked for."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes, self.calls, self.next_row = sizes, [], 0

    def iter_torch_batches(self, **kwargs):
        self.calls.append(kwargs)
        for n in self.sizes:
            rows = torch.arange(self.next_row, self.next_row + n)
            self.next_row += n
            yield torch.zeros(n, 2, 2, 1, dtype=torch.uint8) + rows.view(-1, 1, 1, 1).to(torch.uint8), rows


@needs_ray
def test_ray_data_feed_trains_on_full_batches_and_carries_the_rest():
    shard = FakeShard([4, 4, 3])  # 11 rows a worker per epoch, batch 4
    feed = RayDataFeed(shard, (2, 2, 1), 4, CPU, shuffle=True, seed=0)
    per_epoch, seen = [], []
    for epoch in range(3):
        batches = list(feed.batches(epoch))
        assert all(len(y) == 4 and len(x) == 4 for x, y in batches), "one shape: every batch full"
        per_epoch.append(len(batches))
        seen += [int(v) for _, y in batches for v in y]
    carry = 0
    expected = []
    for _ in range(3):
        n, carry = epoch_steps(11, 4, carry)
        expected.append(n)
    assert per_epoch == expected == [2, 3, 3]
    assert len(seen) == len(set(seen)) == 32 and len(feed.carry[1]) == 1  # 33 rows: 32 trained, 1 carried on
    call = shard.calls[0]
    assert call["device"] == CPU and call["pin_memory"] is False and call["prefetch_batches"] >= 1
    assert call["batch_size"] == 4 and call["local_shuffle_seed"] == 0 and call["collate_fn"] is not None
    # Evaluation: every row once, the short last batch as it comes.
    eval_shard = FakeShard([4, 3])
    assert [len(y) for _, y in RayDataFeed(eval_shard, (2, 2, 1), 4, CPU, shuffle=False).batches(0)] == [4, 3]
    assert "local_shuffle_seed" not in eval_shard.calls[0]


@needs_ray
def test_decode_collate_turns_an_arrow_batch_into_uint8_and_int64_tensors():
    import pyarrow as pa

    images = np.arange(2 * 2 * 3 * 1, dtype=np.uint8).reshape(2, 2, 3, 1)
    table = pa.table({"image": pa.array([img.tobytes() for img in images], type=pa.binary()),
                      "label": pa.array([3, 1], type=pa.int64())})
    x, y = decode_collate((2, 3, 1))(table)
    assert x.dtype == torch.uint8 and x.shape == (2, 2, 3, 1) and torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.int64 and y.tolist() == [3, 1]


@pytest.fixture(scope="module")
def odd_rows(tmp_path_factory) -> Path:
    """A prepared dataset of 35 distinct train rows (12 + 12 + 11): 35 divides neither over 2 nor over 3 workers."""
    from fixtures_data import prepared_random_images

    return prepared_random_images(tmp_path_factory.mktemp("odd"), {"train": (12, 12, 11), "test": (4, 4, 3)}, seed=1)


def equal_steps_probe(ctx):
    """In each worker: the real streaming feeds (make_feeds) and a DDP model stepping on every batch, so that
    unequal step counts would stall a gradient all-reduce (and fail at the process group's timeout)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipeline.train.worker_loop import ddp_kwargs, make_feeds

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg, info = ctx["config"], ctx["info"]
    train, _, test = make_feeds(cfg, info, rank, world, CPU)
    torch.manual_seed(0)
    h, w, c = info["image_shape"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(h * w * c, info["num_classes"]))
    model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs(False))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel) and dist.get_backend() == "gloo"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = {"steps": [], "sizes": [], "test_rows": 0}
    for epoch in range(ctx["epochs"]):
        steps = 0
        for images, labels in train.batches(epoch):
            loss = torch.nn.functional.cross_entropy(model(images.float() / 255), labels)
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients: every rank must take this step
            optimizer.step()
            steps += 1
            out["sizes"].append(len(labels))
        out["steps"].append(steps)
    out["test_rows"] = sum(len(y) for _, y in test.batches(0))
    Path(ctx["out"], f"rank{rank}.json").write_text(json.dumps(out))


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_streaming_workers_take_equal_steps_with_uneven_shards(ray_session, odd_rows, tmp_path, world):
    from ray import cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.data.feeds import ray_datasets, split_data_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    batch, epochs = 4 * world, 3
    cfg = config_lib.load("test_tiny", [f"data.path={odd_rows}", "data.in_memory=false", f"train.workers={world}",
                                        f"optim.batch_size={batch}", "train.cpus_per_worker=0.5"])
    info = dataset_info(cfg)
    rows = info["train_rows"]
    assert rows == 35 and rows % world, "the shards cannot be equal without dropping rows"
    trainer = TorchTrainer(
        equal_steps_probe,
        train_loop_config={"config": cfg, "info": info, "epochs": epochs, "out": str(tmp_path)},
        torch_config=TorchConfig(timeout_s=60),  # a stalled all-reduce fails the test instead of hanging it
        scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
        datasets=ray_datasets(PreparedDataset.open(odd_rows), world), dataset_config=split_data_config())
    trainer.fit()
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    carry, expected = 0, []
    for _ in range(epochs):
        n, carry = epoch_steps(rows // world, batch // world, carry)
        expected.append(n)
    for r in per_rank:
        assert r["steps"] == expected, "every worker: the same steps, each epoch"
        assert set(r["sizes"]) == {batch // world}, "one batch shape"
    assert sum(r["test_rows"] for r in per_rank) == info["test_rows"], "evaluation still sees every row once"


# --- 2. SyncBatchNorm where it pays; refused with torch.compile; no buffer broadcast -------------------------

def test_sync_bn_auto_only_for_small_per_gpu_batches():
    assert SYNC_BN_BELOW == 32 and sync_bn_pays(16) and not sync_bn_pays(32)
    assert per_worker_batch(64, 4) == 16 and per_worker_batch(64, 2) == 32 and per_worker_batch(2, 4) == 1
    assert worker_loop.resolve_sync_bn("auto", CUDA, 4, per_worker_batch=16)
    assert not worker_loop.resolve_sync_bn("auto", CUDA, 2, per_worker_batch=32)
    assert not worker_loop.resolve_sync_bn("auto", CUDA, 1, per_worker_batch=8)
    assert not worker_loop.resolve_sync_bn("auto", CPU, 4, per_worker_batch=8)
    assert worker_loop.resolve_sync_bn(True, CUDA, 2, per_worker_batch=256)
    assert not worker_loop.resolve_sync_bn(False, CUDA, 4, per_worker_batch=8)


def test_sync_bn_with_compile_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"train\.sync_bn and train\.compile"):
        resolved(use_gpu=True, workers=2, sync_bn=True, compile=True)
    with pytest.raises(ConfigError, match=r"train\.sync_bn and train\.compile: .*auto: 16 samples per GPU"):
        resolved(use_gpu=True, workers=4, compile=True, optim={"batch_size": 64})
    # auto stays off at 32 per GPU, or on the CPU: compile is fine there.
    assert resolved(use_gpu=True, workers=2, compile=True, optim={"batch_size": 64})["train"]["compile"] is True
    assert resolved(workers=4, compile=True, optim={"batch_size": 64})["train"]["compile"] is True
    assert resolved(use_gpu=True, workers=2, sync_bn=False, compile=True, optim={"batch_size": 16})


def test_ddp_does_not_broadcast_buffers_under_sync_bn():
    assert worker_loop.ddp_kwargs(True) == {"broadcast_buffers": False}
    assert worker_loop.ddp_kwargs(False) == {}


@needs_ray
def test_prepare_model_passes_the_ddp_options_through():
    """Ray's prepare_model hands parallel_strategy_kwargs to DistributedDataParallel (read in the installed source)."""
    import inspect

    from ray.train.torch import train_loop_utils

    source = inspect.getsource(train_loop_utils._TorchAccelerator.prepare_model)
    assert "DataParallel(model, **parallel_strategy_kwargs)" in source
    assert "broadcast_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters


# --- 3. generators: one stream per (seed, rank, stream) -------------------------------------------------------

def first_draws(seed: int, rank: int) -> dict[str, list[float]]:
    return {k: torch.rand(4, generator=g).tolist() for k, g in worker_loop.make_generators(CPU, seed, rank).items()}


def test_generators_differ_by_stream_and_rank_and_repeat_by_seed():
    zero = first_draws(0, 0)
    assert zero["augment"] != zero["method"], "seed 0: the two streams are not the same stream"
    assert first_draws(0, 1)["augment"] != zero["augment"] and first_draws(0, 1)["method"] != zero["method"]
    assert first_draws(1, 0)["augment"] != zero["augment"]
    assert first_draws(0, 0) == zero and first_draws(7, 3) == first_draws(7, 3)
    seeds = {worker_loop.generator_seed(s, r, k) for s in range(4) for r in range(4) for k in range(2)}
    assert len(seeds) == 32
    assert 0 <= worker_loop.generator_seed(-1, 0, 0) < 2**64  # negative seeds map into SeedSequence's range


# --- 4. the memory check ------------------------------------------------------------------------------------

INFO = {"image_shape": [32, 32, 3], "train_rows": 45_000, "val_rows": 5_000, "test_rows": 10_000}
ROW = 32 * 32 * 3 + 8


def test_memory_plan_arithmetic():
    need = memory_check.plan(INFO, world=2, gpus_per_worker=1.0, cuda=True)
    assert need.device_split_bytes == 50_000 * (ROW + 8) + 5_000 * ROW  # whole train split + indices, half of test
    assert need.host_split_bytes == 60_000 * ROW
    assert need.gpu_bytes == need.device_split_bytes + memory_check.CUDA_CONTEXT_BYTES
    shared = memory_check.plan(INFO, world=1, gpus_per_worker=0.25, cuda=True, workers_per_host=1)
    assert shared.trials_per_gpu == 4
    assert shared.gpu_bytes == 4 * (50_000 * (ROW + 8) + 10_000 * ROW + memory_check.CUDA_CONTEXT_BYTES)
    assert shared.host_bytes == 4 * 2 * 60_000 * ROW
    assert [memory_check.trials_per_gpu(s) for s in (1, 0.5, 0.3, 0.25, 0.1)] == [1, 2, 3, 4, 10]
    assert memory_check.trials_per_gpu(0.25, use_gpu=False) == 1
    two_workers = memory_check.plan(INFO, world=2, gpus_per_worker=1.0, cuda=False, workers_per_host=2)
    assert two_workers.host_bytes == 2 * 2 * 60_000 * ROW and two_workers.trials_per_gpu == 1


def test_memory_check_refuses_with_the_numbers():
    gib = memory_check.GIB
    need = memory_check.plan(INFO, world=1, gpus_per_worker=0.25, cuda=True)  # 4 trials x (0.19 + 0.5) GiB
    memory_check.check(need, host_available=64 * gib, gpu_total=80 * gib, gpu_free=70 * gib)  # fits
    with pytest.raises(memory_check.InsufficientMemoryError) as e:
        memory_check.check(need, host_available=64 * gib, gpu_total=2 * gib, gpu_free=2 * gib)
    message = str(e.value)
    assert "GPU memory" in message and "x 4 trials sharing the GPU" in message and "2.00 GiB in all" in message
    assert f"{need.gpu_bytes / gib:.2f} GiB" in message and "0.50 GiB CUDA context" in message
    assert "data.in_memory=false" in message and "train.gpus_per_worker" in message
    with pytest.raises(memory_check.InsufficientMemoryError, match=r"0\.10 GiB is free now"):
        memory_check.check(need, host_available=64 * gib, gpu_total=80 * gib, gpu_free=gib // 10)
    with pytest.raises(memory_check.InsufficientMemoryError, match=r"host memory: .* and 0\.50 GiB is available"):
        memory_check.check(need, host_available=gib // 2, gpu_total=80 * gib, gpu_free=70 * gib)
    cpu_need = memory_check.plan(INFO, world=1, gpus_per_worker=1.0, cuda=False)
    assert memory_check.problems(cpu_need, host_available=64 * gib, gpu_total=None) == []


@needs_ray
def test_make_feeds_checks_memory_before_loading(unique_images, monkeypatch):
    cfg = config_lib.load("test_tiny", [f"data.path={unique_images}", "train.workers=1"])
    info = dataset_info(cfg)
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: 1000)
    monkeypatch.setattr(PreparedDataset, "load_numpy", lambda *a: pytest.fail("loaded before the check"))
    with pytest.raises(memory_check.InsufficientMemoryError, match="host memory: loading the split needs"):
        worker_loop.make_feeds(cfg, info, 0, 1, CPU)


@needs_ray
@pytest.mark.parametrize("world", [1, 3])
def test_the_index_carve_gives_the_boolean_mask_carve_batches(unique_images, world):
    """Carving the validation rows by index draws exactly the batches the boolean-mask copies drew."""
    cfg = config_lib.load("test_tiny", [f"data.path={unique_images}", "data.val_fraction=0.2", "optim.batch_size=8",
                                        "data.eval_batch_size=5", "train.seed=4"])
    info = dataset_info(cfg)
    images, labels = PreparedDataset.open(unique_images).load_numpy("train")
    held = np.zeros(len(labels), dtype=bool)
    held[info["val_positions"]] = True
    for rank in range(world):
        train, val, _ = worker_loop.make_feeds(cfg, info, rank, world, CPU)
        old_train = InMemoryFeed(images[~held], labels[~held], 8, rank, world, CPU, shuffle=True, seed=4)
        old_val = InMemoryFeed(images[held], labels[held], 5, rank, world, CPU, shuffle=False)
        assert len(train) == len(old_train) and len(val) == len(old_val)
        for new, old, epoch in ((train, old_train, 0), (train, old_train, 1), (val, old_val, 0)):
            for (x, y), (ox, oy) in zip(new.batches(epoch), old.batches(epoch), strict=True):
                assert torch.equal(x, ox) and torch.equal(y, oy)
        assert train.images.data_ptr() == val.images.data_ptr(), "one copy of the train split"


# --- 5. one GPU per worker ---------------------------------------------------------------------------------

def test_more_than_one_gpu_per_worker_is_refused():
    with pytest.raises(ConfigError, match=r"train\.gpus_per_worker: 2 GPUs per worker.*other 1 idle"):
        resolved(use_gpu=True, gpus_per_worker=2)
    with pytest.raises(ConfigError, match=r"train\.gpus_per_worker: a fraction of one GPU in \(0, 1\], got 0"):
        resolved(use_gpu=True, gpus_per_worker=0)
    assert resolved(use_gpu=True, gpus_per_worker=1)["train"]["gpus_per_worker"] == 1
    assert resolved(use_gpu=True, workers=1, gpus_per_worker=0.25)["train"]["gpus_per_worker"] == 0.25


# --- 6. checkpoints hold CPU tensors -------------------------------------------------------------------------

def meta_training_state() -> dict:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, device="meta")).sum().backward()
    optimizer.step()  # momentum buffers, on the meta device like the parameters
    return {"student": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
            "history": [{"loss": 1.0}], "rng": {"device": "cuda", "augment": [torch.zeros(8, dtype=torch.uint8)]},
            "pair": (torch.zeros(1, device="meta"), "name")}


def tensors(value) -> list[torch.Tensor]:
    found = []
    worker_loop.map_tensors(value, lambda t: found.append(t) or t)
    return found


def test_map_tensors_reaches_every_tensor_and_keeps_the_structure():
    state = meta_training_state()
    assert all(t.is_meta for t in tensors(state["student"]))
    assert state["optimizer"]["state"][0]["momentum_buffer"].is_meta  # optimizer state: where the parameters are
    moved = worker_loop.map_tensors(state, lambda t: torch.empty_like(t, device="cpu") if t.is_meta else t)
    assert all(t.device.type == "cpu" for t in tensors(moved)) and len(tensors(moved)) == len(tensors(state))
    assert isinstance(moved["student"], OrderedDict) and list(moved["student"]) == list(state["student"])
    assert moved["epoch"] == 3 and moved["history"] == [{"loss": 1.0}] and moved["pair"][1] == "name"
    assert isinstance(moved["pair"], tuple) and moved["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_state_to_cpu_moves_what_is_elsewhere_and_keeps_cpu_tensors():
    cpu = {"w": torch.ones(2), "nested": [torch.zeros(1)]}
    out = worker_loop.state_to_cpu(cpu)
    assert out["w"] is cpu["w"] and out["nested"][0] is cpu["nested"][0]  # no copy of what is already there
    with pytest.raises(NotImplementedError, match="meta"):  # a meta tensor has no data to copy: it was moved
        worker_loop.state_to_cpu({"w": torch.ones(1, device="meta")})


@needs_ray
def test_report_with_checkpoint_saves_cpu_tensors(monkeypatch, tmp_path):
    import ray.train

    reported, moved = {}, []
    original = worker_loop.state_to_cpu

    def spy(state):
        out = original(state)
        moved.append(out)
        return out

    def fake_report(metrics, checkpoint=None):
        reported["metrics"] = metrics
        reported["state"] = torch.load(Path(checkpoint.path) / "checkpoint.pt", weights_only=True)

    monkeypatch.setattr(worker_loop, "state_to_cpu", spy)
    monkeypatch.setattr(ray.train, "report", fake_report)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = {"model": {"name": "x"}, "student": model.state_dict(), "optimizer": optimizer.state_dict()}
    worker_loop.report_with_checkpoint({"loss": 1.0}, state, rank=0)
    assert len(moved) == 1 and "checkpoint_time_s" in reported["metrics"]
    saved = tensors(reported["state"])
    assert saved and all(t.device.type == "cpu" for t in saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_to_cpu_copies_cuda_tensors():
    state = {"student": torch.nn.Linear(2, 2).cuda().state_dict()}
    assert all(t.device.type == "cpu" for t in tensors(worker_loop.state_to_cpu(state)))


# --- 8. the streaming batch divides over the workers ---------------------------------------------------------

def test_a_streamed_global_batch_must_divide_over_the_workers():
    with pytest.raises(ConfigError, match=r"optim\.batch_size: the global batch 64 does not divide over "
                                          r"train\.workers=3.*use 63 or 66"):
        resolved(data={"in_memory": False}, workers=3, optim={"batch_size": 64})
    assert resolved(data={"in_memory": False}, workers=4, optim={"batch_size": 64})
    assert resolved(data={"in_memory": True}, workers=3, optim={"batch_size": 64})  # dealt out row by row
