"""The per-worker training function that Ray Train runs on every worker.

One function for teachers (method ``ce``) and students: data in, augmentation on the device,
``method.forward_train``, the weighted loss terms summed and reported by name. Rank 0 writes
checkpoints; every worker takes part in the evaluation of the whole test split. Metrics reach
MLflow through ``pipeline.tracking.epoch_logger`` on the controller.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.data import memory_check
from pipeline.tracking import system_metrics
from pipeline.train import checkpoint, teachers as teacher_store
from pipeline.data.feeds import InMemoryFeed, RayDataFeed, per_worker_batch, sync_bn_pays, training_labels
from pipeline.data.dataset import PreparedDataset
from stkd import calibration, methods, models, precision
from stkd.augment import channel_stats, nhwc_to_nchw, normalize, random_crop_flip
from stkd.training import eval_logits, scaled_train_step, train_step

log = logging.getLogger(__name__)


def resolve_sync_bn(value: bool | str, device: torch.device, world: int, per_worker_batch: int | None = None) -> bool:
    """``train.sync_bn``: ``auto`` is on with CUDA, more than one worker and a per-GPU batch small enough
    that its BatchNorm statistics get noisy (below ``pipeline.data.feeds.SYNC_BN_BELOW`` = 32 samples; the
    reasoning is there); an unknown batch (``None``) counts as small. PyTorch's SyncBatchNorm runs on GPUs
    only, so on the CPU each worker's BatchNorm keeps its own statistics (the config check refuses ``true``
    without ``train.use_gpu``, and SyncBatchNorm with ``train.compile``)."""
    if value != "auto":
        return bool(value)
    return device.type == "cuda" and world > 1 and (per_worker_batch is None or sync_bn_pays(per_worker_batch))


def ddp_kwargs(sync_bn: bool) -> dict[str, Any]:
    """DistributedDataParallel's options (``prepare_model(parallel_strategy_kwargs=...)``). With SyncBatchNorm
    every rank computes the same global-batch statistics, so its running stats agree without DDP's
    broadcast of rank 0's buffers before every forward, which would only add a collective per step."""
    return {"broadcast_buffers": False} if sync_bn else {}


def build_student(spec: dict[str, Any], device: torch.device, channels_last: bool, sync_bn: bool) -> torch.nn.Module:
    """The student on ``device``; with ``sync_bn`` its BatchNorm layers become SyncBatchNorm (before DDP
    wraps it), so a data-parallel run normalizes with the global batch's statistics, as one GPU would.
    SyncBatchNorm keeps BatchNorm's parameter and buffer names: checkpoints load either way."""
    student = models.create(spec["name"], spec["num_classes"], in_channels=spec["in_channels"]).to(device)
    if sync_bn:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    return student


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def stop_asked(stop_file: str | None, device: torch.device) -> bool:
    """Whether the driver asked the run to stop after this epoch (``pipeline.stopping``): every rank
    gets the same answer, so all of them checkpoint and leave together."""
    if not stop_file:
        return False
    asked = torch.tensor([float(storage.exists(stop_file))], device=device)
    return bool(all_reduce_sum(asked).item())


GENERATOR_STREAMS = ("augment", "method")


def generator_seed(seed: int, rank: int, stream: int) -> int:
    """A 64-bit seed for one (run seed, rank, stream): ``numpy.random.SeedSequence`` hashes the three, so no
    two of them share a stream (``seed * 104_729 + rank`` and ``seed * 7919 + rank`` were equal at seed 0)."""
    entropy = [seed % 2**64, rank, stream]  # SeedSequence takes non-negative integers
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def make_generators(device: torch.device, seed: int, rank: int) -> dict[str, torch.Generator]:
    """This rank's generators on the training device: ``augment`` (crop offsets, flips) and ``method``
    (mixup), each with its own seed from (seed, rank, stream). Drawing on the device keeps host copies out
    of the step; their states go in checkpoints."""
    return {name: torch.Generator(device=device).manual_seed(generator_seed(seed, rank, stream))
            for stream, name in enumerate(GENERATOR_STREAMS)}


