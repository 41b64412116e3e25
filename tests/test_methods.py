import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stkd import methods
from stkd.losses import kd_loss


def tiny_net(seed: int, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, classes),
    )


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


class Recorder:
    """Records the input each forward call of a module receives."""

    def __init__(self, module: nn.Module):
        self.inputs = []
        module.register_forward_hook(lambda m, args, out: self.inputs.append(args[0].detach().clone()))


def test_ce_is_cross_entropy_and_refuses_a_teacher(batch):
    x, y = batch
    m = methods.create("ce", tiny_net(0))
    logits, terms = m.forward_train(x, y)
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item())
    with pytest.raises(ValueError, match="no teacher"):
        methods.create("ce", tiny_net(0), tiny_net(1))


def test_kd_terms(batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create("kd", student, teacher, temperature=3.0, ce_weight=0.2, kd_weight=0.7)
    m.train()
    logits, terms = m.forward_train(x, y)
    with torch.no_grad():
        t = teacher(x)
    assert terms["ce"].item() == pytest.approx(0.2 * F.cross_entropy(logits, y).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.7 * kd_loss(logits, t, 3.0).item(), rel=1e-5)


def test_stkd_without_mixing_equals_kd_on_the_clean_batch(batch):
    x, y = batch
    hp = {"temperature": 4.0, "ce_weight": 0.3, "kd_weight": 0.7}
    kd = methods.create("kd", tiny_net(0), tiny_net(1), **hp)
    st = methods.create("stkd", tiny_net(0), tiny_net(1), mixup_alpha=0.0, clean_kd_weight=0.0, **hp)
    kd.train(), st.train()
    _, kd_terms = kd.forward_train(x, y)
    _, st_terms = st.forward_train(x, y)
    assert sum(st_terms.values()).item() == pytest.approx(sum(kd_terms.values()).item(), rel=1e-6)
    assert st_terms["kd"].item() == pytest.approx(kd_terms["kd"].item(), rel=1e-6)


def test_stkd_teacher_and_student_see_the_same_virtual_samples(batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    seen_s, seen_t = Recorder(student), Recorder(teacher)
    m = methods.create("stkd", student, teacher, mixup_alpha=1.0, generator=torch.Generator().manual_seed(5))
    m.forward_train(x, y)
    perm, lam = m.last_mix
    assert 0 < lam < 1
    expected = lam * x + (1 - lam) * x[perm]
    assert len(seen_s.inputs) == 1 and len(seen_t.inputs) == 1
    assert torch.allclose(seen_s.inputs[0], expected, atol=1e-6)
    assert torch.equal(seen_s.inputs[0], seen_t.inputs[0])


def test_stkd_mixed_output_target_and_mixed_labels(batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create(
        "stkd", student, teacher, mixup_alpha=1.0, teacher_target="mixed_output", temperature=2.0,
        ce_weight=0.5, kd_weight=0.5, generator=torch.Generator().manual_seed(2),
    )
    m.train()
    logits, terms = m.forward_train(x, y)
    perm, lam = m.last_mix
    with torch.no_grad():
        p = F.softmax(teacher(x) / 2.0, dim=1)
    q = lam * p + (1 - lam) * p[perm]
    kl = (q * (q.log() - F.log_softmax(logits / 2.0, dim=1))).sum(1).mean() * 4.0
    ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert terms["kd"].item() == pytest.approx(0.5 * kl.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


def test_stkd_clean_kd_term(batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create("stkd", student, teacher, clean_kd_weight=0.5, generator=torch.Generator().manual_seed(3))
    m.eval()  # BatchNorm in eval so a separate clean pass of the student gives the same logits
    _, terms = m.forward_train(x, y)
    with torch.no_grad():
        expected = 0.5 * kd_loss(student(x), teacher(x), 4.0)
    assert terms["clean_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["kd", "dkd", "stkd"])
def test_gradients_reach_the_student_only(name, batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create(name, student, teacher)
    m.train()
    assert not teacher.training and student.training
    _, terms = m.forward_train(x, y)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == {id(p) for p in student.parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}


def test_teacher_batchnorm_statistics_do_not_move(batch):
    x, y = batch
    teacher = tiny_net(1)
    before = teacher[1].running_mean.clone()
    m = methods.create("stkd", tiny_net(0), teacher)
    m.train(True)
    m.forward_train(x, y)
    assert torch.equal(teacher[1].running_mean, before)


def test_dkd_warmup_ramps_linearly(batch):
    x, y = batch
    m = methods.create("dkd", tiny_net(0), tiny_net(1), warmup_epochs=4)
    m.eval()
    m.set_epoch(3)
    full = m.forward_train(x, y)[1]["dkd"].item()
    m.set_epoch(0)
    assert m.forward_train(x, y)[1]["dkd"].item() == pytest.approx(full / 4, rel=1e-5)
    m.set_epoch(10)
    assert m.forward_train(x, y)[1]["dkd"].item() == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize(
    "name,hparams,needle",
    [
        ("kd", {"temperature": 0.0}, "temperature"),
        ("kd", {"temperature": -1}, "temperature"),
        ("kd", {"ce_weight": -0.1}, "ce_weight"),
        ("kd", {"ce_weight": 0.0, "kd_weight": 0.0}, "not all be zero"),
        ("stkd", {"mixup_alpha": -1.0}, "mixup_alpha"),
        ("stkd", {"teacher_target": "both"}, "teacher_target"),
        ("stkd", {"clean_kd_weight": -1.0}, "clean_kd_weight"),
        ("stkd", {"alpha": 1.0}, "unknown hyperparameter"),
        ("dkd", {"nckd_weight": -8.0}, "nckd_weight"),
        ("dkd", {"temperature": "hot"}, "temperature"),
        ("ce", {"temperature": 4.0}, "unknown hyperparameter"),
    ],
)
def test_invalid_hyperparameters_raise(name, hparams, needle):
    with pytest.raises(ValueError, match=needle):
        methods.create(name, tiny_net(0), None if name == "ce" else tiny_net(1), **hparams)


def test_missing_teacher_and_unknown_method():
    with pytest.raises(ValueError, match="needs a teacher"):
        methods.create("stkd", tiny_net(0))
    with pytest.raises(ValueError, match="known methods"):
        methods.create("fitnet", tiny_net(0), tiny_net(1))


@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "stkd"])
def test_bf16_autocast_and_channels_last(name, batch):
    x, y = batch
    m = methods.create(name, tiny_net(0).to(memory_format=torch.channels_last), None if name == "ce" else tiny_net(1))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, terms = m.forward_train(x, y)
    loss = sum(terms.values())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kd", "dkd", "stkd"])
def test_cuda(name, batch):
    x, y = (t.cuda() for t in batch)
    m = methods.create(name, tiny_net(0).cuda(), tiny_net(1).cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, terms = m.forward_train(x, y)
    sum(terms.values()).backward()


def test_train_step_moves_the_student_only(batch):
    from stkd.training import train_step

    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create("kd", student, teacher)
    m.train()
    before_s = [p.clone() for p in student.parameters()]
    before_t = [p.clone() for p in teacher.parameters()]
    optimizer = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    logits, terms = train_step(m, optimizer, x, y)
    assert logits.shape == (8, 5) and set(terms) == set(m.term_names())
    assert any(not torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))
