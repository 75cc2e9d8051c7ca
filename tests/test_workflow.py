"""The whole workflow through the real Snakemake command line on small generated data:
outputs and their columns, the jobs' logs, benchmarks and resources, what re-runs after which
change, and bit-for-bit repeatability on CPU. Rule declarations are checked in test_lint.py."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from helpers import (
    GPU_RULES,
    REPO,
    SMALL_DATA,
    STAGE_OUTPUTS,
    assert_ok,
    copy_workdir,
    job_stats,
    jobs,
    overlay,
    small_config,
    snakemake,
    tail,
    write_images,
)
from transfer_learning.io import read_tsv

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
METRIC_COLUMNS = [
    "split", "n", "loss", "accuracy",
    "precision_cats", "recall_cats", "f1_cats",
    "precision_dogs", "recall_dogs", "f1_dogs",
    "macro_f1", "roc_auc",
]  # fmt: skip
PREDICTION_COLUMNS = ["split", "path", "true", "predicted", "probability", "p_cats", "p_dogs"]
SUMMARY_FIRST_COLUMNS = ["experiment", "stage", "test_accuracy", "test_macro_f1", "test_roc_auc"]
# Rules up to and including the head: a change to fine tuning must never re-run them.
BEFORE_FINETUNE = {
    "make_demo_data",
    "fetch_data",
    "fetch_weights",
    "verify_dataset",
    "extract_features",
    "train_head",
}


def _columns(path):
    with open(path, encoding="utf-8") as handle:
        return handle.readline().rstrip("\n").split("\t")


def _output(workdir) -> str:
    return (workdir / "snakemake_output.txt").read_text()


def _feature_dir(workdir):
    keys = sorted((workdir / "results" / "features").iterdir())
    assert len(keys) == 1, keys
    return keys[0]


# ---- the first run -----------------------------------------------------------------------


def test_every_stage_output_exists_with_its_columns(small_run):
    for path in STAGE_OUTPUTS:
        assert (small_run / path).is_file() and (small_run / path).stat().st_size > 0, path

    manifest = read_tsv(small_run / "results/data/manifest.tsv")
    assert _columns(small_run / "results/data/manifest.tsv") == [
        "split", "class", "path", "bytes", "width", "height", "sha256", "phash",
    ]  # fmt: skip
    assert len(manifest) == 96
    assert _columns(small_run / "results/data/counts.tsv") == [
        "split", "class", "found", "expected", "status",
    ]  # fmt: skip

    for stage, epochs in (("head", 3), ("finetune", 2)):
        history = small_run / f"results/baseline/{stage}/history.tsv"
        assert _columns(history) == HISTORY_COLUMNS
        rows = read_tsv(history)
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        assert 1 <= len(rows) <= epochs
        assert all(float(r["seconds"]) >= 0 for r in rows)

        folder = small_run / f"results/baseline/eval/{stage}"
        assert _columns(folder / "metrics.tsv") == METRIC_COLUMNS
        metrics = read_tsv(folder / "metrics.tsv")
        assert [(r["split"], r["n"]) for r in metrics] == [("val", "24"), ("test", "24")]
        for row in metrics:
            assert 0 <= float(row["accuracy"]) <= 1 and 0 <= float(row["roc_auc"]) <= 1

        assert _columns(folder / "predictions.tsv") == PREDICTION_COLUMNS
        predictions = read_tsv(folder / "predictions.tsv")
        expected_paths = sorted(r["path"] for r in manifest if r["split"] in ("val", "test"))
        assert sorted(p["path"] for p in predictions) == expected_paths
        for row in predictions:
            assert row["true"] == row["path"].split("/")[1]
            assert float(row["p_cats"]) + float(row["p_dogs"]) == pytest.approx(1, abs=1e-5)

        assert _columns(folder / "confusion.tsv") == ["split", "true", "predicted", "count"]
        confusion = read_tsv(folder / "confusion.tsv")
        for split in ("val", "test"):
            cells = {
                (r["true"], r["predicted"]): int(r["count"])
                for r in confusion
                if r["split"] == split
            }
            pairs = [(p["true"], p["predicted"]) for p in predictions if p["split"] == split]
            assert cells == {pair: pairs.count(pair) for pair in cells} and len(cells) == 4
            accuracy = next(float(m["accuracy"]) for m in metrics if m["split"] == split)
            assert accuracy == pytest.approx((cells["cats", "cats"] + cells["dogs", "dogs"]) / 24)

    summary = read_tsv(small_run / "results/summary.tsv")
    assert _columns(small_run / "results/summary.tsv")[:5] == SUMMARY_FIRST_COLUMNS
    assert sorted((r["experiment"], r["stage"]) for r in summary) == [
        ("baseline", "finetune"),
        ("baseline", "head"),
    ]
    assert [r["best"] for r in summary].count("yes") == 1
    assert summary[0]["best"] == "yes"
    for row in summary:
        test = next(
            m
            for m in read_tsv(small_run / f"results/baseline/eval/{row['stage']}/metrics.tsv")
            if m["split"] == "test"
        )
        assert row["test_accuracy"] == test["accuracy"]
        assert row["test_roc_auc"] == test["roc_auc"]
        history = read_tsv(small_run / f"results/baseline/{row['stage']}/history.tsv")
        assert int(row["epochs_run"]) == len(history)


def test_features_cached_for_train_and_val_only(small_run):
    folder = _feature_dir(small_run)
    assert folder.name.startswith("mobilenet_v2-random-32px-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "train.pt", "train_usage.tsv", "val.pt", "val_usage.tsv",
    ]  # fmt: skip
    train = torch.load(folder / "train.pt", weights_only=True)
    val = torch.load(folder / "val.pt", weights_only=True)
    # Originals plus one augmented view for train; val stays plain.
    assert tuple(train["features"].shape) == (96, 1280)
    assert tuple(val["features"].shape) == (24, 1280)
    assert train["classes"] == val["classes"] == ["cats", "dogs"]
    assert train["image_size"] == 32 and train["weights"] == "random"


def test_saved_models_score_validation_as_training_did(small_run):
    """The checkpoint is the best epoch's, and evaluating it on images gives its val loss."""
    for stage in ("head", "finetune"):
        state = torch.load(small_run / f"results/baseline/{stage}/model.pt", weights_only=True)
        history = read_tsv(small_run / f"results/baseline/{stage}/history.tsv")
        losses = [float(r["val_loss"]) for r in history]
        assert state["best_epoch"] == 1 + losses.index(min(losses))
        metrics = read_tsv(small_run / f"results/baseline/eval/{stage}/metrics.tsv")
        val = next(r for r in metrics if r["split"] == "val")
        assert float(val["loss"]) == pytest.approx(min(losses), abs=2e-4), stage


