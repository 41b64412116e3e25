"""CRD (stkd/crd.py, stkd.methods.CRD): the NCE loss, the scores and the memory bank's update worked by hand
on tensors small enough to check on paper; negatives from other classes; a training step's gradients; the
banks through a checkpoint and a resumed run; two gloo ranks that keep one bank; the config check."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stkd import crd, methods, models
from test_feature_methods import Wrapper  # stands in for DDP

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the pieces, by hand --------------------------------------------------------------------------------------

def test_embed_is_a_linear_map_then_the_l2_norm():
    embed = crd.Embed(3, 2)
    with torch.no_grad():
        embed.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        embed.linear.bias.zero_()
    # (1, 2, 5) -> (1, 4) -> (1, 4) / sqrt(17); a (N, C, 1, 1) feature is flattened first
    x = torch.tensor([[1.0, 2.0, 5.0]])
    torch.testing.assert_close(embed(x), torch.tensor([[1.0, 4.0]]) / math.sqrt(17))
    torch.testing.assert_close(embed(x.view(1, 3, 1, 1)), embed(x))


def test_nce_loss_by_hand():
    # K = 2 negatives, n_data = 4: the noise term K * Pn = 2 / 4 = 0.5
    scores = torch.tensor([[0.5, 0.1, 0.2], [1.5, 0.5, 0.0]])
    eps = 1e-7
    row0 = math.log(0.5 / (1.0 + eps)) + math.log(0.5 / (0.6 + eps)) + math.log(0.5 / (0.7 + eps))
    row1 = math.log(1.5 / (2.0 + eps)) + math.log(0.5 / (1.0 + eps)) + math.log(0.5 / (0.5 + eps))
    assert crd.nce_loss(scores, 4).item() == pytest.approx(-(row0 + row1) / 2, rel=1e-6)


def unit_bank(memory: crd.ContrastMemory, student_rows, teacher_rows) -> None:
    with torch.no_grad():
        memory.student_bank.copy_(torch.tensor(student_rows))
        memory.teacher_bank.copy_(torch.tensor(teacher_rows))


def small_memory() -> crd.ContrastMemory:
    """feat_dim 2, four images, T = 0.5, momentum 0.5; banks of unit vectors easy to score by hand."""
    memory = crd.ContrastMemory(2, 4, temperature=0.5, momentum=0.5)
    unit_bank(memory, student_rows=[[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [0.6, 0.8]],
              teacher_rows=[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]])
    return memory


def test_scores_are_exp_of_the_dot_product_over_t_divided_by_the_first_batch_z():
    memory = small_memory()
    v_s, v_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    contrast = torch.tensor([[0, 1, 2]])  # the image's own row, then two negatives
    out_s, out_t = memory(v_s, v_t, torch.tensor([0]), contrast)
    # student-anchored: v_s . teacher rows 0, 1, 2 = 1, 0, -1 -> exp(2), exp(0), exp(-2); Z = mean x n_data
    raw_s = [math.exp(2), 1.0, math.exp(-2)]
    z_s = sum(raw_s) / 3 * 4
    torch.testing.assert_close(out_s, torch.tensor([[r / z_s for r in raw_s]]))
    # teacher-anchored: v_t . student rows 0, 1, 2 = 1, 0, -1 as well
    torch.testing.assert_close(out_t, out_s)
    torch.testing.assert_close(memory.normalizers, torch.tensor([z_s, z_s]))


def test_z_is_set_by_the_first_batch_only():
    memory = small_memory()
    memory(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), torch.tensor([[0, 1, 2]]))
    z = memory.normalizers.clone()
    out_s, _ = memory(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([3]),
                      torch.tensor([[3, 0, 1]]))
    torch.testing.assert_close(memory.normalizers, z)
    # teacher rows 3, 0, 1 against (0, 1): 0.6; row 0, which the first batch moved to (1, 1) / sqrt 2, 1 / sqrt 2;
    # 1; over T = 0.5, divided by the first batch's Z
    torch.testing.assert_close(out_s, torch.tensor([[math.exp(1.2), math.exp(math.sqrt(2)), math.exp(2.0)]]) / z[0])


def test_the_banks_move_toward_the_batch_with_momentum_and_are_renormalised():
    memory = small_memory()
    before_s, before_t = memory.student_bank.clone(), memory.teacher_bank.clone()
    v_s, v_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    memory(v_s, v_t, torch.tensor([0]), torch.tensor([[0, 1, 2]]))
    # student row 0: normalize(0.5 * (0, 1) + 0.5 * (1, 0)) = (1, 1) / sqrt 2; teacher row 0 from (1, 0) to v_t alike
    torch.testing.assert_close(memory.student_bank[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(memory.teacher_bank[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(memory.student_bank[1:], before_s[1:], msg="only the batch's rows move")
    torch.testing.assert_close(memory.teacher_bank[1:], before_t[1:])


def test_the_scores_read_the_banks_before_this_batch_updates_them():
    memory = small_memory()
    v_s = torch.tensor([[0.6, 0.8]])
    out_s, _ = memory(v_s, torch.tensor([[0.8, 0.6]]), torch.tensor([3]), torch.tensor([[3, 3, 3]]))
    # teacher row 3 was (0.8, 0.6): 0.48 + 0.48 = 0.96 over T = 0.5; every column the same row, so Z = 4 x it
    assert out_s[0, 0].item() == pytest.approx(1 / 4, rel=1e-6)


def test_the_sampler_puts_the_image_first_then_negatives_of_other_classes_only():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    sampler = crd.ContrastSampler(labels)
    indices = torch.tensor([0, 3, 4])
    g = torch.Generator().manual_seed(0)
    drawn = sampler.draw(labels[indices], indices, 2000, g)
    assert drawn.shape == (3, 2001)
    assert torch.equal(drawn[:, 0], indices)
    for row, label in zip(drawn, labels[indices]):
        negatives = row[1:]
        assert (labels[negatives] != label).all(), "never an image of the anchor's class"
        others = set(torch.nonzero(labels != label).flatten().tolist())
        assert set(negatives.tolist()) == others, "every image of another class can be drawn"
        counts = torch.bincount(negatives, minlength=len(labels))[sorted(others)].float()
        assert counts.min() / counts.max() > 0.8, "uniformly"


def test_the_sampler_needs_two_classes():
    with pytest.raises(ValueError, match="at least two classes"):
        crd.ContrastSampler(torch.zeros(5, dtype=torch.long))


# --- the method ----------------------------------------------------------------------------------------------

def zoo(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, 10)


LABELS = torch.arange(40) % 10  # 40 training images, four of each class


def crd_method(student=None, teacher=None, generator=None, **hparams):
    student = student or zoo("resnet8", 0)
    teacher = teacher or zoo("resnet20", 1)
    torch.manual_seed(2)
    hparams = {"nce_k": 16, "feat_dim": 8, **hparams}
    return methods.create("crd", student, teacher, generator, architectures=("resnet8", "resnet20"),
                          image_shape=(3, 32, 32), train_labels=LABELS, **hparams)


def generator_at(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


def classifier_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a CIFAR ResNet's ``fc`` reads in one forward, taken with the test's own hook."""
    kept = []
    handle = model.fc.register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return kept[0]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([3, 17, 22, 38])
    return torch.randn(4, 3, 32, 32, generator=g), LABELS[indices], indices


