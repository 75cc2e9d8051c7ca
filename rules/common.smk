# The one place that reads `config`: validation, experiments, settings records, feature keys,
# paths and input functions. Everything is resolved once, here, when the workflow loads;
# the helpers below only answer questions about it.

import functools
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

# Nothing imported here may import PyTorch: every start (and every Slurm job's own Snakemake)
# would pay seconds for it. Backbone and weights names come from the torch-free catalogue.
from transfer_learning import catalog as tl_catalog
from transfer_learning import image_files as tl_image_files
from transfer_learning import io as tl_io
from transfer_learning import settings as tl_settings
from transfer_learning import sources as tl_sources
from transfer_learning import verify as tl_verify
from transfer_learning.errors import UserError

# Rules call the stage entry points by name; on a cluster every job re-reads this file.
SCRIPTS = Path(workflow.basedir) / "workflow_scripts"
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(str(SCRIPTS))}:$PATH; ")
SCHEMA = "../config/schema.yaml"
# libyaml's loader when PyYAML has it: the same result, read many times faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
with open(Path(workflow.basedir) / "config" / "schema.yaml") as _handle:
    _SCHEMA = yaml.load(_handle, Loader=_YAML_LOADER)


def _replace_expected_counts_from_overlays():
    """A user's --configfile replaces data.expected_counts as a whole.

    Snakemake deep-merges config files, which would keep the default cats/dogs counts
    beside a user's own classes and fail every other data set.
    """
    for path in workflow.overwrite_configfiles or []:
        with open(path) as handle:
            overlay = yaml.load(handle, Loader=_YAML_LOADER) or {}
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
# Only what an experiment overrides can be wrong; each distinct value is checked once.
for _name, (_numbers, _errors) in tl_settings.check_experiments(
    EXPERIMENTS, OVERRIDES, _SCHEMA
).items():
    _what = f"experiment '{_name}' (config key experiments.{_name})"
    for _key in _numbers:
        logger.info(f"{_what}: read config key {_key} as a number")
    if _errors:
        raise WorkflowError(f"invalid {_what}:\n  " + "\n  ".join(_errors))

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
        tl_catalog.check_backbone(backbone)
        if weights is None:
            return "random", None
        if tl_catalog.is_weights_path(weights):
            path = Path(weights)
            identity = tl_io.sha256_file(path)[:12] if path.is_file() else path.name
            return f"file-{identity}", weights
        member = tl_catalog.config_weights(backbone, weights)
    except ValueError as error:
        raise WorkflowError(str(error))
    return member.name, f"resources/weights/{member.filename}"


