"""The data path against the training step: are images delivered faster than STKD consumes them?

On the full prepared CIFAR-10 train split (50,000 images), in one run on the CPU:

- ``InMemoryFeed`` (the split loaded once into device memory, batches by ``index_select``) followed
  by ``InputTransform.train_input`` (batched random crop + flip + normalize): images/s of augmented float batches;
- ``RayDataFeed`` over ``ray.data.read_parquet`` of the shards (``ds.iterator()`` in the driver, local
  shuffle buffer as in training, Parquet -> numpy -> decode -> torch) followed by ``InputTransform.train_input``;
- a resnet56 -> resnet20 STKD training step (forward_train + backward + SGD) on the same batches:
  images/s consumed.

torch uses ``--threads`` intra-op threads (default 1, see method_cost.py) for all three.

    python bench/data_path.py [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from pipeline import config as config_lib  # noqa: E402
from pipeline.train import run  # noqa: E402
from pipeline.data.feeds import InMemoryFeed, RayDataFeed  # noqa: E402
from pipeline.data.dataset import PreparedDataset  # noqa: E402
from pipeline.train.worker_loop import InputTransform  # noqa: E402
from stkd import methods, models  # noqa: E402
from stkd.training import train_step  # noqa: E402


def drain(batches, step: InputTransform, limit: int | None = None) -> tuple[float, int]:
    """Pull batches, augment them; returns (seconds, images)."""
    seen = 0
    start = time.perf_counter()
    for images, labels in batches:
        x = step.train_input(images)
        assert x.dtype == torch.float32 and labels.dtype == torch.int64
        seen += len(labels)
        if limit is not None and seen >= limit:
            break
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=12, help="STKD steps timed (after 2 warm-up steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ray

    data_path = str(common.prepare_full())
    config = config_lib.load("bench_cifar10_ce", overrides=[f"data.path={data_path}",
                                                            f"optim.batch_size={args.batch_size}"])
    info = run.dataset_info(config)
    device = torch.device("cpu")
    step = InputTransform.from_config(config, info, torch.Generator(device=device).manual_seed(0), channels_last=False)
    dataset = PreparedDataset.open(data_path, verify=False)
    results: dict = {}

    # 1. In-memory feed: load once, then two epochs (the first touches the pages).
    start = time.perf_counter()
    feed = InMemoryFeed.from_split(dataset, "train", args.batch_size, 0, 1, device, shuffle=True, seed=0)
    load_s = time.perf_counter() - start
    rates = []
    for epoch in range(2):
        seconds, seen = drain(feed.batches(epoch), step)
        rates.append(seen / seconds)
        print(f"in-memory epoch {epoch + 1}: {seen} images in {seconds:.2f}s = {rates[-1]:.0f} img/s", flush=True)
    results["in_memory"] = {"load_s": load_s, "images": len(feed), "images_per_s_per_epoch": rates,
                            "images_per_s": rates[-1]}

    # 2. Ray Data feed over the Parquet shards, driven in this process.
    ray.init(logging_level="WARNING", include_dashboard=False)
    try:
        ds = ray.data.read_parquet(dataset.shard_paths("train"))
        ray_feed = RayDataFeed(ds.iterator(), info["image_shape"], args.batch_size, device, shuffle=True, seed=0)
        rates = []
        for epoch in range(2):
            seconds, seen = drain(ray_feed.batches(epoch), step)
            rates.append(seen / seconds)
            print(f"ray data epoch {epoch + 1}: {seen} images in {seconds:.2f}s = {rates[-1]:.0f} img/s", flush=True)
        results["ray_data"] = {"images_per_s_per_epoch": rates, "images_per_s": rates[-1],
                               "read": "ray.data.read_parquet(shards).iterator(), local_shuffle_buffer 4 batches"}
    finally:
        ray.shutdown()

    # 3. The consumer: one resnet56 -> resnet20 STKD step on batches from the in-memory feed.
    torch.manual_seed(0)
    teacher = models.create("resnet56", info["num_classes"])
    student = models.create("resnet20", info["num_classes"])
    method = methods.create("stkd", student, teacher, generator=torch.Generator().manual_seed(0))
    method.train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    times = []
    batches = feed.batches(5)
    for i in range(args.train_steps + 2):
        images, labels = next(batches)
        x = step.train_input(images)
        start = time.perf_counter()
        train_step(method, optimizer, x, labels)
        if i >= 2:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    results["stkd_step"] = {"median_step_s": step_s, "images_per_s": args.batch_size / step_s,
                            "steps": len(times), "teacher": "resnet56", "student": "resnet20"}
    print(f"stkd step: {step_s * 1e3:.0f} ms = {args.batch_size / step_s:.0f} img/s", flush=True)

    consume = results["stkd_step"]["images_per_s"]
    for key in ("in_memory", "ray_data"):
        results[key]["over_stkd_step"] = results[key]["images_per_s"] / consume
    common.write_result("data_path", {
        "description": "images/s delivered as augmented float32 NCHW tensors on the CPU by InMemoryFeed and by "
                       "RayDataFeed over ray.data.read_parquet (driver iterator), beside images/s consumed by a "
                       "resnet56 -> resnet20 STKD training step; full CIFAR-10 train split; one run",
        "settings": {"batch_size": args.batch_size, "threads": args.threads, "dataset": data_path,
                     "train_rows": info["train_rows"]},
        "results": results,
    })


if __name__ == "__main__":
    main()