def test_crd_is_ce_plus_08_times_nce_both_ways_on_the_pooled_embeddings(batch):
    x, y, indices = batch
    g = torch.Generator().manual_seed(5)
    m = crd_method(generator=g)
    m.eval()  # BatchNorm in eval: the test's own forwards below see the same features
    student_bank, teacher_bank = m.memory.student_bank.clone(), m.memory.teacher_bank.clone()
    state = g.get_state()
    _, terms = m.forward_train(x, y, indices=indices)

    contrast = m.sampler.draw(y, indices, 16, generator_at(state))
    with torch.no_grad():
        pooled_s, pooled_t = classifier_input(m.student, x), classifier_input(m.teacher, x)
        v_s = F.normalize(pooled_s @ m.embed_s.linear.weight.T + m.embed_s.linear.bias)
        v_t = F.normalize(pooled_t @ m.embed_t.linear.weight.T + m.embed_t.linear.bias)
    raw_s = torch.exp(torch.einsum("bkd,bd->bk", teacher_bank[contrast], v_s) / 0.07)
    raw_t = torch.exp(torch.einsum("bkd,bd->bk", student_bank[contrast], v_t) / 0.07)
    z_s, z_t = raw_s.mean() * 40, raw_t.mean() * 40

    def nce(p):  # Eq. 18 with noise 1 / n_data and K = 16
        noise = 16 / 40
        return -(torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7)).sum()
                 + torch.log(noise / (p[:, 1:] + noise + 1e-7)).sum()) / len(p)

    expected = 0.8 * (nce(raw_s / z_s) + nce(raw_t / z_t))
    assert terms["crd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(m.student(x), y).item(), rel=1e-5)
    assert set(terms) == set(m.term_names()) == {"ce", "crd"}


def test_kd_weight_adds_hintons_term(batch):
    x, y, indices = batch
    m = crd_method(kd_weight=0.5, temperature=2.0)
    m.eval()
    logits, terms = m.forward_train(x, y, indices=indices)
    p_t = F.softmax(m.teacher(x) / 2, 1)
    expected = 0.5 * 4 * F.kl_div(F.log_softmax(logits / 2, 1), p_t, reduction="batchmean")
    assert set(terms) == set(m.term_names()) == {"ce", "crd", "kd"}
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_train_step_trains_student_and_embeddings_and_never_the_teacher(batch):
    x, y, indices = batch
    m = crd_method()
    m.train()
    student, teacher = m.student, m.teacher
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == {id(p) for p in [*student.parameters(), *m.embed_s.parameters(), *m.embed_t.parameters()]}
    assert not list(m.memory.parameters()), "the banks are buffers, never optimised"
    optimizer = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    _, terms = m.forward_train(x, y, indices=indices)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in [*m.embed_s.parameters(), *m.embed_t.parameters()])
    assert all(p.grad is not None for p in student.layer3.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimizer.step()
    assert not teacher.training


def test_bad_construction_and_hyperparameters_are_refused():
    s, t = zoo("resnet8", 0), zoo("resnet20", 1)
    with pytest.raises(ValueError, match="give train_labels"):
        methods.create("crd", s, t, architectures=("resnet8", "resnet20"), image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"give image_shape=\(C, H, W\)"):
        methods.create("crd", s, t, architectures=("resnet8", "resnet20"), train_labels=LABELS)
    for key, value, message in (("nce_k", 1.5, "nce_k must be a whole number"), ("nce_k", 0, "nce_k must be > 0"),
                                ("feat_dim", 0, "feat_dim must be > 0"), ("nce_t", 0.0, "nce_t must be > 0"),
                                ("nce_momentum", 1.0, r"nce_momentum must be in \[0, 1\)"),
                                ("crd_weight", -1.0, "crd_weight must be >= 0")):
        with pytest.raises(ValueError, match=message):
            methods.check_hparam(methods.CRD, key, value)
    m = crd_method()
    with pytest.raises(ValueError, match=r"forward_train\(x, y, indices=...\)"):
        m.forward_train(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))


