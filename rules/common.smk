# The one place that reads `config`: validation, experiments, settings records, feature keys,
# paths and input functions. Everything is resolved once, here, when the workflow loads;
# the helpers below only answer questions about it.

import json
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

from transfer_learning import io as tl_io
from transfer_learning import models as tl_models
from transfer_learning import settings as tl_settings
from transfer_learning import sources as tl_sources
from transfer_learning import verify as tl_verify
from transfer_learning.errors import UserError

# Rules call the stage entry points by name; on a cluster every job re-reads this file.
SCRIPTS = Path(workflow.basedir) / "workflow_scripts"
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(str(SCRIPTS))}:$PATH; ")
SCHEMA = "../config/schema.yaml"
with open(Path(workflow.basedir) / "config" / "schema.yaml") as _handle:
    _SCHEMA = yaml.safe_load(_handle)


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


def _numbers_from_text(instance, what):
    """`lr: 1e-5` is a number to a user; YAML reads it as text. Convert it once, here."""
    for key in tl_settings.numbers_from_text(instance, _SCHEMA):
        logger.info(f"{what}: read config key {key} as a number")


def _check_config(instance, what):
    """Name every bad key at once, in one line each (snakemake's own message dumps the schema)."""
    errors = tl_settings.schema_errors(instance, _SCHEMA)
    if errors:
        raise WorkflowError(f"invalid {what}:\n  " + "\n  ".join(errors))


_replace_expected_counts_from_overlays()
_numbers_from_text(config, "configuration")
_check_config(config, "configuration")
validate(config, SCHEMA)  # also fills in the schema's defaults

try:
    OVERRIDES = tl_settings.expand_experiments(config["experiments"])
except UserError as _error:
    raise WorkflowError(str(_error))
EXPERIMENTS = tl_settings.experiment_configs(config, OVERRIDES)
for _name, _exp in EXPERIMENTS.items():
    _what = f"experiment '{_name}' (config key experiments.{_name})"
    _numbers_from_text(_exp, _what)
    _check_config({**_exp, "experiments": config["experiments"]}, _what)

DATA = config["data"]
DATA_ROOT = DATA["root"]
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = DATA["splits"]
EVAL_SPLITS = [VAL_SPLIT, TEST_SPLIT]
STAGES = ["head", "finetune"]
MANIFEST = "results/data/manifest.tsv"
COUNTS = "results/data/counts.tsv"
SUMMARY = "results/summary.tsv"
CONDA_ENV = "../envs/pytorch.yaml"


def _record(values, record, what):
    try:
        return record.from_mapping(values, what).to_json()
    except UserError as error:
        raise WorkflowError(str(error))


DATA_SETTINGS = _record(
    {k: v for k, v in DATA.items() if k not in ("root", "source", "demo")},
    tl_settings.DataSettings,
    "config section data",
)


def _weights(exp):
    """(identity, local file or None) of an experiment's backbone weights."""
    backbone, weights = exp["model"]["backbone"], exp["model"]["weights"]
    try:
        tl_models.check_backbone(backbone)
        if weights is None:
            return "random", None
        if tl_models.is_weights_path(weights):
            path = Path(weights)
            identity = tl_io.sha256_file(path)[:12] if path.is_file() else path.name
            return f"file-{identity}", weights
        member = tl_models.weights_enum(backbone, weights)
    except ValueError as error:
        raise WorkflowError(str(error))
    return member.name, f"resources/weights/{tl_models.weights_filename(member)}"


def _resolve(name, exp):
    """Feature identity and every stage's settings record (as JSON) of one experiment."""
    model = exp["model"]
    weights_id, weights_file = _weights(exp)
    mean, std = tl_models.normalisation(
        model["backbone"],
        None if weights_id == "random" else model["weights"],
        model.get("mean"),
        model.get("std"),
    )
    views = exp["features"]["augmented_views"]
    # The seed changes features only through random weights or augmented views.
    seed = exp["seed"] if (views or weights_id == "random") else 0
    features = {
        "backbone": model["backbone"],
        "weights": weights_id,
        "image_size": model["image_size"],
        "mean": list(mean),
        "std": list(std),
        "augmented_views": views,
        "seed": seed,
        "batch_size": exp["features"]["batch_size"],
        "augment": exp["augment"],
    }
    settings = {
        record.SECTION: _record_of(exp, record, name)
        for record in (
            tl_settings.HeadSettings,
            tl_settings.FinetuneSettings,
            tl_settings.EvaluateSettings,
        )
    }
    return {
        "key": tl_settings.feature_key(
            model["backbone"],
            weights_id,
            model["image_size"],
            mean,
            std,
            views,
            exp["seed"],
            exp["augment"],
        ),
        "weights_file": weights_file,
        "features": _record(
            features, tl_settings.FeatureSettings, f"experiment '{name}'"
        ),
        **settings,
    }


def _record_of(exp, record, name):
    try:
        return tl_settings.stage_settings(exp, record, name).to_json()
    except UserError as error:
        raise WorkflowError(str(error))


