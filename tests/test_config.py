"""The configuration: schema errors at parse time, overlays, other class sets, profile,
lint and formatting, and the pure config helpers of transfer_learning.settings."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import (
    REPO,
    STAGE_OUTPUTS,
    VENV_BIN,
    assert_ok,
    job_stats,
    jobs,
    overlay,
    small_config,
    snake_env,
    snakemake,
    tail,
    write_images,
)
from transfer_learning import settings
from transfer_learning.io import read_tsv

STAGE_RULES = {
    "verify_dataset",
    "extract_features",
    "train_head",
    "finetune",
    "evaluate",
    "summarize",
}


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
        # roc_auc is a binary measure: present as a column, empty for three classes.
        assert all(r["roc_auc"] == "" for r in metrics)
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
    assert all(r["test_roc_auc"] == "" for r in summary)


# ---- the cluster profile, lint, formatting ----------------------------------------------

PROFILE = REPO / "profiles" / "expanse"


def _profile_config():
    for name in ("config.v9+.yaml", "config.v8+.yaml", "config.yaml"):
        if (PROFILE / name).is_file():
            return PROFILE / name
    return None


@pytest.mark.skipif(
    _profile_config() is None,
    reason="profiles/expanse has no config.yaml yet (the Slurm profile is written separately)",
)
def test_expanse_profile_dry_run_lists_every_stage(tmp_path):
    proc = snakemake(
        tmp_path / "work",
        "-n",
        "--profile",
        PROFILE,
        cores=None,
        env=snake_env(SBATCH_ACCOUNT="dummy"),
        timeout=180,
    )
    assert_ok(proc, "dry run with the expanse profile")
    stats = job_stats(proc.stdout)
    assert STAGE_RULES <= set(stats), stats
    assert stats["extract_features"] == 2 and stats["evaluate"] == 2
    # The course config uses pretrained weights: fetched once, on the login node.
    assert stats.get("fetch_weights") == 1


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


def test_snakemake_lint_passes(tmp_path):
    proc = snakemake(
        tmp_path / "work",
        "--lint",
        "--configfile",
        REPO / "config" / "demo.yaml",
        cores=None,
        timeout=180,
    )
    assert proc.returncode == 0, tail(proc.stdout, 200)


def test_snakefmt_check_passes():
    snakefmt = VENV_BIN / "snakefmt"
    if not snakefmt.exists():
        pytest.skip("snakefmt is not installed in the venv")
    proc = subprocess.run(
        ["timeout", "-k", "10", "120", str(snakefmt), "--check", "Snakefile", "rules"],
        cwd=REPO,
        env=snake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]


# ---- transfer_learning.settings ----------------------------------------------------------


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": [1, 2], "c": 3}
    merged = settings.deep_merge(base, {"a": {"y": {"w": 4}}, "b": [9], "c": None})
    assert merged == {"a": {"x": 1, "y": {"z": 2, "w": 4}}, "b": [9], "c": None}
    # The base is left alone and the result shares nothing with it.
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": [1, 2], "c": 3}
    merged["a"]["y"]["z"] = 99
    assert base["a"]["y"]["z"] == 2
    assert settings.deep_merge(base, None) == base
    # A mapping replaces a scalar and a scalar replaces a mapping.
    assert settings.deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert settings.deep_merge({"a": {"b": 2}}, {"a": 5}) == {"a": 5}


def test_expand_experiments_names_grid_combinations():
    experiments = {
        "baseline": None,
        "plain": {"head": {"epochs": 3}},
        "sweep": {
            "head": {"epochs": 4},
            "grid": {"finetune.lr": [1.0e-5, 1.0e-4], "seed": [1, 2]},
        },
        "nets": {"grid": {"model.backbone": ["resnet18", "efficientnet_b0"]}},
    }
    expanded = settings.expand_experiments(experiments)
    assert list(expanded) == [
        "baseline",
        "plain",
        "sweep_lr1e-05_seed1",
        "sweep_lr1e-05_seed2",
        "sweep_lr0.0001_seed1",
        "sweep_lr0.0001_seed2",
        "nets_backboneresnet18",
        "nets_backboneefficientnet_b0",
    ]
    assert expanded["baseline"] == {}
    assert expanded["plain"] == {"head": {"epochs": 3}}
    assert expanded["sweep_lr0.0001_seed2"] == {
        "head": {"epochs": 4},
        "finetune": {"lr": 1.0e-4},
        "seed": 2,
    }
    assert expanded["nets_backboneresnet18"] == {"model": {"backbone": "resnet18"}}
    # The input is not modified (its grid entry is still there).
    assert "grid" in experiments["sweep"]


def test_experiment_configs_overlay_each_experiment_on_the_base():
    config = {
        "model": {"backbone": "mobilenet_v2", "image_size": 224},
        "head": {"lr": 1.0e-4, "epochs": 5},
        "experiments": {"baseline": {}, "big": {"model": {"image_size": 320}}},
    }
    configs = settings.experiment_configs(config)
    assert configs["baseline"]["model"]["image_size"] == 224
    assert configs["big"]["model"] == {"backbone": "mobilenet_v2", "image_size": 320}
    assert configs["big"]["head"] == {"lr": 1.0e-4, "epochs": 5}
    assert "experiments" not in configs["big"]


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _key(**changes):
    args = dict(
        backbone="mobilenet_v2",
        weights_id="IMAGENET1K_V2",
        image_size=224,
        mean=MEAN,
        std=STD,
        augmented_views=0,
        seed=1,
    )
    args.update(changes)
    return settings.feature_key(**args)


def test_feature_key_is_stable_and_tracks_what_determines_features():
    assert _key() == _key()
    assert _key().startswith("mobilenet_v2-IMAGENET1K_V2-224px-")
    assert _key(image_size=160) != _key()
    assert _key(backbone="resnet18") != _key()
    assert _key(weights_id="IMAGENET1K_V1") != _key()
    assert _key(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]) != _key()
    assert _key(augmented_views=1) != _key()
    # Tuples or lists, float noise below 1e-6: the same features.
    assert _key(mean=tuple(MEAN), std=tuple(STD)) == _key()
    assert _key(mean=[m + 1e-9 for m in MEAN]) == _key()


def test_feature_key_seed_matters_only_with_random_weights_or_augmented_views():
    # Pretrained weights, no augmentation: the features do not depend on the seed.
    assert _key(seed=1) == _key(seed=2)
    # Augmented views are drawn with the seed.
    assert _key(seed=1, augmented_views=1) != _key(seed=2, augmented_views=1)
    # Random weights are drawn with the seed.
    assert _key(weights_id="random", seed=1) != _key(weights_id="random", seed=2)
    assert _key(weights_id="random", seed=3) == _key(weights_id="random", seed=3)


def test_schema_errors_name_every_bad_key_at_once():
    import yaml

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert settings.schema_errors(config, schema) == []
    bad = settings.deep_merge(
        config, {"head": {"lr": -1, "lrr": 2}, "finetune": {"epochs": 0}, "oops": 1}
    )
    errors = settings.schema_errors(bad, schema)
    text = "\n".join(errors)
    assert len(errors) == 4, text
    for named in ("head.lr", "finetune.epochs", "'lrr'", "'oops'"):
        assert named in text


def test_demo_config_is_valid_on_its_own():
    import yaml

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    merged = settings.deep_merge(base, demo)
    merged["data"]["expected_counts"] = demo["data"]["expected_counts"]
    assert settings.schema_errors(merged, schema) == []


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


def test_numbers_from_text_touches_only_number_keys():
    schema = {
        "type": "object",
        "properties": {
            "lr": {"type": "number"},
            "name": {"type": "string"},
            "nested": {"type": "object", "properties": {"x": {"type": ["number", "null"]}}},
        },
    }
    config = {"lr": "1e-05", "name": "1e-05", "nested": {"x": "2E3"}}
    changed = settings.numbers_from_text(config, schema)
    assert config == {"lr": 1e-05, "name": "1e-05", "nested": {"x": 2000.0}}
    assert sorted(changed) == ["lr", "nested.x"]
    config = {"lr": "fast"}
    assert settings.numbers_from_text(config, schema) == [] and config == {"lr": "fast"}