class InputTransform:
    """Turns a uint8 NHWC batch into a normalized, augmented float batch on the device.

    What it needs per batch already lives there: the normalization constants, made once, and the
    generator the crop offsets and flips are drawn from.
    """

    def __init__(self, mean, std, padding: int, flip: bool, channels_last: bool, generator: torch.Generator) -> None:
        self.mean, self.std = channel_stats(mean, std, generator.device)
        self.padding, self.flip, self.channels_last = padding, flip, channels_last
        self.generator = generator

    @classmethod
    def from_config(cls, config: dict[str, Any], info: dict[str, Any], generator: torch.Generator,
                    channels_last: bool) -> "InputTransform":
        return cls(info["mean"], info["std"], config["data"]["crop_padding"], config["data"]["flip"], channels_last,
                   generator)

    def train_input(self, images: torch.Tensor) -> torch.Tensor:
        x = random_crop_flip(nhwc_to_nchw(images), self.padding, self.flip, self.generator)
        return normalize(x, self.mean, self.std, channels_last=self.channels_last)

    def eval_input(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(nhwc_to_nchw(images), self.mean, self.std, channels_last=self.channels_last)


class EpochSums:
    """An epoch's loss-term sums (each weighted by its batch size) and correct predictions, kept on the
    device and read once, at the end of the epoch: a read per step would make the CPU wait for the GPU."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        # terms..., skipped steps (fp16), correct
        self.values = torch.zeros(len(names) + 2, dtype=torch.float64, device=device)
        self.seen = 0
        self._no_skip = torch.zeros((), device=device)

    def add(self, terms: dict[str, torch.Tensor], correct: torch.Tensor, n: int,
            skipped: torch.Tensor | None = None) -> None:
        skipped = self._no_skip if skipped is None else skipped
        self.values += torch.stack([terms[k].detach().float() * n for k in self.names]
                                   + [skipped.float(), correct.float()])
        self.seen += n

    def totals(self) -> list[float]:
        """``[term sums..., skipped steps, correct, seen]`` summed over workers: the epoch's one read from
        the device."""
        seen = torch.tensor([float(self.seen)], dtype=torch.float64, device=self.values.device)
        return all_reduce_sum(torch.cat([self.values, seen])).tolist()


def train_batch(method: methods.Method, optimizer: torch.optim.Optimizer, transform: InputTransform,
                images: torch.Tensor, labels: torch.Tensor, amp: precision.Precision, sums: EpochSums,
                indices: torch.Tensor | None = None) -> None:
    """One training step on a uint8 batch already on the device, counted into ``sums``; nothing in it
    waits for the device (``tests/test_gpu_ready.py`` checks this on CUDA). ``indices``: the batch's indices
    in the training set, from a feed built ``with_indices`` for a method that needs them (CRD)."""
    x = transform.train_input(images)
    if amp.scaler is None:
        logits, terms = train_step(method, optimizer, x, labels, amp.autocast, indices)
        skipped = None
    else:
        logits, terms, skipped = scaled_train_step(method, optimizer, x, labels, amp.autocast, amp.scaler, indices)
    sums.add(terms, method.train_correct(logits.detach(), labels), len(labels), skipped)


def restore(directory: str, student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            generators: dict[str, torch.Generator], rank: int,
            scaler: torch.amp.GradScaler | None = None, method: methods.Method | None = None) -> dict[str, Any]:
    """Load a training checkpoint into a student, optimizer and generators already on the device.

    The file is read on the CPU and ``load_state_dict`` copies weights and optimizer state to where the
    parameters live. Generator states must stay CPU ByteTensors, which ``Generator.set_state`` insists
    on: loading with ``map_location=<GPU>`` made every resume on CUDA fail.
    """
    state = checkpoint.load(directory, map_location="cpu")
    student.load_state_dict(state["student"])
    if method is not None and method.checkpointed_modules():  # FitNet's regressor, CRD's embeddings and banks
        method.load_own_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(generators, state["rng"], rank)
    if scaler is not None and state.get("scaler"):  # fp16: the loss scale it had reached, not 65536 again
        scaler.load_state_dict(state["scaler"])
    return state


def restore_rng(generators: dict[str, torch.Generator], rng: dict[str, Any], rank: int) -> None:
    """This rank's saved generator states. States saved on another device type (a CPU run resumed on a
    GPU) do not fit; those generators keep their seeds, with a warning."""
    saved_on = rng.get("device", "cpu")  # checkpoints from before device generators held CPU states
    for key, generator in generators.items():
        if generator.device.type != saved_on:
            log.warning("checkpoint holds %s random states and this worker draws on %s: %s draws restart from "
                        "the seed", saved_on, generator.device.type, key)
            continue
        states = rng[key]
        generator.set_state(states[rank % len(states)])


def make_feeds(config, info, rank, world, device):
    """Train, validation (None without a validation split) and test feeds for this worker.

    ``world`` is the size of this worker group, read from Ray Train's context each time a group starts: an
    elastic run (``train.workers: [min, max]``) restarted on fewer workers after losing a node gets it anew.
    The global batch stays ``optim.batch_size`` at every size: the in-memory feed deals each global batch out
    over the ``world`` workers (the same batches, in the same order, whatever the size), the streaming feed
    gives each worker ``optim.batch_size / world`` rows a step (the config check makes it divide for every
    size in the range). No gradient accumulation: each step is one all-reduce of the whole global batch.

    In memory: the memory check first (``pipeline.data.memory_check``: refuses, with the numbers, a split that
    this worker's GPU or host cannot hold), then the train split goes to the device once and the training
    and validation feeds take their rows from that one copy by index. Every shape the feeds give is one of a
    handful fixed for the run (equal per-worker batches, see ``pipeline.data.feeds``), so on CUDA cuDNN's
    autotuner (``cudnn.benchmark``) runs once per shape and picks the fastest convolution algorithms."""
    data, optim, seed = config["data"], config["optim"], config["train"]["seed"]
    val_keys = info.get("val_keys")
    with_indices = methods.method_class(config["method"]["name"]).needs_indices
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if data["in_memory"]:
        memory_check.check_in_memory(config, info, world, device)
        dataset = PreparedDataset.open(info["path"], verify=False)
        images, labels = dataset.load_numpy("train")
        train_rows = val = None
        if val_keys is not None:
            held_out = np.zeros(len(labels), dtype=bool)
            held_out[info["val_positions"]] = True  # carved on the driver from the same rows in the same order
            train_rows, val_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
        images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)  # once
        if val_keys is not None:
            val = InMemoryFeed(images, labels, data["eval_batch_size"], rank, world, device, shuffle=False,
                               rows=val_rows)
        train = InMemoryFeed(images, labels, optim["batch_size"], rank, world, device, shuffle=True, seed=seed,
                             rows=train_rows, with_indices=with_indices)
        del images, labels  # the host arrays go before the test split loads (on a GPU worker)
        test = InMemoryFeed.from_split(dataset, "test", data["eval_batch_size"], rank, world, device, shuffle=False)
        return train, val, test
    import ray.train

    def shard_feed(split, batch_size, shuffle, index_labels=None):
        return RayDataFeed(ray.train.get_dataset_shard(split), info["image_shape"], batch_size, device, shuffle, seed,
                           index_labels=index_labels)

    index_labels = None
    if with_indices:  # the train shard's rows carry their index (run.make_trainer: feeds.indexed_train)
        dataset = PreparedDataset.open(info["path"], verify=False)
        index_labels = torch.from_numpy(training_labels(dataset, info.get("val_positions"))).to(device)
    # Equal per-worker batches (the config check makes optim.batch_size divide over the workers), equal rows
    # per worker (pipeline.data.feeds.split_data_config): every worker takes the same steps, without DDP's join.
    train = shard_feed("train", per_worker_batch(optim["batch_size"], world), True, index_labels)
    val = shard_feed("val", data["eval_batch_size"], False) if val_keys is not None else None
    return train, val, shard_feed("test", data["eval_batch_size"], False)


def lr_factor(optim: dict[str, Any]):
    """The epoch -> learning-rate factor of ``optim.schedule``, after ``optim.warmup_epochs`` of linear warm-up."""
    epochs, warmup, milestones, gamma = optim["epochs"], optim["warmup_epochs"], optim["milestones"], optim["gamma"]

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        if optim["schedule"] == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
        return gamma ** sum(epoch >= m for m in milestones)

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, optim: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim))


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every worker rank 0's BatchNorm statistics.

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    worker holds statistics updated by its own last batch; evaluating with those would not equal
    evaluating the model that rank 0 checkpoints.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def evaluate(model: torch.nn.Module, feed, transform: InputTransform, split: str = "test") -> dict[str, float]:
    """Top-1/top-5, expected calibration error (15 bins, a fraction) and NLL over a whole split: per-worker
    sums added across workers, so the result equals a single-process evaluation of rank 0's model. Call
    ``broadcast_buffers`` first. In fp32 whatever precision training uses, as teachers are
    (``stkd.training.eval_logits``)."""
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, summed NLL
    bins = torch.zeros(calibration.DEFAULT_BINS, 3, dtype=torch.float64, device=device)
    seen = 0  # on the host: a tensor made from it per batch would be a host-to-device copy each time
    with torch.inference_mode():
        for images, labels in feed.batches(0):
            logits = eval_logits(model, transform.eval_input(images))
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk == labels[:, None]
            nll = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), nll.double()])
            bins += calibration.calibration_bins(logits, labels)
            seen += len(labels)
    seen_t = torch.tensor([float(seen)], dtype=torch.float64, device=device)
    summed = all_reduce_sum(torch.cat([counts, seen_t, bins.flatten()]))
    top1, top5, nll, seen = summed[:4].tolist()
    return {f"{split}/top1": 100 * top1 / seen, f"{split}/top5": 100 * top5 / seen, f"{split}/seen": seen,
            f"{split}/ece": calibration.ece_from_bins(summed[4:].view_as(bins)), f"{split}/nll": nll / seen}


class Selection:
    """The selected epoch: the best by ``val/top1`` (the earliest of equals), or the last epoch when
    there is no validation split. Rank 0 keeps a CPU copy of the selected student's weights."""

    def __init__(self, has_val: bool, state: dict[str, Any] | None = None) -> None:
        self.has_val = has_val
        state = state or {}
        self.epoch = state.get("epoch", -1)
        self.val_top1 = state.get("val_top1", float("-inf"))
        self.test_top1 = state.get("test_top1", float("nan"))
        self.test_ece = state.get("test_ece", float("nan"))
        self.weights = state.get("student")

    def update(self, epoch: int, metrics: dict[str, float], model: torch.nn.Module, rank: int) -> None:
        if self.has_val and not metrics["val/top1"] > self.val_top1:
            return
        self.epoch, self.test_top1, self.test_ece = epoch, metrics["test/top1"], metrics["test/ece"]
        self.val_top1 = metrics.get("val/top1", float("nan"))
        if self.has_val and rank == 0:
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def metrics(self) -> dict[str, float]:
        if self.epoch < 0:  # nothing evaluated yet
            return {}
        out = {"selected/epoch": self.epoch, "selected/test_top1": self.test_top1,
               "selected/test_ece": self.test_ece}
        if self.has_val:
            out["selected/val_top1"] = self.val_top1
        return out

    def state(self, model: torch.nn.Module) -> dict[str, Any]:
        """For the checkpoint; the weights are the current model's when the last epoch is the selected one."""
        weights = self.weights if self.has_val else model.state_dict()
        return {"epoch": self.epoch, "val_top1": self.val_top1, "test_top1": self.test_top1,
                "test_ece": self.test_ece, "student": weights}


@dataclass
class Worker:
    """One worker's share of a run: what its set-up built, and the run's state that checkpoints carry."""

    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    spec: dict[str, Any]
    student: torch.nn.Module  # the module without DDP or compile wrappers: evaluation and checkpoints use it
    method: methods.Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    transform: InputTransform
    amp: precision.Precision
    generators: dict[str, torch.Generator]
    hardware: dict[str, str]  # reported once, as tags
    feeds: tuple  # train, val (None without a validation split), test
    selection: Selection
    history: list[dict[str, float]]
    start_epoch: int
    setup_time_s: float


def set_up(ctx: dict[str, Any], rank: int, world: int) -> Worker:
    """The student, the teacher, the method, the optimiser and the feeds of this worker, resumed from the
    run's checkpoint when there is one."""
    import ray.train
    import ray.train.torch

    setup_start = time.perf_counter()
    config, info = ctx["config"], ctx["dataset_info"]
    train_cfg, optim_cfg = config["train"], config["optim"]
    device = ray.train.torch.get_device()
    seed = train_cfg["seed"]

    torch.manual_seed(seed)  # the same initial student on every worker and every run with this seed
    spec = checkpoint.model_spec(config["model"]["student"], info["num_classes"], info["image_shape"][2])
    precision_name = precision.resolve_for_device(train_cfg["precision"], device)
    channels_last = precision.resolve_channels_last(train_cfg["channels_last"], device.type, precision_name)
    sync_bn = resolve_sync_bn(train_cfg["sync_bn"], device, world, per_worker_batch(optim_cfg["batch_size"], world))
    raw_student = build_student(spec, device, channels_last, sync_bn)
    student = ray.train.torch.prepare_model(raw_student, move_to_device=False,
                                            parallel_strategy_kwargs=ddp_kwargs(sync_bn))
    if train_cfg["compile"]:
        student = torch.compile(student)
    teacher, teacher_name, teacher_weights = shared_teacher(ctx.get("teacher_ref"), device, channels_last)
    # The feeds before the method: CRD's memory bank is sized by, and samples by, the training rows' labels.
    feeds = make_feeds(config, info, rank, world, device)

    hparams = {k: v for k, v in config["method"].items() if k != "name"}
    generators = make_generators(device, seed, rank)
    h, w, c = info["image_shape"]
    needs_indices = methods.method_class(config["method"]["name"]).needs_indices
    train_labels = feeds[0].labels_by_index() if needs_indices else None
    method = methods.create(config["method"]["name"], student, teacher, generator=generators["method"],
                            architectures=(spec["name"], teacher_name), unwrapped_student=raw_student,
                            image_shape=(c, h, w), train_labels=train_labels, **hparams)
    wrap_own_modules(method, functools.partial(ray.train.torch.prepare_model, move_to_device=False))
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=optim_cfg["lr"], momentum=optim_cfg["momentum"],
                                weight_decay=optim_cfg["weight_decay"], nesterov=optim_cfg["nesterov"])
    scheduler = make_scheduler(optimizer, optim_cfg)
    amp = precision.Precision.create(precision_name, device.type)
    hardware = {"hardware.precision": precision_name, "hardware.memory_format":
                "channels_last" if channels_last else "contiguous", "hardware.device": precision.device_description(device)}
    if teacher_weights is not None:  # the object store's copy shared, or this worker's own
        hardware["hardware.teacher_weights"] = teacher_weights
    if rank == 0:
        log.debug("training in %s, %s, on %s", precision_name, hardware["hardware.memory_format"], hardware["hardware.device"])

    start_epoch, history, selection_state = 0, [], None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = restore(directory, raw_student, optimizer, scheduler, generators, rank, amp.scaler, method)
        start_epoch, history, selection_state = state["epoch"] + 1, state["history"], state["selection"]
        log.info("rank %d resumed from epoch %d", rank, state["epoch"])

    return Worker(config, rank, world, device, spec, raw_student, method, optimizer, scheduler,
                  InputTransform.from_config(config, info, generators["augment"], channels_last), amp, generators,
                  hardware, feeds, Selection(feeds[1] is not None, selection_state), history, start_epoch,
                  time.perf_counter() - setup_start)


