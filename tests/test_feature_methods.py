"""Feature-based methods (``at``) on zoo models: the loss worked by hand from the stage outputs, the stages
compared, the hooks on a wrapped student, and what reaches the optimiser."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stkd import methods, models


def zoo(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, 10)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def outputs_of(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the named submodules in one forward, taken with the test's own hooks."""
    kept, modules = {}, dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: kept.__setitem__(n, out)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [kept[n] for n in names]


def by_hand(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> float:
    """Zagoruyko & Komodakis' AT as RepDistiller's Attention.at_loss writes it, stage by stage."""
    total = 0.0
    for fs, ft in zip(student_maps, teacher_maps):
        if fs.shape[2] > ft.shape[2]:
            fs = F.adaptive_avg_pool2d(fs, ft.shape[2:])
        elif ft.shape[2] > fs.shape[2]:
            ft = F.adaptive_avg_pool2d(ft, fs.shape[2:])
        a_s, a_t = (F.normalize(f.pow(2).mean(1).view(f.size(0), -1)) for f in (fs, ft))
        total += (a_s - a_t).pow(2).mean().item()
    return total


def test_at_is_ce_plus_1000_times_the_attention_loss_of_every_stage_pair(batch):
    x, y = batch
    student, teacher = zoo("resnet8", 0), zoo("resnet20", 1)
    m = methods.create("at", student, teacher, architectures=("resnet8", "resnet20"))
    m.eval()  # BatchNorm in eval on both sides: the test's own forwards see the same statistics
    logits, terms = m.forward_train(x, y)
    stages = ["layer1", "layer2", "layer3"]
    expected = 1000.0 * by_hand(outputs_of(student, stages, x), outputs_of(teacher, stages, x))
    assert terms["at"].item() == pytest.approx(expected, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-5)
    assert expected > 0


def test_the_stages_are_repdistillers_feat_1_to_minus_1():
    assert methods.attention_stages("resnet8") == ("layer1", "layer2", "layer3")
    assert methods.attention_stages("wrn_16_2") == ("block1", "block2", "block3")
    assert methods.attention_stages("vgg8") == ("block1", "block2", "block3", "block4"), "vgg's f0 is block0"
    assert methods.attention_stages("MobileNetV2") == ("blocks.1", "blocks.2", "blocks.4", "blocks.6")


def test_maps_of_different_sizes_are_pooled_to_the_smaller(batch):
    x, y = batch
    student, teacher = zoo("vgg8", 0), zoo("MobileNetV2", 1)  # RepDistiller's vgg13 -> MobileNetV2 pair shape
    m = methods.create("at", student, teacher, architectures=("vgg8", "MobileNetV2"))
    m.eval()
    _, terms = m.forward_train(x, y)
    s = outputs_of(student, list(methods.attention_stages("vgg8")), x)
    t = outputs_of(teacher, list(methods.attention_stages("MobileNetV2")), x)
    assert any(a.shape[2] != b.shape[2] for a, b in zip(s, t)), "the pair must exercise the pooling"
    assert terms["at"].item() == pytest.approx(1000.0 * by_hand(s, t), rel=1e-4)


class Wrapper(nn.Module):
    """Stands in for DDP or torch.compile: the forward goes through it, the stages live in ``module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_a_wrapped_student_is_tapped_through_its_unwrapped_module(batch):
    x, y = batch
    student, teacher = zoo("resnet8", 0), zoo("resnet20", 1)
    plain = methods.create("at", student, teacher, architectures=("resnet8", "resnet20"))
    wrapped = methods.create("at", Wrapper(student), teacher, architectures=("resnet8", "resnet20"),
                             unwrapped_student=student)
    plain.eval(), wrapped.eval()
    assert wrapped.forward_train(x, y)[1]["at"].item() == pytest.approx(plain.forward_train(x, y)[1]["at"].item())


def test_gradients_reach_the_student_only(batch):
    x, y = batch
    student, teacher = zoo("resnet8", 0), zoo("resnet20", 1)
    m = methods.create("at", student, teacher, architectures=("resnet8", "resnet20"))
    m.train()
    _, terms = m.forward_train(x, y)
    terms["at"].backward()
    assert all(p.grad is not None for p in student.layer1.parameters()), "AT's gradient reaches the early stages"
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in student.parameters()}


def test_bad_construction_is_refused_with_what_to_give():
    with pytest.raises(ValueError, match=r"give architectures=\(student_name, teacher_name\)"):
        methods.create("at", zoo("resnet8", 0), zoo("resnet20", 1))
    with pytest.raises(ValueError, match="resnet8 has 3.*ResNet50 has 4"):
        methods.create("at", zoo("resnet8", 0), zoo("ResNet50", 1), architectures=("resnet8", "ResNet50"))
    with pytest.raises(ValueError, match="at_weight must be >= 0"):
        methods.create("at", zoo("resnet8", 0), zoo("resnet20", 1), architectures=("resnet8", "resnet20"),
                       at_weight=-1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        methods.create("at", zoo("resnet8", 0), architectures=("resnet8", "resnet20"))


def test_bf16_autocast_keeps_the_loss_in_float32(batch):
    x, y = batch
    m = methods.create("at", zoo("resnet8", 0), zoo("resnet20", 1), architectures=("resnet8", "resnet20"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = m.forward_train(x, y)
    loss = sum(terms.values())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


# FitNet: the hint through a regressor the method trains beside the student.

def fitnet(student_name="resnet8", teacher_name="resnet20", **kwargs):
    student, teacher = zoo(student_name, 0), zoo(teacher_name, 1)
    return student, teacher, methods.create("fitnet", student, teacher, architectures=(student_name, teacher_name),
                                            image_shape=(3, 32, 32), **kwargs)


def test_fitnet_is_ce_plus_100_times_the_mse_of_the_regressed_hint(batch):
    x, y = batch
    student, teacher, m = fitnet("resnet8", "resnet32x4")
    m.eval()
    _, terms = m.forward_train(x, y)
    [s], [t] = outputs_of(student, ["layer2"], x), outputs_of(teacher, ["layer2"], x)
    with torch.no_grad():
        expected = 100.0 * F.mse_loss(m.regressor(s), t).item()
    assert terms["hint"].item() == pytest.approx(expected, rel=1e-5)
    assert tuple(m.regressor(s).shape) == tuple(t.shape) == (4, 128, 16, 16), "resnet8's 32 channels to 128"


def test_the_hint_is_repdistillers_feat_2():
    assert methods.hint_stage("resnet8") == "layer2"
    assert methods.hint_stage("wrn_40_2") == "block2"
    assert methods.hint_stage("vgg13") == "block2"  # feat[2]: vgg's f0 is block0, f2 block2
    assert methods.hint_stage("MobileNetV2") == "blocks.2"


def test_the_regressor_trains_with_the_student_and_the_teacher_stays_frozen(batch):
    x, y = batch
    student, teacher, m = fitnet()
    m.train()
    assert m.regressor.training and not teacher.training
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == {id(p) for p in [*student.parameters(), *m.regressor.parameters()]}
    _, terms = m.forward_train(x, y)
    terms["hint"].backward()
    assert all(p.grad is not None for p in m.regressor.parameters())
    assert all(p.grad is not None for p in student.layer2.parameters())
    assert all(p.grad is None for p in student.layer3.parameters()), "the hint reads layer2: nothing after it"
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_the_regressor_state_goes_through_a_checkpoint_and_out_of_a_wrapper(batch):
    x, y = batch
    _, _, trained = fitnet()
    with torch.no_grad():
        for p in trained.regressor.parameters():
            p.add_(0.5)
    saved = trained.own_state_dict()
    _, _, fresh = fitnet()
    fresh.regressor = Wrapper(fresh.regressor)  # as data-parallel training wraps it
    fresh.load_own_state_dict(saved)
    trained.eval(), fresh.eval()
    assert fresh.forward_train(x, y)[1]["hint"].item() == pytest.approx(trained.forward_train(x, y)[1]["hint"].item())
    assert set(fresh.own_state_dict()["regressor"]) == set(saved["regressor"]), "keys without the wrapper's prefix"


def test_fitnet_without_the_image_shape_is_refused():
    with pytest.raises(ValueError, match=r"give image_shape=\(C, H, W\)"):
        methods.create("fitnet", zoo("resnet8", 0), zoo("resnet20", 1), architectures=("resnet8", "resnet20"))


def test_methods_without_modules_of_their_own_checkpoint_nothing_extra():
    m = methods.create("kd", zoo("resnet8", 0), zoo("resnet20", 1))
    assert m.own_modules() == {} and m.own_state_dict() == {}


def train_fitnet_on_two_ranks(rank: int, store: str, wrap: bool, out: str) -> None:
    """One of two gloo ranks: a DDP student, FitNet's regressor wrapped as the worker wraps it (or not),
    two SGD steps on this rank's own batches; rank 0 writes both ranks' regressor weights to ``out``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.train.worker_loop import wrap_own_modules

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        student, teacher = zoo("resnet8", 0), zoo("resnet20", 1)
        m = methods.create("fitnet", DDP(student), teacher, architectures=("resnet8", "resnet20"),
                           unwrapped_student=student, image_shape=(3, 32, 32))
        if wrap:
            wrap_own_modules(m, DDP)
        optimizer = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)  # each rank its own data, as each worker its own shard
        m.train()
        for _ in range(2):
            _, terms = m.forward_train(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
        weights = torch.cat([p.detach().flatten() for p in methods.unwrap(m.regressor).parameters()])
        gathered = [torch.zeros_like(weights) for _ in range(2)]
        dist.all_gather(gathered, weights)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped", "control-unwrapped"])
def test_data_parallel_ranks_keep_one_regressor_only_when_it_is_wrapped(wrap, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "weights.pt"
    mp.spawn(train_fitnet_on_two_ranks, args=(str(tmp_path / "store"), wrap, str(out)), nprocs=2)
    rank0, rank1 = torch.load(out)
    assert torch.equal(rank0, rank1) is wrap, "without the wrap each rank's regressor follows its own data"
