"""transfer_learning.train: the training loop both stages use, early stopping, warm-up, and
its resume file (interrupted by SIGUSR1 as Slurm does; resumed, it equals an uninterrupted
run). On a toy problem: a head on random features."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import StopAfter
from torch import nn
from torch.utils.data import TensorDataset
from transfer_learning import data, io, models, train
from transfer_learning.usage import UsageLog
from transfer_learning.usage import summary as summary_of_usage


def _toy_problem(flip_val: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xv = torch.randn(48, 8, generator=g)
    yv = (xv[:, 0] + 0.5 * xv[:, 1] > 0).long()
    if flip_val:
        yv = 1 - yv  # learning the training rule makes validation worse
    return TensorDataset(x, y), TensorDataset(xv, yv)


def _toy_model(train_set, init_seed=0, lr=0.05):
    torch.manual_seed(init_seed)
    head = models.Head(8, 2, dropout=0.3)
    head.fit_standardisation(train_set.tensors[0])
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = train.warmup_then_constant(optimizer, 2, 0.5)
    return head, optimizer, scheduler


def _fit(train_set, val_set, model, optimizer, scheduler, *, epochs, early, resume=None, **kw):
    return train.fit(
        model,
        lambda epoch: data.make_loader(train_set, 16, shuffle=True, seed=5, epoch=epoch),
        data.make_loader(val_set, 64),
        optimizer,
        scheduler,
        num_classes=2,
        epochs=epochs,
        seed=5,
        device=torch.device("cpu"),
        early_stopping=early,
        resume_path=resume,
        resume_key=kw.pop("resume_key", "toy"),
        **kw,
    )


def test_early_stopping_step_respects_min_delta():
    early = train.EarlyStopping(patience=2, min_delta=1e-3)
    assert early.step(1.0, 1)
    assert not early.step(0.9995, 2)  # better, but by less than min_delta
    assert not early.should_stop
    assert not early.step(1.2, 3)
    assert early.should_stop and early.best_epoch == 1
    assert not train.EarlyStopping(patience=None).should_stop


def test_fit_stops_early_and_keeps_the_best_epoch():
    train_set, val_set = _toy_problem(flip_val=True)
    model, optimizer, scheduler = _toy_model(train_set)
    result = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=30,
        early=train.EarlyStopping(patience=2),
    )  # fmt: skip
    val_losses = [row["val_loss"] for row in result.history]
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 30
    assert result.best_epoch == 1 + int(np.argmin(val_losses))
    assert result.best_val_loss == min(val_losses)
    assert [row["epoch"] for row in result.history] == list(range(1, len(val_losses) + 1))
    # Linear warm-up over two epochs from half the lr, then the full lr.
    assert [row["lr"] for row in result.history[:3]] == pytest.approx([0.025, 0.0375, 0.05])
    # The weights kept are the best epoch's: they give exactly its validation loss.
    model.load_state_dict(result.best_state)
    loss, _ = train.validate(
        model, data.make_loader(val_set, 64), nn.BCEWithLogitsLoss(), 2, torch.device("cpu")
    )
    assert loss == pytest.approx(result.history[result.best_epoch - 1]["val_loss"], abs=1e-6)


def _history_without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_fit_resumed_after_interruption_equals_uninterrupted(tmp_path):
    train_set, val_set = _toy_problem(flip_val=False)
    model, optimizer, scheduler = _toy_model(train_set)
    full = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=6,
        early=train.EarlyStopping(patience=10), resume=tmp_path / "full.pt",
    )  # fmt: skip
    full_weights = {k: v.clone() for k, v in model.state_dict().items()}

    resume = tmp_path / "resume.pt"
    model, optimizer, scheduler = _toy_model(train_set)
    val_loader = data.make_loader(val_set, 64)

    def interrupted_loader_for(epoch):
        loader = data.make_loader(train_set, 16, shuffle=True, seed=5, epoch=epoch)
        return StopAfter(loader, 2) if epoch == 4 else loader

    with pytest.raises(train.TrainingInterrupted):
        train.fit(
            model, interrupted_loader_for, val_loader, optimizer, scheduler,
            num_classes=2, epochs=6, seed=5, device=torch.device("cpu"),
            early_stopping=train.EarlyStopping(patience=10), resume_path=resume,
            resume_key="toy", usage=UsageLog("toy", torch.device("cpu")),
        )  # fmt: skip
    saved = io.load_checkpoint(resume)
    assert saved["epoch"] == 3 and len(saved["history"]) == 3

    # A new process: other initial weights, fresh optimizer; everything comes from the file.
    model, optimizer, scheduler = _toy_model(train_set, init_seed=99)
    usage = UsageLog("toy", torch.device("cpu"))
    resumed = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=6,
        early=train.EarlyStopping(patience=10), resume=resume, usage=usage,
    )  # fmt: skip
    assert resumed.resumed_from == 3
    # The usage record keeps the first job's finished epochs; the interrupted epoch 4 of
    # that job never completed a pass over its loader and left no row.
    assert [(r["pass"], r["epoch"]) for r in usage.rows] == [
        (name, epoch) for epoch in range(1, 7) for name in ("train", "validate")
    ]
    assert {r["images"] for r in usage.rows} == {96, 48}
    assert _history_without_seconds(resumed.history) == _history_without_seconds(full.history)
    assert resumed.best_epoch == full.best_epoch
    for key, value in full_weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    for key, value in full.best_state.items():
        assert torch.equal(resumed.best_state[key], value), key


def test_fit_ignores_a_resume_file_of_other_settings(tmp_path):
    train_set, val_set = _toy_problem(flip_val=False)
    resume = tmp_path / "resume.pt"
    model, optimizer, scheduler = _toy_model(train_set)
    _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=2,
        early=train.EarlyStopping(), resume=resume, resume_key="old",
    )  # fmt: skip
    assert io.load_checkpoint(resume)["epoch"] == 2
    model, optimizer, scheduler = _toy_model(train_set)
    result = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=3,
        early=train.EarlyStopping(), resume=resume, resume_key="new",
    )  # fmt: skip
    assert result.resumed_from == 0
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


def test_early_stopping_on_validation_accuracy_wants_it_higher():
    early = train.EarlyStopping(patience=2, min_delta=0.01, monitor="val_accuracy")
    assert early.step(0.5, 1) and early.step(0.7, 2)
    assert not early.step(0.705, 3)  # better by less than min_delta
    assert not early.step(0.6, 4)
    assert early.should_stop and early.best_epoch == 2 and early.best == 0.7


def test_fit_keeps_the_epoch_the_monitor_picks_and_says_why():
    train_set, val_set = _toy_problem(flip_val=True)
    by_accuracy = _fit(
        train_set, val_set, *_toy_model(train_set), epochs=8,
        early=train.EarlyStopping(patience=3, monitor="val_accuracy"),
    )  # fmt: skip
    accuracies = [row["val_acc"] for row in by_accuracy.history]
    assert by_accuracy.best_epoch == 1 + int(np.argmax(accuracies))
    kept = by_accuracy.best_epoch
    assert by_accuracy.best_val_loss == by_accuracy.history[kept - 1]["val_loss"]
    assert by_accuracy.kept.startswith(f"epoch {kept} of {len(accuracies)}: highest val_accuracy")

    last = _fit(
        train_set, val_set, *_toy_model(train_set), epochs=4,
        early=train.EarlyStopping(patience=10), restore_best=False,
    )  # fmt: skip
    assert last.best_epoch == 4 and "the last epoch (restore_best: false)" in last.kept
    assert "all 4 epochs run" in last.kept


class _SlowLoader:
    """Batches that take a while to arrive, as from a data loader short of CPUs."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_usage_names_a_loader_bound_pass():
    batches = [(torch.zeros(4, 3), torch.zeros(4)) for _ in range(5)]
    usage = UsageLog("toy", torch.device("cpu"))
    assert sum(len(x) for x, _ in usage.measure(_SlowLoader(batches, 0.02), "train", 1)) == 20
    for _ in usage.measure(batches, "validate", 1):
        time.sleep(0.02)  # the work, with batches ready at once
    slow, fast = usage.rows
    assert (slow["pass"], slow["epoch"], slow["images"]) == ("train", 1, 20)
    assert slow["loader_wait_fraction"] > 0.8 > 0.2 > fast["loader_wait_fraction"]
    assert slow["device"].startswith("cpu") and slow["peak_gpu_mb"] == ""
    assert slow["images_per_s"] == pytest.approx(20 / slow["seconds"], rel=0.05)
    figures = summary_of_usage([{k: str(v) for k, v in r.items()} for r in usage.rows])
    assert figures["images_per_s"] == slow["images_per_s"]  # training passes only
    assert figures["loader_wait_fraction"] == slow["loader_wait_fraction"]
