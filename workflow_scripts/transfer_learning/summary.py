"""The summary table: one row per experiment and stage, the best marked."""

from __future__ import annotations

import math

from . import checkpoint, usage
from .errors import UserError
from .io import read_tsv, write_tsv

# The choices of the config key `summary_metric` (config/schema.yaml); higher is better.
SUMMARY_METRICS = ("test_accuracy", "test_macro_f1", "test_roc_auc")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summary_row(run: dict, test_split: str = "test") -> dict:
    """One experiment and stage: its overrides, test metrics and training effort."""
    state = checkpoint.load_stage(run["checkpoint"])
    by_split = {r["split"]: r for r in read_tsv(run["metrics"])}
    if test_split not in by_split:
        raise UserError(f"{run['metrics']} has no row for split '{test_split}'")
    test = by_split[test_split]
    row = {"experiment": run["experiment"], "stage": run["stage"]}
    row.update(_flatten(run.get("overrides") or {}))
    for name in ("accuracy", "macro_f1", "roc_auc", "loss"):
        row[f"test_{name}"] = float(test[name]) if test.get(name) not in (None, "") else None
    row["epochs_run"] = state.epochs_run
    row["best_epoch"] = state.best_epoch
    row["kept"] = state.kept
    row["train_seconds"] = round(float(state.train_seconds), 2)
    rows = [r for path in run.get("usage", []) for r in read_tsv(path)]
    row.update(usage.summary(rows))
    return row


def _undefined(value) -> bool:
    """None, an empty cell or NaN: the run has no value for the metric."""
    if value is None or value == "":
        return True
    return math.isnan(float(value))


def summarize(rows: list[dict], output: str, sort_by: str = "test_accuracy") -> None:
    """One row per experiment and stage, highest `sort_by` first and marked best.

    Ties keep the experiments' configured order. A run whose `sort_by` is undefined (None,
    empty or NaN, e.g. the ROC AUC of a test split with a single class) cannot be ranked: a
    UserError names those runs and the metric, and nothing is written.
    """
    missing = [row for row in rows if _undefined(row.get(sort_by))]
    if missing:
        runs = ", ".join(
            f"experiment '{r.get('experiment')}' stage '{r.get('stage')}'" for r in missing
        )
        others = [
            m
            for m in SUMMARY_METRICS
            if m != sort_by and not any(_undefined(r.get(m)) for r in rows)
        ]
        hint = f" (defined for every run: {', '.join(others)})" if others else ""
        raise UserError(
            f"summary metric '{sort_by}' is undefined (empty or NaN) for {runs}, so the runs "
            f"cannot be ranked by it; set the config key summary_metric to another metric"
            f"{hint}, or check the test split of those runs in their metrics.tsv"
        )
    # Stable sort: ties keep the experiments' configured order.
    rows = sorted(rows, key=lambda row: float(row[sort_by]), reverse=True)
    for i, row in enumerate(rows):
        row["best"] = "yes" if i == 0 else ""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    write_tsv(output, rows, columns)
