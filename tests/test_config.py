"""The configuration through the real Snakemake command line: schema errors at parse time,
experiments and grids, other class sets and split names from an overlay alone, the
configuration as shipped, numbers written as text, YAML mistakes in an overlay.

The pure config helpers of transfer_learning.settings are tested in test_settings.py; lint,
formatting and the Expanse profile in test_lint.py."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import (
    REPO,
    STAGE_OUTPUTS,
    VENV_BIN,
    assert_ok,
    job_stats,
    jobs,
    overlay,
    small_config,
    snakemake,
    tail,
    write_images,
)
from transfer_learning.io import read_tsv


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A valid data set (absolute path): a run with a good config would start jobs on it."""
    counts = {
        "train": {"cats": 4, "dogs": 4},
        "val": {"cats": 2, "dogs": 2},
        "test": {"cats": 2, "dogs": 2},
    }
    root = write_images(tmp_path_factory.mktemp("tiny") / "images", counts, size=32, seed=3)
    return root, counts


def _assert_rejected_before_jobs(proc, workdir):
    assert proc.returncode != 0, tail(proc.stdout)
    assert "Job stats" not in proc.stdout, "a job was scheduled:\n" + tail(proc.stdout)
    assert not jobs(proc.stdout)
    assert not (workdir / "results").exists()
    assert not (workdir / "logs").exists()


