"""Training methods: a method owns student and teacher and turns a batch into named loss terms.

``forward_train(x, y)`` returns ``(student_logits, {term: weighted_loss})``; the terms sum to the
training loss, so the trainer can log each by name. ``train_correct(logits, y)`` then counts the
batch's correct predictions against the labels that batch was trained on.
``create(name, student, teacher, **hparams)`` builds one and validates its hyperparameters.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from stkd import features
from stkd.crd import ContrastMemory, ContrastSampler, Embed, nce_loss
from stkd.feature_losses import HintRegressor, attention_transfer, hint_loss
from stkd.losses import dkd_loss, kd_loss, mixed_cross_entropy, soft_target_loss, standardize
from stkd.mixup import mix

TEACHER_TARGETS = ("mixed_input", "mixed_output")


class Method(nn.Module):
    """Base class: holds the student (trainable) and an optional frozen teacher."""

    defaults: dict[str, Any] = {}
    terms: tuple[str, ...] = ("ce",)
    weight_names: tuple[str, ...] = ()
    needs_teacher = True
    needs_architectures = False  # feature-based methods tap named stages of both models (stkd.features)
    # CRD: training batches carry each image's index in the training set, forward_train(x, y, indices=...), and
    # the method is built with the label of every training image (train_labels=, in index order).
    needs_indices = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        generator: torch.Generator | None = None,
        **hparams: Any,
    ) -> None:
        super().__init__()
        self.hparams = validate_hparams(type(self), teacher, hparams)
        self.student = student
        self.teacher = teacher
        # A generator on the training device for the method's random draws (mixup): reproducible
        # runs without a host round trip per step.
        self.generator = generator
        if teacher is not None:
            freeze(teacher)
        self.epoch = 0

    def train(self, mode: bool = True) -> "Method":
        # The teacher stays in eval mode (BatchNorm statistics fixed) whatever the caller asks.
        self.training = mode
        self.student.train(mode)
        for module in self.own_modules().values():
            module.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @classmethod
    def check_architectures(cls, student_name: str, teacher_name: str | None) -> None:
        """ValueError when this method cannot pair these two zoo models (a feature-based method's stages)."""

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the current epoch (0-based); used by schedules such as DKD's warm-up."""
        self.epoch = epoch

    def term_names(self) -> tuple[str, ...]:
        """The names of the loss terms ``forward_train`` returns, known before the first batch."""
        return self.terms

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should see: the student's, then those of the method's own modules."""
        params = list(self.student.parameters())
        for module in self.own_modules().values():
            params.extend(module.parameters())
        return params

    def own_modules(self) -> dict[str, nn.Module]:
        """Modules the method trains beside the student (FitNet's regressor), by attribute name: data-parallel
        training wraps each as it wraps the student, and checkpoints carry their state. None by default."""
        return {}

    def kept_modules(self) -> dict[str, nn.Module]:
        """Modules with state but nothing to optimise (CRD's memory bank), by attribute name: checkpoints carry
        their state, but they are neither optimised nor wrapped for data-parallel training (DDP refuses a module
        without trainable parameters, and would broadcast its buffers every step); each keeps itself the same
        on every worker. None by default."""
        return {}

    def checkpointed_modules(self) -> dict[str, nn.Module]:
        """:meth:`own_modules` and :meth:`kept_modules`: what ``own_state_dict`` saves."""
        return {**self.own_modules(), **self.kept_modules()}

    def own_state_dict(self) -> dict[str, Any]:
        """The state of :meth:`checkpointed_modules` (unwrapped), for a checkpoint."""
        return {name: unwrap(module).state_dict() for name, module in self.checkpointed_modules().items()}

    def load_own_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.checkpointed_modules().items():
            unwrap(module).load_state_dict(state[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher(x)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train_correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions among ``logits`` (from the last ``forward_train``), a 0-dim float tensor.

        Stays on the logits' device: the trainer sums it over an epoch without a host sync per step.
        """
        return (logits.argmax(1) == y).sum().float()

    def distill_view(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the distillation terms see: standardized when ``standardize`` is set."""
        return standardize(logits) if self.hparams.get("standardize", False) else logits


class CE(Method):
    """The student alone with cross-entropy: baselines and teacher training."""

    needs_teacher = False

    def forward_train(self, x, y):
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits.float(), y)}


class KD(Method):
    """Hinton et al. 2015: ``ce_weight * CE + kd_weight * T^2 * KL(p_t || p_s)``."""

    defaults = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False}
    terms = ("ce", "kd")
    weight_names = ("ce_weight", "kd_weight")

    def forward_train(self, x, y):
        h = self.hparams
        logits = self.student(x)
        t_logits = self.teacher_logits(x)
        s_kd, t_kd = self.distill_view(logits), self.distill_view(t_logits)
        return logits, {
            "ce": h["ce_weight"] * F.cross_entropy(logits.float(), y),
            "kd": h["kd_weight"] * kd_loss(s_kd, t_kd, h["temperature"]),
        }


class DKD(Method):
    """Decoupled KD (Zhao et al., CVPR 2022) with its linear warm-up of the KD terms.

    ``tckd_weight`` and ``nckd_weight`` are the paper's alpha and beta.
    """

    defaults = {
        "temperature": 4.0,
        "ce_weight": 1.0,
        "tckd_weight": 1.0,
        "nckd_weight": 8.0,
        "warmup_epochs": 20,
        "standardize": False,
    }
    weight_names = ("ce_weight", "tckd_weight", "nckd_weight")
    terms = ("ce", "dkd")

    def warmup_factor(self) -> float:
        warmup = self.hparams["warmup_epochs"]
        return 1.0 if warmup <= 0 else min((self.epoch + 1) / warmup, 1.0)

    def forward_train(self, x, y):
        h = self.hparams
        logits = self.student(x)
        t_logits = self.teacher_logits(x)
        ramp = self.warmup_factor()
        s_kd, t_kd = self.distill_view(logits), self.distill_view(t_logits)
        return logits, {
            "ce": h["ce_weight"] * F.cross_entropy(logits.float(), y),
            "dkd": ramp * dkd_loss(s_kd, t_kd, y, h["tckd_weight"], h["nckd_weight"], h["temperature"]),
        }


class STKD(Method):
    """Similarity transfer KD on mixup virtual samples (after Zhao et al., arXiv 2103.10047).

    For a batch, ``lam ~ Beta(mixup_alpha, mixup_alpha)`` and a permutation ``p`` make virtual
    samples ``xm = lam * x + (1 - lam) * x[p]``; the student sees ``xm`` and is trained with

        ce_weight * (lam * CE(s(xm), y) + (1 - lam) * CE(s(xm), y[p]))
        + kd_weight * T^2 * KL(q_t || softmax(s(xm) / T))
        [+ clean_kd_weight * T^2 * KL(softmax(t(x)/T) || softmax(s(x)/T))]

    The paper's exact formula is not public. ``teacher_target`` selects the variant the studies
    compare: ``mixed_input`` takes ``q_t = softmax(t(xm) / T)``, the teacher's view of the virtual
    sample; ``mixed_output`` (default) takes ``lam * softmax(t(x)/T) + (1 - lam) * softmax(t(x[p])/T)``.
    ``mixup_alpha = 0`` means no mixing (``lam = 1``). ``generator`` (a torch.Generator on the
    device of the batches) makes the draws of ``lam`` and ``p`` reproducible; they stay on that
    device, so a step never waits on the GPU to decide anything on the host. ``standardize`` z-scores every teacher and student
    logit vector entering the KD terms (for ``mixed_output``, each clean teacher output before its
    softmax); the cross-entropy keeps the raw logits.
    """

    # Chosen on CIFAR-10's validation split by the fair fight's tuning (BENCHMARKS.md section 6): its best
    # of 6 trials, rounded to two digits (T 7.28, CE 0.4999, KD 0.908; alpha, target, clean KD as drawn).
    defaults = {
        "temperature": 7.3,
        "ce_weight": 0.5,
        "kd_weight": 0.91,
        "mixup_alpha": 1.0,
        "teacher_target": "mixed_output",
        "clean_kd_weight": 0.5,
        "standardize": False,
    }
    weight_names = ("ce_weight", "kd_weight", "clean_kd_weight")

    def __init__(self, student, teacher=None, generator=None, **hparams):
        super().__init__(student, teacher, generator, **hparams)
        self.last_mix: tuple[torch.Tensor, torch.Tensor | float] | None = None

    def term_names(self) -> tuple[str, ...]:
        return ("ce", "kd", "clean_kd") if self.hparams["clean_kd_weight"] > 0 else ("ce", "kd")

    def forward_train(self, x, y):
        h = self.hparams
        temperature = h["temperature"]
        xm, perm, lam = mix(x, h["mixup_alpha"], self.generator)
        self.last_mix = (perm, lam)
        mixing = h["mixup_alpha"] > 0  # decided from the config, never by reading lam on the host
        need_clean_teacher = h["teacher_target"] == "mixed_output" or h["clean_kd_weight"] > 0
        t_clean = self.distill_view(self.teacher_logits(x)) if need_clean_teacher else None

        if h["teacher_target"] == "mixed_input":
            t_mixed = self.distill_view(self.teacher_logits(xm)) if mixing or t_clean is None else t_clean
            q_t = F.softmax(t_mixed.float() / temperature, dim=1)
        else:
            p_clean = F.softmax(t_clean.float() / temperature, dim=1)
            q_t = lam * p_clean + (1.0 - lam) * p_clean.index_select(0, perm)

        if h["clean_kd_weight"] > 0 and mixing:
            # One student pass over clean and mixed samples together keeps BatchNorm statistics shared.
            both = self.student(torch.cat([xm, x]))
            logits, s_clean = both[: x.shape[0]], both[x.shape[0]:]
        else:
            logits = self.student(xm)
            s_clean = logits

        terms = {
            "ce": h["ce_weight"] * mixed_cross_entropy(logits, y, y.index_select(0, perm), lam),
            "kd": h["kd_weight"] * soft_target_loss(self.distill_view(logits), q_t, temperature),
        }
        if h["clean_kd_weight"] > 0:
            terms["clean_kd"] = h["clean_kd_weight"] * kd_loss(self.distill_view(s_clean), t_clean, temperature)
        return logits, terms

    def train_correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions on the last virtual batch, each counted against its mixup label.

        A prediction of ``y`` scores ``lam`` and one of ``y[p]`` scores ``1 - lam``, the same
        weighting as the mixed cross-entropy, so the count is not judged against a label the
        student was only partly trained toward.
        """
        if self.last_mix is None:
            return super().train_correct(logits, y)
        perm, lam = self.last_mix
        pred = logits.argmax(1)
        hits_a = (pred == y).sum().float()
        if self.hparams["mixup_alpha"] == 0:
            return hits_a
        return lam * hits_a + (1.0 - lam) * (pred == y.index_select(0, perm)).sum().float()


class FeatureMethod(Method):
    """A method that compares named stages of the student and the teacher (:mod:`stkd.features`).

    Built with ``architectures=(student_name, teacher_name)`` (zoo names) and, when ``student`` is a
    DDP or compiled wrapper, ``unwrapped_student``: the hooks sit on the module itself. Subclasses say
    which stages of a model they read (:meth:`stages`).
    """

    needs_architectures = True

    def __init__(self, student, teacher=None, generator=None, *, architectures: tuple[str, str],
                 unwrapped_student: nn.Module | None = None, image_shape: tuple[int, int, int] | None = None,
                 **hparams):
        super().__init__(student, teacher, generator, **hparams)
        student_name, teacher_name = architectures
        self.check_architectures(student_name, teacher_name)
        raw = unwrapped_student or student
        self.student_stages, self.teacher_stages = self.stages(student_name), self.stages(teacher_name)
        self.student_taps = features.FeatureTaps(raw, student_name, self.student_stages)
        self.teacher_taps = features.FeatureTaps(teacher, teacher_name, self.teacher_stages)

    @classmethod
    def stages(cls, model_name: str) -> tuple[str, ...]:
        raise NotImplementedError

    def forward_with_stages(self, x):
        """The student's logits and both models' stage outputs for one batch (the teacher without gradients)."""
        logits = self.student(x)
        self.teacher_logits(x)
        return (logits, [self.student_taps.outputs[k] for k in self.student_stages],
                [self.teacher_taps.outputs[k] for k in self.teacher_stages])


class AT(FeatureMethod):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller trains it:
    ``ce_weight * CE + at_weight * sum over stages of AT(student stage, teacher stage)``, with
    RepDistiller's weights (CE 1, beta 1000, no KD term) and its stages, ``feat[1:-1]`` of ``is_feat``:
    every stage output :mod:`stkd.features` lists, except VGG's ``block0`` (its ``f0``, where the other
    families' ``f0`` is their stem). Student and teacher stages pair one to one, shallow to deep.
    """

    defaults = {"ce_weight": 1.0, "at_weight": 1000.0}
    terms = ("ce", "at")
    weight_names = ("ce_weight", "at_weight")

    @classmethod
    def stages(cls, model_name: str) -> tuple[str, ...]:
        return attention_stages(model_name)

    @classmethod
    def check_architectures(cls, student_name: str, teacher_name: str | None) -> None:
        s, t = attention_stages(student_name), attention_stages(teacher_name or "")
        if len(s) != len(t):
            raise ValueError(f"method 'at' pairs stages one to one: {student_name} has {len(s)} ({', '.join(s)}), "
                             f"{teacher_name} has {len(t)} ({', '.join(t)})")

    def forward_train(self, x, y):
        h = self.hparams
        logits, s, t = self.forward_with_stages(x)
        return logits, {
            "ce": h["ce_weight"] * F.cross_entropy(logits.float(), y),
            "at": h["at_weight"] * attention_transfer(s, t),
        }


class FitNet(FeatureMethod):
    """FitNet's hint (Romero et al., ICLR 2015) trained jointly with CE, as RepDistiller's ``--distill hint``
    runs it: a regressor (:class:`stkd.feature_losses.HintRegressor`) maps the student's ``feat[2]`` (the
    second of :func:`attention_stages`) to the teacher's ``feat[2]`` shape, and the loss is
    ``ce_weight * CE + hint_weight * MSE(regressor(student stage), teacher stage)`` (RepDistiller: CE 1,
    beta 100, no KD term). The regressor trains with the student (:meth:`own_modules`); it is sized from
    one probe forward of each model, so FitNet also needs ``image_shape`` (``(C, H, W)``).
    """

    defaults = {"ce_weight": 1.0, "hint_weight": 100.0}
    terms = ("ce", "hint")
    weight_names = ("ce_weight", "hint_weight")

    def __init__(self, student, teacher=None, generator=None, *, architectures: tuple[str, str],
                 unwrapped_student: nn.Module | None = None, image_shape: tuple[int, int, int] | None = None,
                 **hparams):
        if image_shape is None:
            raise ValueError("method 'fitnet' sizes its regressor from the images: give image_shape=(C, H, W)")
        super().__init__(student, teacher, generator, architectures=architectures,
                         unwrapped_student=unwrapped_student, **hparams)
        raw = unwrapped_student or student
        (s_stage,), (t_stage,) = self.student_stages, self.teacher_stages
        s_shape = features.stage_shapes(raw, architectures[0], image_shape)[s_stage]
        t_shape = features.stage_shapes(teacher, architectures[1], image_shape)[t_stage]
        self.regressor = HintRegressor(s_shape, t_shape).to(next(raw.parameters()).device)

    @classmethod
    def stages(cls, model_name: str) -> tuple[str, ...]:
        return (hint_stage(model_name),)

    @classmethod
    def check_architectures(cls, student_name: str, teacher_name: str | None) -> None:
        for name in (student_name, teacher_name or ""):
            hint_stage(name)

    def own_modules(self) -> dict[str, nn.Module]:
        return {"regressor": self.regressor}

    def forward_train(self, x, y):
        h = self.hparams
        logits, (s,), (t,) = self.forward_with_stages(x)
        return logits, {
            "ce": h["ce_weight"] * F.cross_entropy(logits.float(), y),
            "hint": h["hint_weight"] * hint_loss(self.regressor(s), t),
        }


class CRD(FeatureMethod):
    """Contrastive representation distillation (Tian et al., ICLR 2020) as RepDistiller's ``--distill crd``
    trains it (``-r 1 -a 0 -b 0.8``): ``ce_weight * CE + crd_weight * (NCE of the student's embedding against
    the teacher's memory bank + NCE of the teacher's against the student's) [+ kd_weight * KD]``, on the
    pooled features (``feat[-1]``). The pieces are :mod:`stkd.crd`: two embeddings to ``feat_dim``
    (:meth:`own_modules`, trained with the student), a memory bank per side with ``nce_momentum``, ``nce_k``
    negatives of other classes per image, NCE temperature ``nce_t``.

    Each training batch must carry its images' indices in the training set (``needs_indices``:
    ``forward_train(x, y, indices=...)``), and the method is built with ``train_labels``, the label of every
    training image in index order (the banks' size and the classes negatives are drawn from), and
    ``image_shape`` (``(C, H, W)``) to size the embeddings from one probe forward. The banks are
    :meth:`kept_modules`: checkpointed, never optimised.
    """

    defaults = {"ce_weight": 1.0, "crd_weight": 0.8, "kd_weight": 0.0, "temperature": 4.0, "feat_dim": 128,
                "nce_k": 16384, "nce_t": 0.07, "nce_momentum": 0.5}
    weight_names = ("ce_weight", "crd_weight", "kd_weight")
    needs_indices = True

    def __init__(self, student, teacher=None, generator=None, *, architectures: tuple[str, str],
                 unwrapped_student: nn.Module | None = None, image_shape: tuple[int, int, int] | None = None,
                 train_labels: torch.Tensor | None = None, **hparams):
        if image_shape is None:
            raise ValueError("method 'crd' sizes its embeddings from the images: give image_shape=(C, H, W)")
        if train_labels is None:
            raise ValueError("method 'crd' keeps a memory bank row per training image and draws negatives from "
                             "other classes: give train_labels (every training image's label, in index order)")
        super().__init__(student, teacher, generator, architectures=architectures,
                         unwrapped_student=unwrapped_student, **hparams)
        h, raw = self.hparams, unwrapped_student or student
        device = next(raw.parameters()).device
        s_dim = features.stage_shapes(raw, architectures[0], image_shape)[features.POOLED][0]
        t_dim = features.stage_shapes(teacher, architectures[1], image_shape)[features.POOLED][0]
        self.embed_s = Embed(s_dim, h["feat_dim"]).to(device)
        self.embed_t = Embed(t_dim, h["feat_dim"]).to(device)
        self.n_data = len(train_labels)
        self.memory = ContrastMemory(h["feat_dim"], self.n_data, h["nce_t"], h["nce_momentum"]).to(device)
        self.sampler = ContrastSampler(train_labels).to(device)

    @classmethod
    def stages(cls, model_name: str) -> tuple[str, ...]:
        return (features.POOLED,)

    def term_names(self) -> tuple[str, ...]:
        return ("ce", "crd", "kd") if self.hparams["kd_weight"] > 0 else ("ce", "crd")

    def own_modules(self) -> dict[str, nn.Module]:
        return {"embed_s": self.embed_s, "embed_t": self.embed_t}

    def kept_modules(self) -> dict[str, nn.Module]:
        return {"memory": self.memory}

    def forward_train(self, x, y, indices: torch.Tensor | None = None):
        if indices is None:
            raise ValueError("method 'crd' needs each image's index in the training set: "
                             "forward_train(x, y, indices=...)")
        h = self.hparams
        logits = self.student(x)
        t_logits = self.teacher_logits(x)  # runs the teacher's taps without gradients
        f_s, f_t = self.student_taps.outputs[features.POOLED], self.teacher_taps.outputs[features.POOLED]
        contrast = self.sampler.draw(y, indices, h["nce_k"], self.generator)
        out_s, out_t = self.memory(self.embed_s(f_s), self.embed_t(f_t), indices, contrast)
        terms = {
            "ce": h["ce_weight"] * F.cross_entropy(logits.float(), y),
            "crd": h["crd_weight"] * (nce_loss(out_s, self.n_data) + nce_loss(out_t, self.n_data)),
        }
        if h["kd_weight"] > 0:
            terms["kd"] = h["kd_weight"] * kd_loss(logits, t_logits, h["temperature"])
        return logits, terms


def hint_stage(model_name: str) -> str:
    """The stage FitNet's hint reads (RepDistiller's ``hint_layer`` 2: ``feat[2]``)."""
    return attention_stages(model_name)[1]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def attention_stages(model_name: str) -> tuple[str, ...]:
    """The stages attention transfer compares for a zoo model (see :class:`AT`)."""
    stages = features.stage_names(model_name)[:-1]  # not ``pooled``: AT needs spatial maps
    return stages[1:] if features.family(model_name) == "vgg" else stages


# A method in a file of its own is registered by its import path, "module:Class": imported on first use, so
# that its file can import this module (README, "Adding a method").
REGISTRY: dict[str, type[Method] | str] = {"ce": CE, "kd": KD, "dkd": DKD, "stkd": STKD, "at": AT, "fitnet": FitNet,
                                           "crd": CRD}


def names() -> list[str]:
    return sorted(REGISTRY)


def hparam_defaults(name: str) -> dict[str, Any]:
    """The hyperparameters method ``name`` takes, with their defaults."""
    return dict(method_class(name).defaults)


def method_class(name: str) -> type[Method]:
    try:
        entry = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}") from None
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = REGISTRY[name] = getattr(importlib.import_module(module), attribute)
        if not (isinstance(entry, type) and issubclass(entry, Method)):
            raise TypeError(f"method {name!r}: {module}:{attribute} is not a subclass of stkd.methods.Method")
    return entry


def create(
    name: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    generator: torch.Generator | None = None,
    *,
    architectures: tuple[str, str] | None = None,
    unwrapped_student: nn.Module | None = None,
    image_shape: tuple[int, int, int] | None = None,
    train_labels: torch.Tensor | None = None,
    **hparams: Any,
) -> Method:
    """Build method ``name`` around ``student`` (and ``teacher``); ValueError on bad hyperparameters.

    ``architectures`` (student and teacher zoo names), ``unwrapped_student`` and ``image_shape`` (``(C, H, W)``)
    reach only the methods that tap features (``needs_architectures``), ``train_labels`` (every training image's
    label, in the order of the indices its batches carry) only those that need indices (``needs_indices``);
    the others take no notice of them."""
    cls = method_class(name)
    if not cls.needs_architectures:
        return cls(student, teacher, generator, **hparams)
    if architectures is None:
        raise ValueError(f"method {name!r} taps named stages of both models: give architectures="
                         "(student_name, teacher_name)")
    indexed = {"train_labels": train_labels} if cls.needs_indices else {}
    return cls(student, teacher, generator, architectures=architectures, unwrapped_student=unwrapped_student,
               image_shape=image_shape, **indexed, **hparams)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher is never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


POSITIVE_HPARAMS = ("temperature", "nce_t", "feat_dim", "nce_k")
NON_NEGATIVE_HPARAMS = ("mixup_alpha", "warmup_epochs")  # and every method's loss weights
CHOICE_HPARAMS = {"teacher_target": TEACHER_TARGETS}
INTEGER_HPARAMS = ("feat_dim", "nce_k")  # sizes: a tensor dimension, a count of negatives
UNIT_INTERVAL_HPARAMS = ("nce_momentum",)  # in [0, 1): at 1 the memory bank would never follow the embeddings


def check_hparam(cls: type[Method], key: str, value: Any) -> Any:
    """One hyperparameter of ``cls`` checked alone (type, range, choices) and coerced to its default's
    type; the one place its bounds live (search spaces check every value they allow here)."""
    default = cls.defaults[key]
    if isinstance(default, bool):
        # Checked before numbers: bool is an int subclass, and 0/1 would silently pass as a switch.
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if key in CHOICE_HPARAMS:
        if value not in CHOICE_HPARAMS[key]:
            raise ValueError(f"{key} must be one of {list(CHOICE_HPARAMS[key])}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if key in INTEGER_HPARAMS and not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    if key in UNIT_INTERVAL_HPARAMS and not 0 <= value < 1:
        raise ValueError(f"{key} must be in [0, 1), got {value}")
    if key in POSITIVE_HPARAMS and not value > 0:
        raise ValueError(f"{key} must be > 0, got {value}")
    if (key in NON_NEGATIVE_HPARAMS or key in cls.weight_names) and not value >= 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return type(default)(value) if isinstance(default, float) else value


def validate_hparams(cls: type[Method], teacher: nn.Module | None, hparams: dict[str, Any]) -> dict[str, Any]:
    """Merge ``hparams`` over the defaults and check them; each failure names parameter and value."""
    name = next((k for k, v in REGISTRY.items() if v is cls), cls.__name__)
    unknown = sorted(set(hparams) - set(cls.defaults))
    if unknown:
        known = ", ".join(sorted(cls.defaults)) or "none"
        raise ValueError(f"method {name!r} got unknown hyperparameter(s) {unknown}; it takes: {known}")
    if cls.needs_teacher and teacher is None:
        raise ValueError(f"method {name!r} needs a teacher, got teacher=None")
    if not cls.needs_teacher and teacher is not None:
        raise ValueError(f"method {name!r} trains the student alone and takes no teacher")
    merged = {key: check_hparam(cls, key, value) for key, value in {**cls.defaults, **hparams}.items()}
    if cls.weight_names and all(merged[k] == 0 for k in cls.weight_names):
        weights = {k: merged[k] for k in cls.weight_names}
        raise ValueError(f"loss weights must not all be zero, got {weights}")
    return merged
