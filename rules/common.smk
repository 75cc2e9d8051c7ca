# The one place that reads `config`: validation, experiments, feature keys, path helpers
# and input functions. Everything else asks these helpers.

import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

from transfer_learning import fetch as tl_fetch
from transfer_learning import models as tl_models
from transfer_learning import settings as tl_settings

# Rules call the stage entry points by name; on a cluster every job re-reads this file.
SCRIPTS = Path(workflow.basedir) / "workflow_scripts"
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(str(SCRIPTS))}:$PATH; ")
SCHEMA = "../config/schema.yaml"


def _replace_expected_counts_from_overlays():
    """A user's --configfile replaces data.expected_counts as a whole.

    Snakemake deep-merges config files, which would keep the default cats/dogs counts
    beside a user's own classes and fail every other data set.
    """
    for path in workflow.overwrite_configfiles or []:
        with open(path) as handle:
            overlay = yaml.safe_load(handle) or {}
        data = overlay.get("data") or {}
        if "expected_counts" in data:
            config["data"]["expected_counts"] = data["expected_counts"]


def _check_config(instance, what):
    """Name every bad key at once, in one line each (snakemake's own message dumps the schema)."""
    with open(Path(workflow.basedir) / "config" / "schema.yaml") as handle:
        schema = yaml.safe_load(handle)
    errors = tl_settings.schema_errors(instance, schema)
    if errors:
        raise WorkflowError(f"invalid {what}:\n  " + "\n  ".join(errors))


_replace_expected_counts_from_overlays()
_check_config(config, "configuration")
validate(config, SCHEMA)  # also fills in the schema's defaults

EXPERIMENTS = tl_settings.experiment_configs(config)
for _name, _exp in EXPERIMENTS.items():
    _check_config(
        {**_exp, "experiments": config["experiments"]},
        f"experiment '{_name}' (config key experiments.{_name})",
    )

DATA = config["data"]
DATA_ROOT = DATA["root"]
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = DATA["splits"]
EVAL_SPLITS = [VAL_SPLIT, TEST_SPLIT]
STAGES = ["head", "finetune"]
MANIFEST = "results/data/manifest.tsv"
COUNTS = "results/data/counts.tsv"
SUMMARY = "results/summary.tsv"
CONDA_ENV = "../envs/pytorch.yaml"


def _weights(exp):
    """(identity, local file or None) of an experiment's backbone weights."""
    backbone, weights = exp["model"]["backbone"], exp["model"]["weights"]
    try:
        tl_models.check_backbone(backbone)
        if weights is None:
            return "random", None
        if tl_models.is_weights_path(weights):
            path = Path(weights)
            identity = tl_fetch.sha256_file(path)[:12] if path.is_file() else path.name
            return f"file-{identity}", weights
        member = tl_models.weights_enum(backbone, weights)
    except ValueError as error:
        raise WorkflowError(str(error))
    return member.name, f"resources/weights/{tl_fetch.weights_filename(member)}"


def _resolve(exp):
    model = exp["model"]
    weights_id, weights_file = _weights(exp)
    mean, std = tl_models.normalisation(
        model["backbone"],
        None if weights_id == "random" else model["weights"],
        model.get("mean"),
        model.get("std"),
    )
    views = exp["features"]["augmented_views"]
    key = tl_settings.feature_key(
        model["backbone"],
        weights_id,
        model["image_size"],
        mean,
        std,
        views,
        exp["seed"],
    )
    return {
        "key": key,
        "backbone": model["backbone"],
        "weights": weights_id,
        "weights_name": model["weights"],
        "weights_file": weights_file,
        "image_size": model["image_size"],
        "mean": mean,
        "std": std,
        "augmented_views": views,
        "seed": exp["seed"],
        "batch_size": exp["features"]["batch_size"],
    }


RESOLVED = {name: _resolve(exp) for name, exp in EXPERIMENTS.items()}
# Experiments that agree on what determines the features share one extraction.
FEATURES = {r["key"]: r for r in reversed(list(RESOLVED.values()))}
WEIGHTS_TO_FETCH = {
    r["weights_file"]: r
    for r in RESOLVED.values()
    if r["weights_file"] and r["weights_file"].startswith("resources/weights/")
}


wildcard_constraints:
    experiment="|".join(map(re.escape, EXPERIMENTS)),
    stage="|".join(STAGES),
    split="|".join(map(re.escape, DATA["splits"])),
    key="|".join(map(re.escape, FEATURES)),