RESOLVED = {name: _resolve(name, exp) for name, exp in EXPERIMENTS.items()}
# Experiments that agree on what determines the features share one extraction.
FEATURES = {r["key"]: r for r in reversed(list(RESOLVED.values()))}
WEIGHTS_TO_FETCH = {
    r["weights_file"]: EXPERIMENTS[name]["model"]
    for name, r in RESOLVED.items()
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


def resume_path(wildcards, stage):
    """Resume state lives outside the declared outputs: Snakemake deletes those on failure."""
    return f"results/.resume/{wildcards.experiment}/{stage}.pt"


EXPERIMENT_PLOTS = {
    "learning_curves": "results/{experiment}/plots/learning_curves.png",
    "metrics_table": "results/{experiment}/plots/metrics.html",
}
STAGE_PLOTS = {
    "confusion_matrix": "results/{experiment}/plots/{stage}_confusion_matrix.png",
    "roc_curve": "results/{experiment}/plots/{stage}_roc_curve.png",
    "mistakes": "results/{experiment}/plots/{stage}_mistakes.png",
}
SUMMARY_PLOT = "results/plots/experiments.png"
SUMMARY_TABLE = "results/plots/summary.html"
REPORT_CATEGORY = "All experiments"


def figure(
    path, caption, label, category="{experiment}", subcategory="{stage}", stage=None
):
    """An output marked for `snakemake --report`, grouped by experiment and stage."""
    labels = {"figure": label, **({"stage": stage} if stage else {})}
    return report(
        path,
        caption=f"../report/{caption}.rst",
        category=category,
        subcategory=subcategory,
        labels=labels,
    )


def all_targets():
    """Every tracked output, so a missing one (a failed job's, deleted) is always rebuilt."""
    targets = [MANIFEST, COUNTS, SUMMARY, SUMMARY_PLOT, SUMMARY_TABLE]
    for key in FEATURES:
        targets += [features_path(key, TRAIN_SPLIT), features_path(key, VAL_SPLIT)]
    for experiment in EXPERIMENTS:
        targets += [
            stage_file(experiment, stage, name)
            for stage in STAGES
            for name in ("model.pt", "history.tsv")
        ]
        targets += [p.format(experiment=experiment) for p in EXPERIMENT_PLOTS.values()]
        for stage in STAGES:
            targets += eval_outputs(experiment, stage)
            targets += [
                p.format(experiment=experiment, stage=stage)
                for p in STAGE_PLOTS.values()
            ]
    return targets


# ---- settings per wildcard ---------------------------------------------------------------


def code_version(script):
    """Digest of the Python that runs for a rule, a tracked param: an edit there re-runs it.

    Snakemake's own code trigger sees only the shell line.
    """
    return tl_sources.code_digest(SCRIPTS / script)


def stage_settings(section):
    """The experiment's settings record of `section`, as one JSON argument (passed with :q)."""
    return lambda wildcards: RESOLVED[wildcards.experiment][section]


def feature_settings(wildcards):
    return FEATURES[wildcards.key]["features"]


def loader_workers():
    """Loader worker processes change speed, never results: a resource, not a tracked param."""
    return config.get("max_workers", 8)


def data_listing(wildcards):
    """One tracked value for the whole data set: a digest of every file's path, size and
    modification time, from the same walk that verification reads (symbolic links followed).

    An added, removed or replaced image changes it and so re-runs verification and what
    follows; Snakemake never stats 100,000 inputs one by one. Data that a rule of this
    workflow makes (data.source) are tracked as that rule's output instead.
    """
    if DATA.get("source"):
        return ""
    return tl_verify.tracking_digest(DATA_ROOT, DATA["splits"])


# ---- input functions ---------------------------------------------------------------------


def dataset_input(wildcards):
    """The data rule's output when the workflow makes the data; nothing for the user's own."""
    return DATA_ROOT if DATA.get("source") else []


def extraction_inputs(wildcards):
    inputs = {"manifest": MANIFEST}
    if FEATURES[wildcards.key]["weights_file"]:
        inputs["weights"] = FEATURES[wildcards.key]["weights_file"]
    return inputs


def head_inputs(wildcards):
    key = RESOLVED[wildcards.experiment]["key"]
    return {
        "train": features_path(key, TRAIN_SPLIT),
        "val": features_path(key, VAL_SPLIT),
    }


def finetune_inputs(wildcards):
    inputs = {
        "head": stage_file(wildcards.experiment, "head", "model.pt"),
        "manifest": MANIFEST,
    }
    if RESOLVED[wildcards.experiment]["weights_file"]:
        inputs["weights"] = RESOLVED[wildcards.experiment]["weights_file"]
    return inputs


def evaluate_inputs(wildcards):
    inputs = {
        "model": stage_file(wildcards.experiment, wildcards.stage, "model.pt"),
        "manifest": MANIFEST,
    }
    weights_file = RESOLVED[wildcards.experiment]["weights_file"]
    # A head checkpoint holds the head only; the backbone comes from the weights file.
    if wildcards.stage == "head" and weights_file:
        inputs["weights"] = weights_file
    return inputs


SUMMARY_RUNS = [
    {
        "experiment": experiment,
        "stage": stage,
        "metrics": eval_outputs(experiment, stage)[0],
        "checkpoint": stage_file(experiment, stage, "model.pt"),
        "overrides": OVERRIDES[experiment],
    }
    for experiment in EXPERIMENTS
    for stage in STAGES
]
