"""The selected epoch (``train_loop.Selection``): the best by validation top-1, never by test; the
earliest of equals; its weights a copy taken at that epoch; the last epoch without a validation split;
and the same choice after a resume from the checkpoint's state."""

from __future__ import annotations

import math

import torch

from pipeline.train.worker_loop import Selection


def epoch_metrics(val: float | None, test: float) -> dict[str, float]:
    out = {"test/top1": test, "test/ece": test / 1000}
    if val is not None:
        out["val/top1"] = val
    return out


def run_epochs(selection: Selection, model: torch.nn.Module, scores: list[tuple[float | None, float]],
               first_epoch: int = 0, rank: int = 0) -> None:
    """Each epoch sets the model's weight to the epoch's number, then reports its scores."""
    for epoch, (val, test) in enumerate(scores, start=first_epoch):
        with torch.no_grad():
            model.weight.fill_(epoch)
        selection.update(epoch, epoch_metrics(val, test), model, rank)


def test_the_best_validation_epoch_is_selected_not_the_best_test_or_the_last():
    model, selection = torch.nn.Linear(2, 1, bias=False), Selection(has_val=True)
    # validation peaks at epoch 1, test at epoch 2, the last epoch is 3
    run_epochs(selection, model, [(50.0, 70.0), (80.0, 60.0), (70.0, 95.0), (60.0, 65.0)])
    assert selection.metrics() == {"selected/epoch": 1, "selected/test_top1": 60.0,
                                   "selected/test_ece": 0.06, "selected/val_top1": 80.0}
    # its weights are those of epoch 1, copied then: the model has moved on to epoch 3's since
    assert torch.all(selection.state(model)["student"]["weight"] == 1.0)
    assert torch.all(model.weight == 3.0)


def test_the_earliest_of_equal_validation_scores_is_kept():
    model, selection = torch.nn.Linear(2, 1, bias=False), Selection(has_val=True)
    run_epochs(selection, model, [(60.0, 50.0), (75.0, 70.0), (75.0, 90.0), (75.0, 99.0)])
    assert selection.metrics()["selected/epoch"] == 1 and selection.metrics()["selected/test_top1"] == 70.0
    assert torch.all(selection.state(model)["student"]["weight"] == 1.0)


def test_without_validation_the_last_epoch_is_selected_with_the_current_weights():
    model, selection = torch.nn.Linear(2, 1, bias=False), Selection(has_val=False)
    run_epochs(selection, model, [(None, 90.0), (None, 60.0), (None, 70.0)])
    metrics = selection.metrics()
    assert metrics == {"selected/epoch": 2, "selected/test_top1": 70.0, "selected/test_ece": 0.07}
    assert torch.all(selection.state(model)["student"]["weight"] == 2.0)


def test_a_resumed_selection_keeps_the_epoch_chosen_before_the_stop():
    model, before = torch.nn.Linear(2, 1, bias=False), Selection(has_val=True)
    run_epochs(before, model, [(50.0, 50.0), (85.0, 60.0), (70.0, 70.0)])
    state = before.state(model)
    after = Selection(has_val=True, state=state)
    run_epochs(after, model, [(80.0, 99.0), (85.0, 99.0)], first_epoch=3)  # neither beats epoch 1's 85
    assert after.metrics()["selected/epoch"] == 1 and after.metrics()["selected/test_top1"] == 60.0
    assert torch.all(after.state(model)["student"]["weight"] == 1.0)
    run_epochs(after, model, [(90.0, 40.0)], first_epoch=5)
    assert after.metrics()["selected/epoch"] == 5 and torch.all(after.state(model)["student"]["weight"] == 5.0)


def test_nothing_is_selected_before_the_first_evaluation_and_other_ranks_keep_no_weights():
    model = torch.nn.Linear(2, 1, bias=False)
    assert Selection(has_val=True).metrics() == {}
    other_rank = Selection(has_val=True)
    run_epochs(other_rank, model, [(50.0, 40.0), (60.0, 45.0)], rank=1)
    assert other_rank.metrics()["selected/epoch"] == 1  # every rank agrees on the epoch ...
    assert other_rank.state(model)["student"] is None  # ... only rank 0 holds a copy of the weights
    assert math.isinf(Selection(has_val=True).state(model)["val_top1"])