# ---- paths -------------------------------------------------------------------------------


def features_path(key, split):
    return f"results/features/{key}/{split}.pt"


def stage_dir(experiment, stage):
    return f"results/{experiment}/{stage}"


def stage_file(experiment, stage, name):
    return f"{stage_dir(experiment, stage)}/{name}"


def eval_outputs(experiment, stage):
    folder = f"results/{experiment}/eval/{stage}"
    return [f"{folder}/{name}.tsv" for name in ("metrics", "predictions", "confusion")]


def all_targets():
    targets = [COUNTS, SUMMARY]
    for experiment in EXPERIMENTS:
        for stage in STAGES:
            targets += eval_outputs(experiment, stage)
    return targets + REPORT_TARGETS  # plots and tables, rules/report.smk


# ---- settings per wildcard ---------------------------------------------------------------


def exp_config(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def feature_settings(wildcards):
    return FEATURES[wildcards.key]


def extraction_views(wildcards):
    """Augmented views only for the training split; val and test stay plain."""
    if wildcards.split != TRAIN_SPLIT:
        return 0
    return FEATURES[wildcards.key]["augmented_views"]


def weights_file_arg(resolved):
    return resolved["weights_file"] or "none"


def workers_cap():
    return config.get("max_workers", 8)


def resume_path(wildcards, stage):
    """Resume state lives outside the declared outputs: Snakemake deletes those on failure."""
    return f"results/.resume/{wildcards.experiment}/{stage}.pt"


# ---- input functions ---------------------------------------------------------------------


def _visible_files(root):
    """The files verify_dataset looks at: hidden files and folders (.DS_Store, ._*) are not."""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        if path.is_file() and not any(part.startswith(".") for part in relative):
            yield path


def dataset_files(wildcards):
    """What verify_dataset reads: the data rule's output, or every file of the user's data.

    Listing the user's files makes Snakemake re-run verification (and so everything after
    it) when an image is added, removed or replaced. Names with braces cannot be inputs
    (Snakemake reads them as wildcards); `unlisted_files` tracks those instead.
    """
    if DATA.get("source"):
        return DATA_ROOT
    root = Path(DATA_ROOT)
    if not root.is_dir():
        return []
    return [str(p) for p in _visible_files(root) if not re.search(r"[{}]", p.name)]


def unlisted_files(wildcards):
    """Size and modification time of the data files that cannot be listed as inputs."""
    root = Path(DATA_ROOT)
    if DATA.get("source") or not root.is_dir():
        return ""
    unlisted = [
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in _visible_files(root)
        if re.search(r"[{}]", p.name)
    ]
    return tl_settings.digest(unlisted) if unlisted else ""


def extraction_inputs(wildcards):
    resolved = FEATURES[wildcards.key]
    inputs = {"manifest": MANIFEST}
    if resolved["weights_file"]:
        inputs["weights"] = resolved["weights_file"]
    return inputs


def head_inputs(wildcards):
    key = RESOLVED[wildcards.experiment]["key"]
    return {
        "train": features_path(key, TRAIN_SPLIT),
        "val": features_path(key, VAL_SPLIT),
    }


def finetune_inputs(wildcards):
    resolved = RESOLVED[wildcards.experiment]
    inputs = {
        "head": f"{stage_dir(wildcards.experiment, 'head')}/model.pt",
        "manifest": MANIFEST,
    }
    if resolved["weights_file"]:
        inputs["weights"] = resolved["weights_file"]
    return inputs


def evaluate_inputs(wildcards):
    inputs = {
        "model": f"{stage_dir(wildcards.experiment, wildcards.stage)}/model.pt",
        "manifest": MANIFEST,
    }
    resolved = RESOLVED[wildcards.experiment]
    # A head checkpoint holds the head only; the backbone comes from the weights file.
    if wildcards.stage == "head" and resolved["weights_file"]:
        inputs["weights"] = resolved["weights_file"]
    return inputs


def summary_runs():
    runs = []
    for experiment in EXPERIMENTS:
        overrides = tl_settings.expand_experiments(config["experiments"]).get(
            experiment, {}
        )
        for stage in STAGES:
            runs.append(
                {
                    "experiment": experiment,
                    "stage": stage,
                    "metrics": eval_outputs(experiment, stage)[0],
                    "checkpoint": f"{stage_dir(experiment, stage)}/model.pt",
                    "overrides": overrides,
                }
            )
    return runs