def wrap_own_modules(method: methods.Method, wrap) -> None:
    """The method's own modules (FitNet's regressor) made data-parallel as the student is (``wrap``: Ray
    Train's ``prepare_model``, DDP with more than one worker), so their gradients are all-reduced too and
    every worker keeps the same regressor."""
    for name, module in method.own_modules().items():
        setattr(method, name, wrap(module))


def shared_teacher(teacher_ref, device: torch.device,
                   channels_last: bool) -> tuple[torch.nn.Module | None, str | None, str | None]:
    """The teacher from the one copy in Ray's object store, its architecture's name, and how it holds the
    shared weights (``teachers.holding``: zero-copy on the CPU in contiguous format; each worker's own copy
    on a GPU or in channels_last); (None, None, None) for a CE student."""
    import ray

    if teacher_ref is None:
        return None, None, None
    shared = ray.get(teacher_ref)
    teacher = teacher_store.build(shared["spec"], shared["arrays"], device)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher, shared["spec"]["name"], teacher_store.holding(teacher, shared["arrays"])


def train_epoch(w: Worker, epoch: int) -> dict[str, float]:
    """One epoch over this worker's shard; the epoch's metrics, summed over every worker."""
    w.method.set_epoch(epoch)
    w.method.train()
    lr = w.optimizer.param_groups[0]["lr"]
    sums = EpochSums(w.method.term_names(), w.device)
    start = time.perf_counter()
    # Every worker takes the same steps (pipeline.data.feeds), so no DDP join, whose shadow all-reduces
    # cannot stand in for SyncBatchNorm's collectives (a worker out of data would hang the others).
    for batch in w.feeds[0].batches(epoch):  # (images, labels), and indices for a method that needs them
        train_batch(w.method, w.optimizer, w.transform, batch[0], batch[1], w.amp, sums, *batch[2:])
    w.scheduler.step()
    if w.device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - start

    totals = sums.totals()
    total_seen = totals[-1]
    metrics = {f"loss/{k}": totals[i] / total_seen for i, k in enumerate(sums.names)}
    metrics["loss/total"] = sum(metrics.values())
    # workers: the world size this epoch trained with (an elastic run, train.workers: [min, max], shows here
    # when it went on with fewer); the global batch is optim.batch_size at every size (make_feeds).
    metrics.update({"train/acc": 100 * totals[-2] / total_seen, "lr": lr, "epoch_time_s": train_time,
                    "images_per_s": total_seen / train_time, "workers": w.world, "epoch": epoch})
    if w.amp.scaler is not None:
        metrics["fp16/skipped_steps"] = totals[-3]  # summed over workers: inf/nan gradients, step skipped
        metrics["fp16/loss_scale"] = w.amp.scaler.get_scale()
    return metrics


