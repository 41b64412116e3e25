"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020) in plain PyTorch: the pieces of
RepDistiller's ``crd/`` (``criterion.py``: Embed, ContrastLoss; ``memory.py``: ContrastMemory), with its maths.

Student and teacher pooled features are embedded (a linear map, then L2 normalisation) into ``feat_dim``
dimensions. A memory bank per side holds one embedding per training image, indexed by the image's position
in the training set. For each image of a batch, the other side's bank supplies its own row (the positive)
and ``nce_k`` rows of images of other classes (the negatives, RepDistiller's ``mode='exact'``); each score
is ``exp(<v, bank row> / nce_t) / Z``, with ``Z`` fixed from the first batch. NCE's loss (Eq. 18) on those
scores is taken both ways: the student's embedding against the teacher's bank, and the teacher's against
the student's. The banks follow the embeddings with momentum, row by row, after the scores are taken.

One difference from the reference, on purpose: RepDistiller draws an image's negatives without replacement
(``np.random.choice(..., replace=False)`` in its data loader); :class:`ContrastSampler` draws them with
replacement on the training device, which is what NCE's noise samples are (i.i.d. from the noise
distribution) and what the reference's own memory sampler (``AliasMethod``) does, and needs no permutation
of the whole training set per image.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NCE_EPS = 1e-7  # the reference's eps in ContrastLoss


