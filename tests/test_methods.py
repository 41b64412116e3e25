import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stkd import methods
from stkd.losses import dkd_loss, kd_loss, standardize


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


@pytest.mark.parametrize("standardize", [False, True])
def test_stkd_without_mixing_equals_kd_on_the_clean_batch(batch, standardize):
    x, y = batch
    hp = {"temperature": 4.0, "ce_weight": 0.3, "kd_weight": 0.7, "standardize": standardize}
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
    m = methods.create("stkd", student, teacher, mixup_alpha=1.0, teacher_target="mixed_input", clean_kd_weight=0.0,
                       generator=torch.Generator().manual_seed(5))
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
    m = methods.create("stkd", student, teacher, clean_kd_weight=0.5, temperature=4.0,
                       generator=torch.Generator().manual_seed(3))
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
        ("ce", {"standardize": True}, "unknown hyperparameter.*standardize"),
        ("kd", {"standardize": 1}, "standardize.*1"),
        ("dkd", {"standardize": 0.0}, "standardize.*0.0"),
        ("stkd", {"standardize": "true"}, "standardize.*'true'"),
        ("kd", {"temperature": True}, "temperature.*True"),
        ("dkd", {"warmup_epochs": False}, "warmup_epochs.*False"),
    ],
)
def test_invalid_hyperparameters_raise(name, hparams, needle):
    with pytest.raises(ValueError, match=needle):
        methods.create(name, tiny_net(0), None if name == "ce" else tiny_net(1), **hparams)


def test_missing_teacher_and_unknown_method():
    with pytest.raises(ValueError, match="needs a teacher"):
        methods.create("stkd", tiny_net(0))
    with pytest.raises(ValueError, match="known methods"):
        methods.create("no-such-method", tiny_net(0), tiny_net(1))


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


def z_score(z: torch.Tensor) -> torch.Tensor:
    """Per-row z-score with the unbiased std, written out (independent of ``standardize``)."""
    z = z.double()
    centred = z - z.mean(1, keepdim=True)
    std = (centred.pow(2).sum(1, keepdim=True) / (z.shape[1] - 1)).sqrt()
    return centred / (std + 1e-7)