def test_every_job_was_logged_and_benchmarked(small_run):
    ran = [j for j in jobs(_output(small_run)) if j["rule"] != "all"]
    assert {j["rule"] for j in ran} >= {
        "verify_dataset", "extract_features", "train_head", "finetune", "evaluate", "summarize",
    }  # fmt: skip
    for job in ran:
        assert "log" in job and "benchmark" in job, job
        for log in job["log"].split(", "):
            assert (small_run / log).is_file(), log
        benchmark = read_tsv(small_run / job["benchmark"])
        assert len(benchmark) == 1 and float(benchmark[0]["s"]) > 0


def test_gpu_rules_request_a_gpu_and_threads(small_run):
    ran = [j for j in jobs(_output(small_run)) if j["rule"] != "all"]
    assert GPU_RULES <= {j["rule"] for j in ran}
    for job in ran:
        resources = dict(item.split("=", 1) for item in job["resources"].split(", "))
        if job["rule"] in GPU_RULES:
            assert resources.get("gpu") == "1", job
            # --cores 2 caps the rule's threads at 2; 1 would be printed as nothing.
            assert int(job.get("threads", 1)) == 2, job
            assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0
        else:
            assert "gpu" not in resources, job


def test_gpu_stages_record_what_they_used(small_run):
    """Fine tuning and evaluation write the figures that size the next GPU request."""
    usage_columns = [
        "stage", "pass", "epoch", "device", "images", "seconds", "images_per_s",
        "loader_wait_fraction", "peak_gpu_mb",
    ]  # fmt: skip
    finetune = small_run / "results/baseline/finetune/usage.tsv"
    assert _columns(finetune) == usage_columns
    epochs = len(read_tsv(small_run / "results/baseline/finetune/history.tsv"))
    rows = read_tsv(finetune)
    assert [(r["pass"], int(r["epoch"])) for r in rows] == [
        (name, epoch) for epoch in range(1, epochs + 1) for name in ("train", "validate")
    ]
    assert {r["images"] for r in rows} == {"48", "24"}  # 48 training, 24 validation images
    for stage in ("head", "finetune"):
        rows = read_tsv(small_run / f"results/baseline/eval/{stage}/usage.tsv")
        assert [(r["stage"], r["pass"], r["images"]) for r in rows] == [
            (f"evaluate {stage}", "val", "24"),
            (f"evaluate {stage}", "test", "24"),
        ]
        for row in rows:
            assert row["device"].startswith("cpu") and row["peak_gpu_mb"] == ""
            assert float(row["images_per_s"]) > 0 and 0 <= float(row["loader_wait_fraction"]) <= 1
    folder = _feature_dir(small_run)
    for split, images in (("train", 96), ("val", 24)):  # train: originals + one view
        rows = read_tsv(folder / f"{split}_usage.tsv")
        assert [(r["stage"], r["pass"], int(r["images"])) for r in rows] == [
            (f"extract_features {split}", "extract", images)
        ]
    for row in read_tsv(small_run / "results/summary.tsv"):
        assert row["device"].startswith("cpu") and float(row["images_per_s"]) > 0, row
        assert float(row["gpu_stage_seconds"]) > 0