class Embed(nn.Module):
    """A feature, flattened, mapped to ``dim_out`` by a linear layer and L2-normalised (RepDistiller's Embed)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 after the linear map: the scores divide by a temperature of 0.07 and exponentiate.
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE's loss on ``scores`` ``(B, 1 + K)`` (the positive's score first, then K negatives'), with noise
    distribution ``Pn = 1 / n_data`` (RepDistiller's ContrastLoss, Eq. 18 of the paper):

        -(1/B) sum_i [ log(P_i0 / (P_i0 + K Pn + eps)) + sum_j log(K Pn / (P_ij + K Pn + eps)) ]
    """
    k = scores.shape[1] - 1
    noise = k / n_data
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + NCE_EPS))
    log_d0 = torch.log(noise / (negatives + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def momentum_update(rows: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> torch.Tensor:
    """Bank rows moved toward this batch's embeddings and L2-normalised again: the reference's update,
    ``normalize(momentum * row + (1 - momentum) * embedding)``."""
    return F.normalize(rows * momentum + embeddings * (1.0 - momentum), dim=1)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_across_ranks(indices: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's ``indices`` and matching ``rows`` (each ``(n, ...)``), concatenated in rank order, on every
    rank; as given without a process group. Ranks may hold different ``n`` (the in-memory feed deals a
    global batch's last rows unevenly), so the sizes are gathered first and every part padded to the largest.
    Reading those sizes on the host makes a step with several workers wait once for its forward pass; a single
    process never comes here."""
    if not distributed():
        return (indices, *rows)
    world = dist.get_world_size()
    size = torch.tensor([len(indices)], device=indices.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    largest = max(counts)
    out = []
    for tensor in (indices, *rows):
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([part[:count] for part, count in zip(parts, counts)]))
    return tuple(out)


class ContrastMemory(nn.Module):
    """The two memory banks (student's and teacher's embeddings, one row per training image) and the scores
    of RepDistiller's ContrastMemory. Buffers only, so checkpoints carry the banks and the normalisers and
    ``.to(device)`` moves them; nothing here is optimised.

    With ``torch.distributed`` initialised, every rank updates its banks with the whole global batch (the
    indices and embeddings of every rank, gathered): each rank sees other images, and banks updated only with
    a rank's own rows would drift apart, so that ranks would score the same image against different
    negatives. The first forward also takes rank 0's banks and averages the first-batch normalisers over
    the ranks, so all ranks hold one bank and one ``Z``, as a single process would.
    """

    def __init__(self, feat_dim: int, n_data: int, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        self.n_data, self.temperature, self.momentum = n_data, temperature, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)  # the reference's initialisation: uniform in [-stdv, stdv)
        self.register_buffer("student_bank", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("teacher_bank", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        # Z for the student-anchored and the teacher-anchored scores; negative until the first batch sets them.
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self._first_forward_done = False
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_first_forward())

    def _forget_first_forward(self) -> None:
        self._first_forward_done = False  # loaded state: check it again before the next scores

    def scores(self, anchors: torch.Tensor, bank: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """``exp(<anchor_i, bank[contrast_ij]> / T)`` for ``contrast`` ``(B, 1 + K)``: ``(B, 1 + K)``, unnormalised."""
        rows = bank.index_select(0, contrast.flatten()).view(*contrast.shape, bank.shape[1])
        return torch.exp(torch.bmm(rows, anchors.unsqueeze(2)).squeeze(2) / self.temperature)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, indices: torch.Tensor,
                contrast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised scores ``(student-anchored, teacher-anchored)``, each ``(B, 1 + K)``: the student's
        embeddings ``v_s`` against the teacher's bank at ``contrast`` and ``v_t`` against the student's; then
        both banks' rows at ``indices`` move toward this batch's embeddings."""
        with torch.autocast(v_s.device.type, enabled=False):  # bmm would run in bf16 under autocast
            v_s, v_t = v_s.float(), v_t.float()
            if not self._first_forward_done:
                self._share_banks()
            out_s = self.scores(v_s, self.teacher_bank, contrast)
            out_t = self.scores(v_t, self.student_bank, contrast)
            if not self._first_forward_done:
                self._set_normalizers(out_s, out_t)
                self._first_forward_done = True
            out_s, out_t = out_s / self.normalizers[0], out_t / self.normalizers[1]
            self.update(indices, v_s, v_t)
        return out_s, out_t

    @torch.no_grad()
    def update(self, indices: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Both banks' rows at ``indices`` (of every rank, when distributed) moved toward the embeddings."""
        indices, v_s, v_t = gather_across_ranks(indices, v_s.detach(), v_t.detach())
        for bank, embeddings in ((self.student_bank, v_s), (self.teacher_bank, v_t)):
            bank.index_copy_(0, indices, momentum_update(bank.index_select(0, indices), embeddings, self.momentum))

    @torch.no_grad()
    def _share_banks(self) -> None:
        if distributed():
            for buffer in (self.student_bank, self.teacher_bank, self.normalizers):
                dist.broadcast(buffer, src=0)

    @torch.no_grad()
    def _set_normalizers(self, out_s: torch.Tensor, out_t: torch.Tensor) -> None:
        """``Z = mean score x n_data`` from the first batch, as the reference sets it (read once per process,
        so no step after the first waits on the device); averaged over the ranks."""
        if bool((self.normalizers > 0).all()):  # restored from a checkpoint
            return
        estimate = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
        if distributed():
            dist.all_reduce(estimate)
            estimate /= dist.get_world_size()
        self.normalizers.copy_(estimate)


class ContrastSampler(nn.Module):
    """Each image's contrast indices: its own index first (the positive, RepDistiller's ``mode='exact'``), then
    ``k`` indices of training images of other classes drawn uniformly, with replacement (see the module).

    Built from the label of every training image in index order; holds them sorted by class (buffers that
    move with ``.to(device)``, not saved: they follow from the labels).
    """

    def __init__(self, labels: torch.Tensor) -> None:
        super().__init__()
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        counts = torch.bincount(labels)
        if (counts == len(labels)).any():
            raise ValueError("contrastive sampling needs images of at least two classes to draw negatives from")
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def draw(self, labels: torch.Tensor, indices: torch.Tensor, k: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 1 + k)`` dataset indices for a batch with these ``labels`` and dataset ``indices``."""
        n = len(self.by_class)
        start, count = self.class_start[labels].unsqueeze(1), self.class_count[labels].unsqueeze(1)
        # A position among the n - count rows outside the image's class (float64: exact for any dataset size),
        # then stepped over the class's own block of the class-sorted order.
        u = torch.rand(len(labels), k, dtype=torch.float64, device=labels.device, generator=generator)
        position = (u * (n - count)).long()
        position = position + count * (position >= start)
        return torch.cat([indices.unsqueeze(1), self.by_class[position]], dim=1)
