"""Ray Train overhead: the project's pipeline (TorchTrainer, 1 worker) against a plain PyTorch loop.

Both train resnet20 with method ``ce`` on the same prepared CIFAR-10 subset (5,000 train images),
batch 64, the same number of epochs, from the same pieces: ``InMemoryFeed`` -> ``InputTransform`` (batched crop
+ flip + normalize) -> ``method.forward_train`` -> backward -> SGD. The Ray path is
``pipeline.train.run.train`` on a config from ``pipeline.config.load("bench_cifar10_ce", ...)``, and its
per-epoch ``images_per_s`` (training part only) comes from ``Outcome.history``; the plain loop times
the same training part. Passes alternate within one run: plain, Ray, plain, Ray, plain (``--repeats``
Ray passes), so load from other processes on a shared machine hits both paths; the first epoch of each
pass is warm-up and left out of the medians. The 1-minute load average is recorded around each pass.

Ray gives a worker with ``cpus_per_worker = n`` ``OMP_NUM_THREADS = n``, so the plain loop runs with
``torch.set_num_threads(n)`` for the same ``n``; both ``n = 1`` and ``n = 2`` are measured.

    python bench/ray_overhead.py [--epochs 3] [--repeats 2] [--cpus 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("OMP_NUM_THREADS", None)
TRACKING = f"sqlite:///{common.WORK / 'mlflow.db'}"
os.environ.setdefault("MLFLOW_TRACKING_URI", TRACKING)

import torch  # noqa: E402

from pipeline import config as config_lib  # noqa: E402
from pipeline.train import run  # noqa: E402
from pipeline.data.feeds import InMemoryFeed  # noqa: E402
from pipeline.data.dataset import PreparedDataset  # noqa: E402
from pipeline.train.worker_loop import InputTransform  # noqa: E402
from stkd import methods, models  # noqa: E402
from stkd.training import train_step  # noqa: E402


def make_config(data_path: str, epochs: int, cpus: int) -> dict:
    return config_lib.load("bench_cifar10_ce", overrides=[
        f"data.path={data_path}", f"optim.epochs={epochs}", "optim.milestones=[]", f"train.cpus_per_worker={cpus}",
        f"train.checkpoint_every={epochs}", f"train.run_name=bench-overhead-{uuid.uuid4().hex[:8]}",
        f"train.storage_path={common.WORK / 'ray_runs'}", "mlflow.experiment=stkd-bench-overhead",
        f"mlflow.tracking_uri={TRACKING}"])


def plain_loop(config: dict, info: dict, threads: int) -> list[float]:
    """The training part of ``train_loop_per_worker`` in this process, no Ray; images/s per epoch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = torch.device("cpu")
        seed = config["train"]["seed"]
        optim_cfg = config["optim"]
        torch.manual_seed(seed)
        student = models.create(config["model"]["student"], info["num_classes"], in_channels=info["image_shape"][2])
        method = methods.create(config["method"]["name"], student, None,
                                generator=torch.Generator().manual_seed(seed * 7919))
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=optim_cfg["lr"],
                                    momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"])
        step = InputTransform.from_config(config, info, torch.Generator(device=device).manual_seed(seed * 104_729), channels_last=False)
        feed = InMemoryFeed.from_split(PreparedDataset.open(info["path"], verify=False), "train", optim_cfg["batch_size"], 0, 1,
                            device, shuffle=True, seed=seed)
        rates = []
        for epoch in range(optim_cfg["epochs"]):
            method.set_epoch(epoch)
            method.train()
            term_sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros(())
            seen = 0
            start = time.perf_counter()
            for images, labels in feed.batches(epoch):
                logits, terms = train_step(method, optimizer, step.train_input(images), labels)
                n = len(labels)
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value.detach() * n
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += n
            rates.append(seen / (time.perf_counter() - start))
            print(f"  plain threads={threads} epoch {epoch + 1}: {rates[-1]:.0f} img/s", flush=True)
        return rates
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="Ray passes (plain passes: one more)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="cpus_per_worker = plain-loop threads")
    parser.add_argument("--train-per-class", type=int, default=500)
    args = parser.parse_args()

    import ray

    data_path = str(common.prepare_subset(args.train_per_class, test_per_class=100))
    ray.init(logging_level="WARNING", include_dashboard=False)
    try:
        @ray.remote
        class Probe:  # a fresh worker process, as a Ray Train worker gets
            def threads(self) -> tuple[str | None, int]:
                import torch as t
                return os.environ.get("OMP_NUM_THREADS"), t.get_num_threads()

        results = {}
        for cpus in args.cpus:
            config = make_config(data_path, args.epochs, cpus)
            info = run.dataset_info(config)
            probe = Probe.options(num_cpus=cpus).remote()
            omp, threads = ray.get(probe.threads.remote())
            ray.kill(probe)
            print(f"cpus_per_worker={cpus}: a fresh Ray actor with num_cpus={cpus} sees OMP_NUM_THREADS={omp}, "
                  f"torch threads={threads}", flush=True)
            passes = []
            for i in range(2 * args.repeats + 1):
                load_before = os.getloadavg()[0]
                if i % 2 == 0:
                    rates = plain_loop(config, info, cpus)
                    entry = {"path": "plain", "images_per_s": rates}
                else:
                    config = make_config(data_path, args.epochs, cpus)  # a fresh run name each pass
                    start = time.perf_counter()
                    outcome = run.train(config)
                    rates = [h["images_per_s"] for h in outcome.history]
                    entry = {"path": "ray", "images_per_s": rates, "run_wall_s": time.perf_counter() - start,
                             "run_name": outcome.run_name}
                    for e, r in enumerate(rates):
                        print(f"  ray   cpus={cpus} epoch {e + 1}: {r:.0f} img/s", flush=True)
                entry["loadavg_1m_before_after"] = [load_before, os.getloadavg()[0]]
                passes.append(entry)
            plain_rates = [r for p in passes if p["path"] == "plain" for r in p["images_per_s"][1:]]
            ray_rates = [r for p in passes if p["path"] == "ray" for r in p["images_per_s"][1:]]
            plain_med, ray_med = statistics.median(plain_rates), statistics.median(ray_rates)
            results[str(cpus)] = {
                "worker_omp_num_threads": omp, "worker_torch_threads": threads, "passes": passes,
                "plain_median_images_per_s": plain_med, "ray_median_images_per_s": ray_med,
                "plain_max_images_per_s": max(plain_rates), "ray_max_images_per_s": max(ray_rates),
                "ray_over_plain": ray_med / plain_med,
                "ray_over_plain_best_epochs": max(ray_rates) / max(plain_rates),
            }
            print(f"cpus={cpus}: plain {plain_med:.0f} img/s, ray {ray_med:.0f} img/s (medians), "
                  f"ratio {ray_med / plain_med:.3f}; best epochs {max(ray_rates) / max(plain_rates):.3f}", flush=True)
    finally:
        ray.shutdown()

    met = {c: r["ray_over_plain"] >= 0.90 for c, r in results.items()}
    common.write_result("ray_overhead", {
        "description": "images/s of the training part of an epoch (ce, resnet20, batch 64, 5,000 CIFAR-10 "
                       "train images, in-memory feed, CPU fp32): pipeline.train.run.train with a 1-worker TorchTrainer "
                       "vs the same step pieces in a plain loop in the driver; passes alternate plain/Ray; median "
                       "over epochs after the first of each pass; ratios within this run",
        "settings": {"epochs": args.epochs, "repeats": args.repeats, "batch_size": 64, "train_rows": info["train_rows"],
                     "dataset": data_path, "model": "resnet20", "method": "ce"},
        "results": results,
        "target": {"ray_over_plain_min": 0.90, "met_per_cpus": met, "met": all(met.values())},
    })


if __name__ == "__main__":
    main()