def test_the_published_settings_are_the_defaults():
    assert methods.hparam_defaults("crd") == {"ce_weight": 1.0, "crd_weight": 0.8, "kd_weight": 0.0,
                                              "temperature": 4.0, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                                              "nce_momentum": 0.5}




def test_the_banks_and_embeddings_go_through_a_checkpoint_and_out_of_a_wrapper(batch, tmp_path):
    from pipeline.train import checkpoint

    x, y, indices = batch
    trained = crd_method()
    trained.train()
    for step in range(2):
        trained.forward_train(x, y, indices=indices + step)
    checkpoint.save({"model": checkpoint.model_spec("resnet8", 10, 3), "student": trained.student.state_dict(),
                     "method": trained.own_state_dict()}, tmp_path)
    saved = checkpoint.load(tmp_path, map_location="cpu")["method"]
    assert set(saved) == {"embed_s", "embed_t", "memory"}
    assert set(saved["memory"]) == {"student_bank", "teacher_bank", "normalizers"}, "the sampler follows the labels"

    fresh = crd_method(student=zoo("resnet8", 0))
    fresh.embed_s, fresh.embed_t = Wrapper(fresh.embed_s), Wrapper(fresh.embed_t)  # as data-parallel wraps them
    fresh.load_own_state_dict(saved)
    fresh.student.load_state_dict(checkpoint.load(tmp_path)["student"])  # the BatchNorm statistics of the steps
    for key in ("student_bank", "teacher_bank", "normalizers"):
        assert torch.equal(getattr(fresh.memory, key), getattr(trained.memory, key)), key
    trained.eval(), fresh.eval()
    g_state = torch.Generator().manual_seed(9).get_state()
    trained.generator, fresh.generator = generator_at(g_state), generator_at(g_state)
    a = trained.forward_train(x, y, indices=indices)[1]["crd"]
    b = fresh.forward_train(x, y, indices=indices)[1]["crd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6), "restored Z is kept, not estimated again"


def uint8_data(n: int = 40, size: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g), LABELS[:n].clone()


class Run:
    """A worker's student, CRD method, optimiser and in-memory training feed with indices."""

    def __init__(self, device: torch.device = CPU):
        from pipeline.data.feeds import InMemoryFeed
        from pipeline.train.worker_loop import InputTransform, build_student, make_generators, make_scheduler
        from pipeline.train import checkpoint

        torch.manual_seed(0)
        self.device = device
        self.student = build_student(checkpoint.model_spec("resnet8", 10, 3), device, False, sync_bn=False)
        torch.manual_seed(100)
        teacher = models.create("resnet8", 10).to(device)
        images, labels = uint8_data()
        self.feed = InMemoryFeed(images, labels, 8, 0, 1, device, shuffle=True, seed=0, with_indices=True)
        self.generators = make_generators(device, 0, rank=0)
        self.method = methods.create("crd", self.student, teacher, generator=self.generators["method"],
                                     architectures=("resnet8", "resnet8"), image_shape=(3, 16, 16),
                                     train_labels=self.feed.labels_by_index(), nce_k=16, feat_dim=8)
        self.optimizer = torch.optim.SGD(self.method.trainable_parameters(), lr=0.1, momentum=0.9)
        self.scheduler = make_scheduler(self.optimizer, {"epochs": 4, "warmup_epochs": 0, "milestones": [2],
                                                         "gamma": 0.1, "schedule": "multistep"})
        self.transform = InputTransform([0.5] * 3, [0.25] * 3, 2, True, False, self.generators["augment"])
        self.method.train()

    def epoch(self, epoch: int) -> None:
        from stkd.precision import Precision

        self.steps(list(self.feed.batches(epoch)), Precision.create("fp32", self.device.type))

    def steps(self, batches, amp) -> None:
        from pipeline.train.worker_loop import EpochSums, train_batch

        sums = EpochSums(self.method.term_names(), self.device)
        for batch in batches:
            train_batch(self.method, self.optimizer, self.transform, batch[0], batch[1], amp, sums, *batch[2:])

    def state(self) -> dict:
        from pipeline.train import checkpoint
        from pipeline.train.worker_loop import gather_rng_states

        return {"model": checkpoint.model_spec("resnet8", 10, 3), "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": gather_rng_states(self.generators, 1, self.device), "method": self.method.own_state_dict()}


def test_an_epoch_from_the_in_memory_feed_updates_every_bank_row_once():
    run = Run()
    before = run.method.memory.student_bank.clone()
    run.epoch(0)
    changed = (run.method.memory.student_bank != before).any(1)
    assert changed.all(), "every training image's row, by the index its batch carried"


def test_an_interrupted_and_resumed_crd_run_equals_an_uninterrupted_one(tmp_path):
    from pipeline.train import checkpoint
    from pipeline.train.worker_loop import restore

    whole = Run()
    for epoch in range(2):
        whole.epoch(epoch)
    first = Run()
    first.epoch(0)
    checkpoint.save(first.state(), tmp_path)
    resumed = Run()  # a fresh worker: same seeds, so only the checkpoint can give it the banks after epoch 0
    restore(str(tmp_path), resumed.student, resumed.optimizer, resumed.scheduler, resumed.generators, rank=0,
            method=resumed.method)
    resumed.epoch(1)
    for key in ("student_bank", "teacher_bank", "normalizers"):
        assert torch.equal(getattr(whole.method.memory, key), getattr(resumed.method.memory, key)), key
    for (key, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU-only check)")
def test_a_crd_step_on_cuda_never_waits_for_the_gpu():
    """One process: sampling, scores, NCE and the banks' update stay on the device (the first step reads Z's
    state once). Batches are taken from the feed first: its permutation is drawn on the host."""
    from stkd.precision import Precision

    run = Run(torch.device("cuda"))
    amp = Precision.create("bf16", "cuda")
    run.steps(list(run.feed.batches(0))[:1], amp)
    batches = list(run.feed.batches(1))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.steps(batches, amp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(run.method.memory.student_bank).all()


# --- several ranks ---------------------------------------------------------------------------------------------

def crd_on_ranks(rank: int, world: int, store: str, out: str) -> None:
    """One of ``world`` gloo ranks: a DDP student, CRD's embeddings wrapped as the worker wraps them, ranks with
    unequal batches of their own images; rank 0 writes every rank's banks and one gather to ``out``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.train.worker_loop import wrap_own_modules

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # each rank its own initial banks: the first forward must give all rank 0's
        student, teacher = zoo("resnet8", 0), zoo("resnet20", 1)
        torch.manual_seed(10 + rank)
        m = methods.create("crd", DDP(student), teacher, torch.Generator().manual_seed(rank),
                           architectures=("resnet8", "resnet20"), unwrapped_student=student,
                           image_shape=(3, 32, 32), train_labels=LABELS, nce_k=16, feat_dim=8)
        wrap_own_modules(m, DDP)
        optimizer = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
        m.train()
        g = torch.Generator().manual_seed(rank)
        for step in range(2):
            indices = torch.arange(rank * 3, rank * 3 + 3 - rank) + 20 * step  # 3 rows on rank 0, 2 on rank 1
            _, terms = m.forward_train(torch.randn(len(indices), 3, 32, 32, generator=g), LABELS[indices],
                                       indices=indices)
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
        banks = torch.cat([m.memory.student_bank.flatten(), m.memory.teacher_bank.flatten(), m.memory.normalizers])
        gathered = [torch.zeros_like(banks) for _ in range(world)]
        dist.all_gather(gathered, banks)
        parts = crd.gather_across_ranks(torch.arange(2 - rank) + 10 * rank, torch.full((2 - rank, 2), float(rank)))
        if rank == 0:
            torch.save({"banks": gathered, "gather": parts}, out)
        # Both ranks leave together: a rank that tears its gloo pairs down while the other still uses them can
        # abort ("terminate called without an active exception", seen once in a full suite run).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown. Rank 1 aborted there in two full suite runs (SIGABRT,
    # "terminate called without an active exception") after the barrier and the group's destruction, its work
    # done and written; passing alone every time, the cause not found. An error above still fails the rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_data_parallel_ranks_keep_one_memory_bank(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "banks.pt"
    mp.spawn(crd_on_ranks, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    result = torch.load(out)
    rank0, rank1 = result["banks"]
    assert torch.equal(rank0, rank1), "every rank updates its banks with every rank's rows"
    indices, rows = result["gather"]
    assert indices.tolist() == [0, 1, 10] and rows.tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]


# --- the config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_crd_validates_on_both_feeds_with_its_defaults(tmp_path, in_memory):
    from pipeline import config as config_lib

    cfg = config_lib.load("test_tiny", [f"data.path={tmp_path}", "method.name=crd", "teacher.source=some-teacher",
                                        f"data.in_memory={in_memory}"])
    assert cfg["method"] == {"name": "crd", **methods.hparam_defaults("crd")}
    with pytest.raises(config_lib.ConfigError, match="nce_momentum must be in"):
        config_lib.load("test_tiny", [f"data.path={tmp_path}", "method.name=crd", "teacher.source=some-teacher",
                                      "method.nce_momentum=1.5"])