# ---- re-runs -----------------------------------------------------------------------------


def _config(workdir):
    return workdir / "config" / "small.yaml"


def test_rerun_does_nothing(small_run):
    proc = snakemake(small_run, *STAGE_OUTPUTS, "--configfile", _config(small_run))
    assert_ok(proc)
    assert "Nothing to be done" in proc.stdout
    assert not jobs(proc.stdout) and not job_stats(proc.stdout)


def test_forcerun_finetune_reruns_only_what_follows(small_run):
    proc = snakemake(
        small_run,
        *STAGE_OUTPUTS,
        "-n",
        "--forcerun",
        "finetune",
        "--configfile",
        _config(small_run),
    )
    assert_ok(proc)
    stats = job_stats(proc.stdout)
    assert stats["finetune"] == 1 and stats["evaluate"] == 1 and stats["summarize"] == 1
    assert not BEFORE_FINETUNE & set(stats), stats
    planned = jobs(proc.stdout)
    for job in planned:
        if "stage=" in job.get("wildcards", ""):
            assert "stage=finetune" in job["wildcards"], job
    evaluate = [j for j in planned if j["rule"] == "evaluate"]
    assert evaluate[0]["outputs"][0] == "results/baseline/eval/finetune/metrics.tsv"


def test_changed_finetune_lr_reruns_finetune_evaluate_summarize(small_run, tmp_path):
    workdir = copy_workdir(small_run, tmp_path / "work")
    before = {
        path: (workdir / path).stat().st_mtime_ns
        for path in ("results/baseline/head/model.pt", "results/data/manifest.tsv")
    }
    old_history = read_tsv(workdir / "results/baseline/finetune/history.tsv")
    config = overlay(tmp_path / "lr.yaml", small_config(SMALL_DATA, finetune={"lr": 5.0e-4}))
    proc = snakemake(workdir, *STAGE_OUTPUTS, "--configfile", config)
    assert_ok(proc)
    stats = job_stats(proc.stdout)
    assert stats["finetune"] == 1 and stats["evaluate"] == 1 and stats["summarize"] == 1
    assert not BEFORE_FINETUNE & set(stats), stats
    finetune = next(j for j in jobs(proc.stdout) if j["rule"] == "finetune")
    assert "param" in finetune["reason"].lower(), finetune["reason"]
    for job in jobs(proc.stdout):
        if "stage=" in job.get("wildcards", ""):
            assert "stage=finetune" in job["wildcards"], job
    for path, mtime in before.items():
        assert (workdir / path).stat().st_mtime_ns == mtime, f"{path} was rewritten"
    new_history = read_tsv(workdir / "results/baseline/finetune/history.tsv")
    assert [r["lr"] for r in new_history] == ["0.00025", "0.0005"][: len(new_history)]
    assert [r["val_loss"] for r in new_history] != [r["val_loss"] for r in old_history]