def soft_kl(target_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(target || softmax(s/T))``, batch-mean, in float64."""
    log_s = F.log_softmax(student_logits.double() / temperature, dim=1)
    q = target_probs.double()
    return (q * (q.log() - log_s)).sum(1).mean() * temperature**2


@pytest.mark.parametrize("name", ["kd", "dkd", "stkd"])
def test_standardize_is_an_off_by_default_switch(name):
    assert methods.hparam_defaults(name)["standardize"] is False
    for value in (True, False):
        m = methods.create(name, tiny_net(0), tiny_net(1), standardize=value)
        assert m.hparams["standardize"] is value
    assert "standardize" not in methods.hparam_defaults("ce")


def standardized_and_plain(name, hp, x, y):
    """The same method with and without standardize, one forward_train of the standardized one."""
    teacher = tiny_net(1)
    m = methods.create(name, tiny_net(0), teacher, standardize=True, **hp)
    plain = methods.create(name, tiny_net(0), tiny_net(1), **hp)
    m.eval(), plain.eval()
    logits, terms = m.forward_train(x, y)
    with torch.no_grad():
        t = teacher(x)
    return plain, logits, terms, t


def test_kd_with_standardize(batch):
    x, y = batch
    hp = {"temperature": 3.0, "ce_weight": 0.2, "kd_weight": 0.7}
    plain, logits, terms, t = standardized_and_plain("kd", hp, x, y)
    expected_kd = 0.7 * soft_kl(F.softmax(z_score(t) / 3.0, dim=1), z_score(logits), 3.0)
    assert terms["kd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.7 * kd_loss(standardize(logits), standardize(t), 3.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.2 * F.cross_entropy(logits, y).item(), rel=1e-5)
    plain_logits, plain_terms = plain.forward_train(x, y)
    assert torch.equal(plain_logits, logits)
    assert plain_terms["ce"].item() == pytest.approx(terms["ce"].item(), rel=1e-6)
    assert plain_terms["kd"].item() != pytest.approx(terms["kd"].item(), rel=1e-3)


def test_dkd_with_standardize(batch):
    x, y = batch
    hp = {"temperature": 2.0, "ce_weight": 0.5, "tckd_weight": 1.0, "nckd_weight": 4.0, "warmup_epochs": 0}
    plain, logits, terms, t = standardized_and_plain("dkd", hp, x, y)
    expected = dkd_loss(standardize(logits), standardize(t), y, 1.0, 4.0, 2.0)
    assert terms["dkd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.5 * F.cross_entropy(logits, y).item(), rel=1e-5)
    plain_terms = plain.forward_train(x, y)[1]
    assert plain_terms["dkd"].item() != pytest.approx(terms["dkd"].item(), rel=1e-3)


@pytest.mark.parametrize("teacher_target", ["mixed_input", "mixed_output"])
def test_stkd_with_standardize(teacher_target, batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create(
        "stkd", student, teacher, mixup_alpha=1.0, teacher_target=teacher_target, temperature=2.0,
        ce_weight=0.4, kd_weight=0.6, standardize=True, generator=torch.Generator().manual_seed(2),
    )
    m.train()
    logits, terms = m.forward_train(x, y)
    perm, lam = m.last_mix
    assert 0 < lam < 1
    with torch.no_grad():
        if teacher_target == "mixed_input":
            q = F.softmax(z_score(teacher(lam * x + (1 - lam) * x[perm])) / 2.0, dim=1)
        else:
            # Each clean teacher output is standardized before its softmax; the probabilities are mixed.
            p = F.softmax(z_score(teacher(x)) / 2.0, dim=1)
            q = lam * p + (1 - lam) * p[perm]
    ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert terms["kd"].item() == pytest.approx(0.6 * soft_kl(q, z_score(logits), 2.0).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.4 * ce.item(), rel=1e-5)


def test_stkd_clean_kd_term_with_standardize(batch):
    x, y = batch
    student, teacher = tiny_net(0), tiny_net(1)
    m = methods.create(
        "stkd", student, teacher, clean_kd_weight=0.5, standardize=True, temperature=4.0,
        generator=torch.Generator().manual_seed(3),
    )
    m.eval()  # BatchNorm in eval so a separate clean pass of the student gives the same logits
    _, terms = m.forward_train(x, y)
    with torch.no_grad():
        expected = 0.5 * soft_kl(F.softmax(z_score(teacher(x)) / 4.0, dim=1), z_score(student(x)), 4.0)
    assert terms["clean_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["kd", "dkd", "stkd"])
def test_standardize_under_bf16_autocast(name, batch):
    x, y = batch
    student = tiny_net(0)
    m = methods.create(name, student, tiny_net(1), standardize=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = m.forward_train(x, y)
    loss = sum(terms.values())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_train_correct_counts_argmax_hits():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 2])
    for name, teacher in (("ce", None), ("kd", tiny_net(1)), ("dkd", tiny_net(1)), ("stkd", tiny_net(1))):
        # stkd before any forward_train has no mix to weight by and counts plainly.
        got = methods.create(name, tiny_net(0, classes=3), teacher).train_correct(logits, y)
        assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
        assert got.item() == 2.0


def test_stkd_train_correct_weights_hits_by_lam():
    m = methods.create("stkd", tiny_net(0), tiny_net(1))
    y = torch.tensor([0, 1, 2, 3])
    perm = torch.tensor([1, 0, 3, 2])  # y[perm] = (1, 0, 3, 2)
    # Predictions 0, 0, 4, 2: sample 0 hits y, samples 1 and 3 hit y[perm], sample 2 hits neither.
    logits = F.one_hot(torch.tensor([0, 0, 4, 2]), 5).float()
    m.last_mix = (perm, 0.3)
    got = m.train_correct(logits, y)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(0.3 * 1 + 0.7 * 2)


@pytest.mark.parametrize("clean_kd_weight", [0.0, 0.5])
def test_stkd_train_correct_after_forward_train(clean_kd_weight, batch):
    x, y = batch
    m = methods.create(
        "stkd", tiny_net(0), tiny_net(1), clean_kd_weight=clean_kd_weight, generator=torch.Generator().manual_seed(4),
    )
    m.train()
    logits, _ = m.forward_train(x, y)
    perm, lam = m.last_mix
    assert 0 < lam < 1
    # With clean_kd the student runs on mixed and clean samples together; only the mixed rows come back.
    assert logits.shape == (x.shape[0], 5)
    pred = logits.argmax(1).tolist()
    expected = sum(lam * (pred[i] == y[i]) + (1 - lam) * (pred[i] == y[perm[i]]) for i in range(len(y)))
    assert m.train_correct(logits, y).item() == pytest.approx(float(expected), rel=1e-6)


def test_stkd_train_correct_without_mixing_is_the_plain_count(batch):
    x, y = batch
    m = methods.create("stkd", tiny_net(0), tiny_net(1), mixup_alpha=0.0, generator=torch.Generator().manual_seed(4))
    logits, _ = m.forward_train(x, y)
    assert m.last_mix[1] == 1.0
    assert m.train_correct(logits, y).item() == (logits.argmax(1) == y).sum().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kd", "stkd"])
def test_train_correct_stays_on_the_gpu_without_a_sync(name, batch):
    x, y = (t.cuda() for t in batch)
    m = methods.create(name, tiny_net(0).cuda(), tiny_net(1).cuda(), generator=torch.Generator("cuda").manual_seed(4))
    logits, _ = m.forward_train(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = m.train_correct(logits.detach(), y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device == logits.device and got.dim() == 0