def _resolve(name, exp):
    """Feature identity and every stage's settings record (as JSON) of one experiment."""
    model = exp["model"]
    weights_id, weights_file = _weights(exp)
    mean, std = tl_catalog.normalisation(
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


# Experiments and feature keys are one path component each. Not a list of their names: a
# sweep has hundreds, and Snakemake matches and substitutes these patterns thousands of
# times (a 500-name alternation made a dry run of a 500-experiment grid several times slower).
# An unknown name is caught by experiment_record() and feature_record(), naming what exists.
wildcard_constraints:
    experiment="[^/]+",
    stage="|".join(STAGES),
    split="|".join(map(re.escape, DATA["splits"])),
    key="[^/]+",


# ---- paths -------------------------------------------------------------------------------


def features_path(key, split):
    return f"results/features/{key}/{split}.pt"


def features_usage_path(key, split):
    return f"results/features/{key}/{split}_usage.tsv"


def stage_dir(experiment, stage):
    return f"results/{experiment}/{stage}"


def stage_file(experiment, stage, name):
    return f"{stage_dir(experiment, stage)}/{name}"


def eval_outputs(experiment, stage):
    folder = f"results/{experiment}/eval/{stage}"
    names = ("metrics", "predictions", "confusion", "usage")
    return [f"{folder}/{name}.tsv" for name in names]


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
        for split in (TRAIN_SPLIT, VAL_SPLIT):
            targets += [features_path(key, split), features_usage_path(key, split)]
    for experiment in EXPERIMENTS:
        targets += [
            stage_file(experiment, stage, name)
            for stage in STAGES
            for name in ("model.pt", "history.tsv")
        ]
        targets.append(stage_file(experiment, "finetune", "usage.tsv"))
        targets += [p.format(experiment=experiment) for p in EXPERIMENT_PLOTS.values()]
        for stage in STAGES:
            targets += eval_outputs(experiment, stage)
            targets += [
                p.format(experiment=experiment, stage=stage)
                for p in STAGE_PLOTS.values()
            ]
    return targets + model_targets()


# ---- settings per wildcard ---------------------------------------------------------------


def code_version(script):
    """Digest of the Python that runs for a rule, a tracked param: an edit there re-runs it.

    Snakemake's own code trigger sees only the shell line.
    """
    return tl_sources.code_digest(SCRIPTS / script)


def _known(table, name, what):
    """table[name]; a name that is not there (a mistyped target path) is named, with the
    ones that are (the wildcard constraints accept any path component)."""
    if name not in table:
        names = list(table)
        more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
        shown = ", ".join(names[:20]) + more
        raise WorkflowError(
            f"unknown {what} '{name}' in a target path; {what}s are: {shown}"
        )
    return table[name]


def experiment_record(wildcards):
    """The resolved experiment of a job's {experiment}: feature key, weights, settings."""
    return _known(RESOLVED, wildcards.experiment, "experiment")


def feature_record(wildcards):
    """The features of a job's {key}: their settings record and weights file."""
    return _known(FEATURES, wildcards.key, "feature key")


def stage_settings(section):
    """The experiment's settings record of `section`, as one JSON argument (passed with :q)."""
    return lambda wildcards: experiment_record(wildcards)[section]


def feature_settings(wildcards):
    return feature_record(wildcards)["features"]


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
    if feature_record(wildcards)["weights_file"]:
        inputs["weights"] = feature_record(wildcards)["weights_file"]
    return inputs


def head_inputs(wildcards):
    key = experiment_record(wildcards)["key"]
    return {
        "train": features_path(key, TRAIN_SPLIT),
        "val": features_path(key, VAL_SPLIT),
    }


def finetune_inputs(wildcards):
    inputs = {
        "head": stage_file(wildcards.experiment, "head", "model.pt"),
        "manifest": MANIFEST,
    }
    if experiment_record(wildcards)["weights_file"]:
        inputs["weights"] = experiment_record(wildcards)["weights_file"]
    return inputs


def evaluate_inputs(wildcards):
    inputs = {
        "model": stage_file(wildcards.experiment, wildcards.stage, "model.pt"),
        "manifest": MANIFEST,
    }
    weights_file = experiment_record(wildcards)["weights_file"]
    # A head checkpoint holds the head only; the backbone comes from the weights file.
    if wildcards.stage == "head" and weights_file:
        inputs["weights"] = weights_file
    return inputs


def stage_usage(experiment, stage):
    """The GPU figures behind a stage's result: the head's feature extraction, or fine
    tuning itself, and the stage's evaluation."""
    if stage == "head":
        key = RESOLVED[experiment]["key"]
        made = [features_usage_path(key, split) for split in (TRAIN_SPLIT, VAL_SPLIT)]
    else:
        made = [stage_file(experiment, stage, "usage.tsv")]
    return [*made, eval_outputs(experiment, stage)[3]]


SUMMARY_RUNS = [
    {
        "experiment": experiment,
        "stage": stage,
        "metrics": eval_outputs(experiment, stage)[0],
        "checkpoint": stage_file(experiment, stage, "model.pt"),
        "usage": stage_usage(experiment, stage),
        "overrides": OVERRIDES[experiment],
    }
    for experiment in EXPERIMENTS
    for stage in STAGES
]


# ---- using the model: predict, export; training logs -------------------------------------

PREDICT_IMAGES = config["predict"]["images"]
if PREDICT_IMAGES is not None and not Path(PREDICT_IMAGES).is_dir():
    raise WorkflowError(
        f"config key predict.images: {PREDICT_IMAGES} is not a folder"
        f" (relative paths resolve against {Path.cwd()})"
    )
EXPORT = config["export"]


def predict_outputs(experiment, stage):
    """The predictions and the GPU figures of their pass."""
    folder = f"results/{experiment}/predict"
    return [f"{folder}/{stage}.tsv", f"{folder}/{stage}_usage.tsv"]


def export_outputs(experiment, stage):
    folder = f"results/{experiment}/export"
    return [
        f"{folder}/{stage}.{name}" for name in ("onnx", "onnx.json", "pt2", "pt2.json")
    ]


def model_targets():
    """What rule all builds of predict and export, as the config asks."""
    targets = []
    for experiment in EXPERIMENTS:
        for stage in STAGES:
            if PREDICT_IMAGES is not None:
                targets += predict_outputs(experiment, stage)
            if EXPORT:
                targets += export_outputs(experiment, stage)
    return targets


def model_inputs(wildcards):
    """A stage's checkpoint, and the weights file a head checkpoint's backbone comes from."""
    inputs = {"model": stage_file(wildcards.experiment, wildcards.stage, "model.pt")}
    weights_file = experiment_record(wildcards)["weights_file"]
    if wildcards.stage == "head" and weights_file:
        inputs["weights"] = weights_file
    return inputs


@functools.cache
def predict_listing():
    """One tracked value for the folder predict reads, as data_listing is for the data set:
    an added, removed or replaced image re-runs predict. Walked once per workflow load.
    """
    return tl_image_files.tracking_digest(PREDICT_IMAGES) if PREDICT_IMAGES else ""


# Training logs (TensorBoard, MLflow) change no result, so turning them on or off must not
# re-run a training: they are neither a tracked param nor in a rule's shell line. Every job
# inherits them through its environment (a Slurm job's own Snakemake reads this file too);
# train_head.py and finetune.py read them (transfer_learning/tracking.py).
os.environ.update(TRANSFER_LEARNING_LOGGING=json.dumps(config["logging"]))