@pytest.mark.parametrize("change", ["replace", "add"])
def test_changed_images_rerun_verification_and_everything_after(small_run, tmp_path, change):
    workdir = copy_workdir(small_run, tmp_path / "work")
    cats = workdir / SMALL_DATA / "train" / "cats"
    other = write_images(tmp_path / "other", {"train": {"cats": 1}}, size=48, seed=999)
    new_image = next((other / "train" / "cats").iterdir())
    if change == "replace":
        target = sorted(cats.iterdir())[0]
        assert target.read_bytes() != new_image.read_bytes()
    else:
        target = cats / "new_cat.jpg"
    shutil.copy(new_image, target)
    os.utime(target)  # a fresh modification time, as an editor or a copy would give it
    proc = snakemake(workdir, *STAGE_OUTPUTS, "-n", "--configfile", _config(workdir))
    assert_ok(proc)
    stats = job_stats(proc.stdout)
    expected = {
        "verify_dataset": 1, "extract_features": 2, "train_head": 1,
        "finetune": 1, "evaluate": 2, "summarize": 1,
    }  # fmt: skip
    assert {rule: stats.get(rule) for rule in expected} == expected, stats
    verify = next(j for j in jobs(proc.stdout) if j["rule"] == "verify_dataset")
    # The data set is one tracked value (file count, bytes, digest), not one input a file.
    assert "Params have changed" in verify["reason"], verify["reason"]
    if change == "add":
        assert "now: '97 files" in verify["reason"], verify["reason"]