def evaluate_epoch(w: Worker, epoch: int) -> dict[str, float]:
    """Validation and test metrics of this epoch, and the selection they update."""
    start = time.perf_counter()
    _, val_feed, test_feed = w.feeds
    broadcast_buffers(w.student)
    metrics: dict[str, float] = {}
    if val_feed is not None:
        metrics.update(evaluate(w.student, val_feed, w.transform, "val"))
    metrics.update(evaluate(w.student, test_feed, w.transform, "test"))
    w.selection.update(epoch, metrics, w.student, w.rank)
    metrics["eval_time_s"] = time.perf_counter() - start
    return metrics


def checkpoint_state(w: Worker, epoch: int, stopped: bool) -> dict[str, Any]:
    """Everything a resumed run needs to go on as if it had not stopped."""
    return {"model": w.spec, "student": w.student.state_dict(), "optimizer": w.optimizer.state_dict(),
            "scheduler": w.scheduler.state_dict(), "epoch": epoch, "history": w.history,
            "scaler": w.amp.scaler.state_dict() if w.amp.scaler is not None else None,
            "selection": w.selection.state(w.student), "method": w.method.own_state_dict(),
            "rng": gather_rng_states(w.generators, w.world, w.device), "config_name": w.config["name"],
            "stopped": stopped}


