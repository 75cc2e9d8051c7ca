"""transfer_learning.summary: ranking by summary_metric, and the error when a run has no
value for it (instead of ranking it last)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from helpers import stage_checkpoint  # noqa: E402
from transfer_learning import checkpoint, summary  # noqa: E402
from transfer_learning.errors import UserError  # noqa: E402
from transfer_learning.io import read_tsv, write_tsv  # noqa: E402


def _row(experiment, stage, accuracy, roc_auc, macro_f1=0.5):
    return {
        "experiment": experiment,
        "stage": stage,
        "test_accuracy": accuracy,
        "test_macro_f1": macro_f1,
        "test_roc_auc": roc_auc,
        "test_loss": 0.3,
    }


def test_valid_metric_sorts_and_marks_best(tmp_path):
    rows = [
        _row("baseline", "head", 0.70, 0.80),
        _row("baseline", "finetune", 0.90, 0.85),
        _row("lr_high", "head", 0.80, 0.95),
    ]
    out = tmp_path / "summary.tsv"
    summary.summarize([dict(r) for r in rows], str(out), "test_roc_auc")
    table = read_tsv(out)
    assert [(r["experiment"], r["stage"]) for r in table] == [
        ("lr_high", "head"),
        ("baseline", "finetune"),
        ("baseline", "head"),
    ]
    assert [r["best"] for r in table] == ["yes", "", ""]
    summary.summarize([dict(r) for r in rows], str(out), "test_accuracy")
    table = read_tsv(out)
    assert (table[0]["experiment"], table[0]["stage"], table[0]["best"]) == (
        "baseline",
        "finetune",
        "yes",
    )
    assert [r["best"] for r in table[1:]] == ["", ""]


def test_ties_keep_configured_order(tmp_path):
    rows = [_row("first", "head", 0.8, 0.9), _row("second", "head", 0.8, 0.9)]
    rows.append(_row("third", "head", 0.9, 0.7))
    out = tmp_path / "summary.tsv"
    summary.summarize(rows, str(out), "test_accuracy")
    table = read_tsv(out)
    assert [r["experiment"] for r in table] == ["third", "first", "second"]
    summary.summarize([_row("b", "head", 0.8, 0.9), _row("a", "head", 0.8, 0.9)], str(out))
    assert [(r["experiment"], r["best"]) for r in read_tsv(out)] == [("b", "yes"), ("a", "")]


@pytest.mark.parametrize("undefined", [None, math.nan, ""])
def test_undefined_summary_metric_is_a_user_error(tmp_path, undefined):
    rows = [
        _row("baseline", "head", 0.70, 0.80),
        _row("one_class_test", "finetune", 0.90, undefined),
        _row("lr_high", "head", 0.80, undefined),
    ]
    out = tmp_path / "summary.tsv"
    with pytest.raises(UserError) as caught:
        summary.summarize(rows, str(out), "test_roc_auc")
    message = str(caught.value)
    assert "'test_roc_auc'" in message
    assert "experiment 'one_class_test' stage 'finetune'" in message
    assert "experiment 'lr_high' stage 'head'" in message
    assert "baseline" not in message  # defined for it: not named
    assert "summary_metric" in message  # the config key to change
    assert "test_accuracy, test_macro_f1" in message  # what it could be set to
    assert "\n" not in message  # cli.run prints it as one line
    assert isinstance(caught.value, ValueError)
    assert not out.exists()  # no half-ranked table


def test_undefined_everywhere_suggests_only_defined_metrics(tmp_path):
    rows = [_row("a", "head", 0.7, None, macro_f1=None), _row("b", "head", 0.8, None)]
    with pytest.raises(UserError) as caught:
        summary.summarize(rows, str(tmp_path / "s.tsv"), "test_roc_auc")
    message = str(caught.value)
    assert "experiment 'a' stage 'head', experiment 'b' stage 'head'" in message
    assert "defined for every run: test_accuracy)" in message
    assert "test_macro_f1" not in message


def test_summary_row_nan_from_metrics_tsv_is_an_error_not_last(tmp_path):
    # A test split with a single class: metrics.tsv's roc_auc is "nan".
    saved = tmp_path / "model.pt"
    checkpoint.save(stage_checkpoint(epochs_run=3, best_epoch=2, train_seconds=1.234), saved)
    runs = []
    for name, auc in (("good", 0.75), ("single_class", math.nan)):
        path = tmp_path / f"{name}.tsv"
        write_tsv(
            path,
            [{"split": "test", "accuracy": 0.5, "macro_f1": 0.4, "roc_auc": auc, "loss": 0.7}],
        )
        runs.append(
            {"experiment": name, "stage": "head", "metrics": str(path), "checkpoint": str(saved)}
        )
    rows = [summary.summary_row(run) for run in runs]
    assert rows[0]["test_roc_auc"] == 0.75 and math.isnan(rows[1]["test_roc_auc"])
    with pytest.raises(UserError, match="experiment 'single_class' stage 'head'"):
        summary.summarize(rows, str(tmp_path / "summary.tsv"), "test_roc_auc")
    summary.summarize(rows, str(tmp_path / "summary.tsv"), "test_accuracy")
    table = read_tsv(tmp_path / "summary.tsv")
    assert [r["best"] for r in table] == ["yes", ""]
    assert table[1]["test_roc_auc"] == "nan"
