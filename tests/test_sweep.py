"""Experiments: a grid sweep fans out into independent chains that share one extraction."""

from __future__ import annotations

import csv
import zipfile

from helpers import REPO, assert_ok, job_stats, overlay, snakemake

GRID_4 = {"sweep": {"grid": {"head.lr": [1.0e-3, 3.0e-3], "finetune.lr": [1.0e-4, 1.0e-3]}}}
NAMES_4 = {
    "sweep_lr0.001_lr0.0001",
    "sweep_lr0.001_lr0.001",
    "sweep_lr0.003_lr0.0001",
    "sweep_lr0.003_lr0.001",
}


def test_grid_names_are_readable_and_stable(tmp_path):
    """The 12-experiment sweep of the README: lr x unfrozen blocks x dropout."""
    config = overlay(
        tmp_path / "sweep12.yaml",
        {
            "experiments": {
                "ft": {
                    "grid": {
                        "finetune.lr": [1.0e-5, 3.0e-5, 1.0e-4],
                        "finetune.unfreeze_blocks": [3, 5],
                        "head.dropout": [0.2, 0.5],
                    }
                }
            }
        },
    )
    dry = snakemake(tmp_path / "w", "-n", "--configfile", REPO / "config" / "demo.yaml", config)
    assert_ok(dry)
    stats = job_stats(dry.stdout)
    # baseline + 12 grid points, each its own chain of head, fine tune and evaluations ...
    assert stats["train_head"] == 13 and stats["finetune"] == 13, stats
    assert stats["evaluate"] == 26, stats
    # ... on features extracted once per split for all of them.
    assert stats["extract_features"] == 2, stats
    assert "results/ft_lr1e-05_unfreeze_blocks3_dropout0.2/finetune/model.pt" in dry.stdout


def test_four_experiment_sweep_end_to_end(tmp_path):
    workdir = tmp_path / "sweep"
    config = overlay(
        workdir / "config" / "sweep.yaml",
        {
            # Short training: this checks the fan-out, not the accuracy.
            "head": {"epochs": 3},
            "finetune": {"epochs": 3, "patience": 3},
            "experiments": GRID_4,
        },
    )
    run = snakemake(workdir, "--configfile", REPO / "config" / "demo.yaml", config, timeout=1500)
    assert_ok(run, "4-experiment sweep")
    stats = job_stats(run.stdout)
    assert stats["extract_features"] == 2, stats  # train and val, once for all experiments
    assert stats["finetune"] == 5 and stats["train_head"] == 5, stats  # baseline + 4

    with open(workdir / "results" / "summary.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert {r["experiment"] for r in rows} == NAMES_4 | {"baseline"}
    assert len(rows) == 10
    assert [r["best"] for r in rows].count("yes") == 1
    assert rows[0]["best"] == "yes"
    accuracies = [float(r["test_accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    # The overrides are columns of their own.
    assert {"head.lr", "finetune.lr"} <= set(rows[0])
    sweep_row = next(r for r in rows if r["experiment"] == "sweep_lr0.003_lr0.0001")
    assert float(sweep_row["head.lr"]) == 3.0e-3 and float(sweep_row["finetune.lr"]) == 1.0e-4
    for row in rows:
        assert int(row["epochs_run"]) >= 1 and 1 <= int(row["best_epoch"]) <= 3

    for name in NAMES_4:
        for plot in ("learning_curves.png", "finetune_confusion_matrix.png", "head_roc_curve.png"):
            assert (workdir / "results" / name / "plots" / plot).stat().st_size > 5000
    assert (workdir / "results" / "plots" / "experiments.png").exists()

    report = snakemake(
        workdir,
        "--report",
        workdir / "report.zip",
        "--configfile",
        REPO / "config" / "demo.yaml",
        config,
        cores=None,
    )
    assert_ok(report, "report")
    archive = zipfile.ZipFile(workdir / "report.zip")
    members = archive.namelist()
    # One learning-curve figure per experiment, each filed under its experiment's name.
    assert sum(m.endswith("/learning_curves.png") for m in members) == 5
    text = "".join(
        archive.read(m).decode(errors="ignore") for m in members if m.endswith((".html", ".js"))
    )
    for name in NAMES_4:
        assert name in text, name