def train_loop_per_worker(ctx: dict[str, Any]) -> None:
    """Ray Train entry point. ``ctx``: config, dataset info, teacher ObjectRef."""
    import ray.train

    context = ray.train.get_context()
    monitor = system_metrics.start_in_worker(ctx, context.get_local_rank())  # one per node: its CPU, memory, GPUs
    w = set_up(ctx, context.get_world_rank(), context.get_world_size())
    epochs, every = w.config["optim"]["epochs"], w.config["train"]["checkpoint_every"]
    for epoch in range(w.start_epoch, epochs):
        metrics = train_epoch(w, epoch)
        last = epoch == epochs - 1
        if (epoch + 1) % w.config["data"]["eval_every"] == 0 or last:
            metrics.update(evaluate_epoch(w, epoch))
        metrics.update(w.selection.metrics())
        if epoch == w.start_epoch:
            metrics["setup_time_s"] = w.setup_time_s  # model, teacher and data on the worker, once per run
        w.history.append(dict(metrics))
        report = {**metrics, **w.hardware} if epoch == w.start_epoch else metrics  # strings: tags (epoch_logger)

        stop = not last and stop_asked(ctx.get("stop_file"), w.device)
        if (epoch + 1) % every == 0 or last or stop:
            report_with_checkpoint(report, checkpoint_state(w, epoch, stop), w.rank)
        else:
            ray.train.report(report)
        if stop:
            log.info("rank %d: stopped after epoch %d on the driver's request", w.rank, epoch)
            break
        if w.rank == 0:  # the driver prints each epoch (pipeline.tracking.console); this is for the worker's log file
            log.debug("epoch %d/%d %s", epoch + 1, epochs,
                      " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
    system_metrics.stop(monitor)


def gather_rng_states(generators: dict[str, torch.Generator], world: int, device: torch.device) -> dict:
    """Every worker's generator states (CPU ByteTensors, per key a list by rank) and the device type
    they draw on, so a resumed run draws what an uninterrupted one would."""
    states = {key: generator.get_state() for key, generator in generators.items()}
    if not (dist.is_available() and dist.is_initialized()) or world == 1:
        return {"device": device.type, **{k: [v] for k, v in states.items()}}
    out: dict[str, Any] = {"device": device.type}
    for key, state in states.items():
        gathered = [torch.empty_like(state) for _ in range(world)]
        if device.type == "cuda":
            gathered_dev = [torch.empty_like(state, device=device) for _ in range(world)]
            dist.all_gather(gathered_dev, state.to(device))
            gathered = [g.cpu() for g in gathered_dev]
        else:
            dist.all_gather(gathered, state)
        out[key] = gathered
    return out


def map_tensors(value: Any, fn) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through dicts, lists and tuples (types kept)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = [map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def state_to_cpu(state: Any) -> Any:
    """A training state with every tensor on the CPU (weights, optimizer moments, scaler): a checkpoint
    of CUDA tensors loads only where that GPU exists, unless every reader passes ``map_location``. CPU
    tensors are kept as they are; ``load_state_dict`` copies them back to where the parameters live."""
    return map_tensors(state, lambda t: t if t.device.type == "cpu" else t.detach().to("cpu"))


def report_with_checkpoint(metrics: dict[str, float], state: dict[str, Any], rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint_obj = None
        if rank == 0:
            start = time.perf_counter()
            checkpoint.save(state_to_cpu(state), directory)
            checkpoint_obj = ray.train.Checkpoint.from_directory(directory)
            metrics = {**metrics, "checkpoint_time_s": time.perf_counter() - start}
        ray.train.report(metrics, checkpoint=checkpoint_obj)