# case -> (overrides of small_config, strings that one line of the error must hold together)
BAD_VALUES = {
    "negative_lr": ({"head": {"lr": -1}}, ["head.lr", "-1"]),
    "zero_epochs": ({"finetune": {"epochs": 0}}, ["finetune.epochs", "0"]),
    "image_size_16": ({"model": {"image_size": 16}}, ["model.image_size", "16"]),
    "wrong_type": ({"head": {"batch_size": "big"}}, ["head.batch_size", "big"]),
    "unknown_key": ({"head": {"lrr": 1.0e-3}}, ["head", "'lrr'"]),
    "unknown_top_level_key": ({"hed": {"lr": 1.0e-3}}, ["top level", "'hed'"]),
    "unknown_backbone": (
        {"model": {"backbone": "mobilenet_v9"}},
        ["model.backbone", "mobilenet_v9"],
    ),
    "unknown_weights": (
        {"model": {"weights": "IMAGENET9K_V7"}},
        ["model.weights", "IMAGENET9K_V7"],
    ),
    "bad_experiment_value": (
        {"experiments": {"baseline": {}, "fast": {"head": {"lr": -2}}}},
        ["experiments.fast"],
    ),
    "grid_point_named_like_an_experiment": (
        {
            "experiments": {
                "baseline": {},
                "ft_lr0.001": {"head": {"epochs": 2}},
                "ft": {"grid": {"finetune.lr": [0.001, 0.01]}},
            }
        },
        ["'ft_lr0.001'", "experiments.ft_lr0.001", "grid of experiments.ft"],
    ),
    "unknown_section_in_experiment": (
        {"experiments": {"baseline": {}, "typo": {"hed": {"lr": 0.1}}}},
        ["experiments.typo", "hed"],
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_data):
    """Every bad config of BAD_VALUES, run for real (no -n), a few at a time."""
    root, counts = tiny_data
    base = tmp_path_factory.mktemp("bad_configs")

    def run(case):
        config = overlay(
            base / f"{case}.yaml", small_config(str(root), counts, **BAD_VALUES[case][0])
        )
        workdir = base / case
        return case, snakemake(workdir, "--configfile", config, timeout=120), workdir

    with ThreadPoolExecutor(max_workers=3) as pool:
        return {case: (proc, workdir) for case, proc, workdir in pool.map(run, BAD_VALUES)}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_config_rejected_naming_the_key(case, bad_runs):
    proc, workdir = bad_runs[case]
    _assert_rejected_before_jobs(proc, workdir)
    named = BAD_VALUES[case][1]
    lines = [line for line in proc.stdout.splitlines() if all(n in line for n in named)]
    assert lines, f"no line names {named}:\n{tail(proc.stdout)}"


def test_bad_experiment_value_names_experiment_and_key(bad_runs):
    proc, _ = bad_runs["bad_experiment_value"]
    assert "head.lr" in proc.stdout
    assert "-2" in proc.stdout


def test_experiments_sharing_features_extract_once(tmp_path, tiny_data):
    """Experiments differing only after the features share one extraction per split."""
    root, counts = tiny_data
    config = small_config(
        str(root),
        counts,
        experiments={
            "baseline": {},
            "fast": {"finetune": {"lr": 1.0e-3}, "head": {"epochs": 2}},
            "bigger": {"model": {"image_size": 48}},
        },
    )
    workdir = tmp_path / "work"
    proc = snakemake(workdir, "-n", "--configfile", overlay(tmp_path / "o.yaml", config))
    assert_ok(proc)
    stats = job_stats(proc.stdout)
    assert stats["extract_features"] == 4  # two feature keys x (train, val)
    assert stats["train_head"] == 3
    assert stats["finetune"] == 3
    assert stats["evaluate"] == 6
    assert stats["summarize"] == 1
    keys = {j["wildcards"] for j in jobs(proc.stdout) if j["rule"] == "extract_features"}
    assert any("32px" in k for k in keys) and any("48px" in k for k in keys)
    finetunes = {j["wildcards"] for j in jobs(proc.stdout) if j["rule"] == "finetune"}
    assert finetunes == {f"experiment={e}" for e in ("baseline", "fast", "bigger")}


def test_grid_experiments_expand_into_named_runs(tmp_path, tiny_data):
    root, counts = tiny_data
    config = small_config(
        str(root),
        counts,
        experiments={"baseline": {}, "lrs": {"grid": {"finetune.lr": [1.0e-5, 1.0e-4]}}},
    )
    workdir = tmp_path / "work"
    proc = snakemake(workdir, "-n", "--configfile", overlay(tmp_path / "o.yaml", config))
    assert_ok(proc)
    finetunes = {j["wildcards"] for j in jobs(proc.stdout) if j["rule"] == "finetune"}
    assert finetunes == {
        "experiment=baseline",
        "experiment=lrs_lr1e-05",
        "experiment=lrs_lr0.0001",
    }
    assert job_stats(proc.stdout)["extract_features"] == 2


# ---- a data set with three other classes, from an overlay alone -------------------------

# Other split folder names too: nothing may assume train/val/test.
THREE_SPLITS = ["training", "validation", "testing"]
THREE = {
    "training": {"ants": 12, "bees": 12, "wasps": 12},
    "validation": {"ants": 6, "bees": 6, "wasps": 6},
    "testing": {"ants": 6, "bees": 6, "wasps": 6},
}
THREE_CLASSES = ["ants", "bees", "wasps"]


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """verify_dataset alone, then every stage up to the summary, on ants/bees/wasps in
    training/validation/testing folders (same workdir)."""
    workdir = tmp_path_factory.mktemp("three_class")
    write_images(workdir / "data" / "insects", THREE, size=48, seed=11)
    config = overlay(
        workdir / "insects.yaml",
        small_config("data/insects", THREE, data={"splits": THREE_SPLITS}),
    )
    verify = snakemake(workdir, "verify_dataset", "--configfile", config, timeout=300)
    full = snakemake(workdir, *STAGE_OUTPUTS, "--configfile", config, timeout=600)
    return workdir, verify, full


def test_three_classes_verify_from_overlay_alone(three_class):
    workdir, verify, _ = three_class
    assert_ok(verify, "verify_dataset on three classes")
    assert set(job_stats(verify.stdout)) == {"verify_dataset"}
    counts = read_tsv(workdir / "results" / "data" / "counts.tsv")
    # The overlay's expected_counts replaced the default cats/dogs ones as a whole.
    assert {(r["split"], r["class"]) for r in counts} == {
        (s, c) for s in THREE for c in THREE_CLASSES
    }
    assert all(r["status"] == "ok" for r in counts)
    assert {int(r["found"]) for r in counts if r["split"] == "training"} == {12}
    manifest = read_tsv(workdir / "results" / "data" / "manifest.tsv")
    assert len(manifest) == 72


def test_three_classes_full_run_softmax_metrics(three_class):
    workdir, _, full = three_class
    assert_ok(full, "full run on three classes")
    for stage in ("head", "finetune"):
        eval_dir = workdir / "results" / "baseline" / "eval" / stage
        metrics = read_tsv(eval_dir / "metrics.tsv")
        assert [r["split"] for r in metrics] == ["validation", "testing"]
        columns = list(metrics[0])
        for name in THREE_CLASSES:
            for kind in ("precision", "recall", "f1"):
                assert f"{kind}_{name}" in columns
        assert not any(c.endswith(("_cats", "_dogs")) for c in columns)
        # Three classes: macro one-vs-rest ROC AUC, as the ROC plot shows.
        assert all(0.0 <= float(r["roc_auc"]) <= 1.0 for r in metrics)
        assert {int(r["n"]) for r in metrics} == {18}

        predictions = read_tsv(eval_dir / "predictions.tsv")
        assert len(predictions) == 36
        for row in predictions:
            probs = [float(row[f"p_{c}"]) for c in THREE_CLASSES]
            assert sum(probs) == pytest.approx(1.0, abs=1e-4)
            assert row["predicted"] == THREE_CLASSES[probs.index(max(probs))]
            assert float(row["probability"]) == pytest.approx(max(probs), abs=1e-6)
        confusion = read_tsv(eval_dir / "confusion.tsv")
        assert len(confusion) == 2 * 9

    # Three classes: a three-logit head (softmax), not the binary single logit.
    head = torch.load(workdir / "results/baseline/head/model.pt", weights_only=True)
    assert head["classes"] == THREE_CLASSES
    assert head["head"]["linear.weight"].shape[0] == 3
    finetuned = torch.load(workdir / "results/baseline/finetune/model.pt", weights_only=True)
    assert finetuned["model"]["head.linear.weight"].shape[0] == 3
    summary = read_tsv(workdir / "results" / "summary.tsv")
    assert {r["stage"] for r in summary} == {"head", "finetune"}
    assert all(0.0 <= float(r["test_roc_auc"]) <= 1.0 for r in summary)


# ---- the configuration as shipped; numbers and YAML mistakes in an overlay ---------------


def test_default_config_dry_run_plans_every_stage(tmp_path):
    """The course configuration as shipped: pretrained weights fetched, then every stage."""
    proc = snakemake(tmp_path / "work", "-n", timeout=180)
    assert_ok(proc)
    stats = job_stats(proc.stdout)
    expected = {
        "verify_dataset": 1,
        "fetch_weights": 1,
        "extract_features": 2,
        "train_head": 1,
        "finetune": 1,
        "evaluate": 2,
        "summarize": 1,
        "all": 1,
    }
    assert {rule: stats.get(rule) for rule in expected} == expected, stats
    fetch = [j for j in jobs(proc.stdout) if j["rule"] == "fetch_weights"]
    assert fetch[0]["outputs"][0].startswith("resources/weights/mobilenet_v2-")


def test_numbers_written_without_a_dot_are_numbers(tmp_path, tiny_data):
    """YAML reads `1e-5` as text; the workflow reads it as the number the user meant."""
    root, counts = tiny_data
    config = overlay(tmp_path / "c.yaml", small_config(str(root), counts))
    text = config.read_text().replace("lr: 0.0001", "lr: 1e-5")
    assert "lr: 1e-5" in text
    config.write_text(text + "experiments:\n  baseline: {}\n  slow: {head: {lr: 5e-4}}\n")
    proc = snakemake(tmp_path / "work", "-n", "-p", "--configfile", config, timeout=120)
    assert_ok(proc)
    assert "read config key finetune.lr as a number" in proc.stdout
    assert '"lr": 1e-05' in proc.stdout
    assert '"lr": 0.0005' in proc.stdout  # in an experiment's overrides too


def test_yaml_mistake_in_an_overlay_is_named_with_file_and_line(tmp_path):
    """Snakemake's own message names neither; check_config.py (README) does."""
    bad = tmp_path / "my.yaml"
    bad.write_text("head:\n  lr: 1.0e-3\n  epochs: [3\nfinetune:\n  lr: 1e-5\n")
    proc = snakemake(tmp_path / "work", "-n", "--configfile", bad, timeout=120)
    assert proc.returncode != 0 and "not valid JSON or YAML" in proc.stdout
    checker = subprocess.run(
        [str(VENV_BIN / "python"), str(REPO / "workflow_scripts" / "check_config.py"), bad],
        capture_output=True,
        text=True,
    )
    assert checker.returncode == 1
    assert f"check_config: {bad}, line 4, column 9" in checker.stderr, checker.stderr
    good = tmp_path / "good.yaml"
    good.write_text("finetune:\n  lr: 1e-5\nhead:\n  epochs: 0\n")
    checker = subprocess.run(
        [str(VENV_BIN / "python"), str(REPO / "workflow_scripts" / "check_config.py"), good],
        capture_output=True,
        text=True,
    )
    assert checker.returncode == 1
    assert "config key head.epochs: 0 is less than the minimum of 1" in checker.stderr
    assert "finetune.lr" not in checker.stderr  # 1e-5 is a number