def test_hidden_file_changes_rerun_nothing(small_run, tmp_path):
    workdir = copy_workdir(small_run, tmp_path / "work")
    (workdir / SMALL_DATA / "train" / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (workdir / SMALL_DATA / "val" / "._dogs.1.jpg").write_bytes(b"\x00\x05\x16\x07")
    proc = snakemake(workdir, *STAGE_OUTPUTS, "-n", "--configfile", _config(workdir))
    assert_ok(proc)
    assert "Nothing to be done" in proc.stdout, job_stats(proc.stdout)


def test_speed_only_settings_rerun_nothing_and_result_settings_do(small_run, tmp_path):
    """Loader workers change speed, never results; amp and deterministic change results."""
    workdir = copy_workdir(small_run, tmp_path / "work")
    for overrides, rerun in (
        ({"max_workers": 0}, set()),
        ({"max_workers": 7}, set()),
        ({"finetune": {"amp": False}}, {"finetune"}),
        ({"finetune": {"deterministic": False}}, {"finetune"}),
    ):
        config = overlay(tmp_path / "c.yaml", small_config(SMALL_DATA, **overrides))
        proc = snakemake(workdir, *STAGE_OUTPUTS, "-n", "--configfile", config)
        assert_ok(proc)
        stats = job_stats(proc.stdout)
        assert rerun <= set(stats) and not BEFORE_FINETUNE & set(stats), (overrides, stats)
        if not rerun:
            assert "Nothing to be done" in proc.stdout, (overrides, stats)


def _workflow_copy(folder):
    folder.mkdir(parents=True)
    for name in ("Snakefile", "rules", "workflow_scripts", "config", "report", "envs"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / name)
    return folder / "Snakefile"


def test_code_changes_rerun_what_they_change(demo_run, tmp_path):
    """Snakemake's own code trigger sees only shell lines; each rule tracks its Python."""
    snakefile = _workflow_copy(tmp_path / "workflow")
    workdir = copy_workdir(demo_run, tmp_path / "work")
    package = snakefile.parent / "workflow_scripts" / "transfer_learning"

    def planned():
        proc = snakemake(
            workdir, "-n", "--configfile", REPO / "config" / "demo.yaml", snakefile=snakefile
        )
        assert_ok(proc)
        return job_stats(proc.stdout)

    assert planned() == {}
    for module, expected in (
        ("train.py", {"extract_features", "train_head", "finetune", "evaluate", "summarize"}),
        ("plots.py", {"plot_stage", "plot_experiment", "plot_summary"}),
    ):
        source = package / module
        original = source.read_text()
        source.write_text(original + "\n# an edit\n")
        stats = planned()
        assert expected <= set(stats), (module, stats)
        if module == "plots.py":
            assert set(stats) == expected | {"all"}, stats
        assert not {"make_demo_data", "verify_dataset"} & set(stats), (module, stats)
        source.write_text(original)
        assert planned() == {}


# ---- repeatability -----------------------------------------------------------------------


# Clocks and memory counters: they differ between two runs of the same config and seed.
MEASURED = {"train_seconds", "images_per_s", "loader_wait_fraction", "gpu_stage_seconds"}


def _without(path, *columns):
    rows = read_tsv(path)
    assert rows and set(columns) <= set(rows[0]), (path, rows[:1])
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


def test_two_runs_give_identical_results(small_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("second_run")
    shutil.copytree(small_run / SMALL_DATA, workdir / SMALL_DATA)
    config = overlay(workdir / "config" / "small.yaml", small_config())
    proc = snakemake(workdir, *STAGE_OUTPUTS, "--configfile", config, timeout=600)
    assert_ok(proc, "second small run")
    for stage in ("head", "finetune"):
        for name in ("metrics", "predictions", "confusion"):
            path = f"results/baseline/eval/{stage}/{name}.tsv"
            assert (workdir / path).read_bytes() == (small_run / path).read_bytes(), path
        history = f"results/baseline/{stage}/history.tsv"
        assert _without(workdir / history, "seconds") == _without(small_run / history, "seconds")
    summary = "results/summary.tsv"
    assert _without(workdir / summary, *MEASURED) == _without(small_run / summary, *MEASURED)
    for split in ("train", "val"):
        first = torch.load(_feature_dir(small_run) / f"{split}.pt", weights_only=True)
        second = torch.load(_feature_dir(workdir) / f"{split}.pt", weights_only=True)
        assert torch.equal(first["features"], second["features"]), split


# ---- other configurations, planned only ---------------------------------------------------


def test_local_weights_file_plans_no_download(tmp_path):
    import torchvision

    workdir = tmp_path / "work"
    write_images(
        workdir / SMALL_DATA,
        {
            "train": {"cats": 2, "dogs": 2},
            "val": {"cats": 1, "dogs": 1},
            "test": {"cats": 1, "dogs": 1},
        },
        size=32,
    )
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2(num_classes=3).state_dict(), workdir / "mine.pth")
    counts = {
        "train": {"cats": 2, "dogs": 2},
        "val": {"cats": 1, "dogs": 1},
        "test": {"cats": 1, "dogs": 1},
    }
    config = small_config(SMALL_DATA, counts, model={"weights": "mine.pth"})
    proc = snakemake(workdir, "-n", "--configfile", overlay(tmp_path / "o.yaml", config))
    assert_ok(proc)
    stats = job_stats(proc.stdout)
    assert "fetch_weights" not in stats and stats["extract_features"] == 2
    planned = jobs(proc.stdout)
    extract = [j for j in planned if j["rule"] == "extract_features"]
    assert all("mine.pth" in j["inputs"] for j in extract)
    assert all("mobilenet_v2-file-" in j["wildcards"] for j in extract)
    # A head checkpoint holds no backbone: its evaluation reads the weights file too.
    evaluate = {j["wildcards"]: j["inputs"] for j in planned if j["rule"] == "evaluate"}
    assert "mine.pth" in evaluate["experiment=baseline, stage=head"]
    assert all("mine.pth" in j["inputs"] for j in planned if j["rule"] == "finetune")


def test_demo_run_builds_its_data_and_every_result(demo_run):
    output = _output(demo_run)
    started = {j["rule"] for j in jobs(output)}
    assert {"make_demo_data", "verify_dataset", "finetune", "summarize"} <= started
    expected = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["data"][
        "expected_counts"
    ]
    counts = read_tsv(demo_run / "results/data/counts.tsv")
    assert {(r["split"], r["class"], r["found"], r["status"]) for r in counts} == {
        (split, label, str(n), "ok") for split, per in expected.items() for label, n in per.items()
    }
    for split, per in expected.items():
        for label, n in per.items():
            assert len(list((demo_run / "data" / "demo" / split / label).glob("*.jpg"))) == n
    for path in STAGE_OUTPUTS:
        assert (demo_run / path).is_file(), path
    summary = read_tsv(demo_run / "results/summary.tsv")
    assert len(summary) == 2 and [r["best"] for r in summary].count("yes") == 1
    again = snakemake(demo_run, "-n", "--configfile", REPO / "config" / "demo.yaml")
    assert_ok(again)
    assert "Nothing to be done" in again.stdout, tail(again.stdout)


def test_demo_fine_tuning_beats_the_head_and_both_beat_chance(demo_run):
    """The demo learns: the head on frozen random features, fine tuning much better.

    Chance is 0.5 on the balanced two-class test split of 60 images; 0.6 is more than
    1.5 standard errors above it, and fine tuning must gain on top of the head.
    """
    summary = {
        r["stage"]: float(r["test_accuracy"]) for r in read_tsv(demo_run / "results/summary.tsv")
    }
    assert summary["head"] >= 0.6, summary
    assert summary["finetune"] >= 0.8, summary
    assert summary["finetune"] > summary["head"], summary
