"""The config as the stages see it: experiments, feature keys and one settings record a stage.

`rules/common.smk` is the only place that reads the config; it calls these, so they are
unit-tested without Snakemake. A stage's settings travel as ONE value: the rule passes the
record as a JSON argument (`--settings`), the entry point parses it into the dataclass
below, the stage function takes it, the checkpoint stores it and the resume key hashes it.
Adding a setting is: schema, default in config/config.yaml, the record, the code using it.

This module imports neither PyTorch nor torchvision: the workflow loads it on every start.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

from .errors import UserError

# What an experiment may override; the data are shared by all experiments.
EXPERIMENT_SECTIONS = ("model", "seed", "augment", "features", "head", "finetune", "evaluate")


def deep_merge(base: Mapping, override: Mapping | None) -> dict:
    """A copy of `base` with `override` merged in; mappings merge, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for dotted = 'a.b'."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _value_label(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_")


def expand_experiments(experiments: Mapping) -> dict[str, dict]:
    """Experiment name -> overrides, with grid shorthands expanded.

    An entry `{grid: {"finetune.lr": [1e-5, 1e-4], seed: [1, 2]}, ...}` becomes one
    experiment per combination, named `<entry>_lr1e-05_seed1` and so on (the last part of
    each key and its value), on top of the entry's other overrides.
    """
    expanded: dict[str, dict] = {}
    origin: dict[str, str] = {}

    def add(name: str, overrides: dict, source: str) -> None:
        # A grid point named like another experiment would silently replace it.
        if name in expanded:
            raise UserError(
                f"experiment name '{name}' is made twice: by {origin[name]} and by {source}; "
                "rename one of them (config key experiments)"
            )
        expanded[name], origin[name] = overrides, source

    for name, overrides in experiments.items():
        overrides = dict(overrides or {})
        grid = overrides.pop("grid", None)
        if not grid:
            add(name, overrides, f"experiments.{name}")
            continue
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            combo = copy.deepcopy(overrides)
            parts = [name]
            for key, value in zip(keys, values, strict=True):
                set_dotted(combo, key, value)
                parts.append(f"{key.split('.')[-1]}{_value_label(value)}")
            point = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
            add("_".join(parts), combo, f"the grid of experiments.{name} ({point})")
    return expanded


def experiment_configs(config: Mapping, overrides: Mapping | None = None) -> dict[str, dict]:
    """Experiment name -> the full config it runs with (base config + its overrides).

    `overrides` are those of `expand_experiments`, when the caller has them already.
    """
    base = {k: v for k, v in config.items() if k != "experiments"}
    if overrides is None:
        overrides = expand_experiments(config.get("experiments") or {"baseline": {}})
    return {name: deep_merge(base, changes) for name, changes in overrides.items()}


def digest(value, length: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def feature_key(
    backbone: str,
    weights_id: str,
    image_size: int,
    mean,
    std,
    augmented_views: int,
    seed: int,
    augment: Mapping | None = None,
) -> str:
    """Folder name of cached features: readable prefix + hash of all that determines them.

    The seed counts only where it changes the features: random weights, augmented views.
    """
    determining = {
        "backbone": backbone,
        "weights": weights_id,
        "image_size": image_size,
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "augmented_views": augmented_views,
        "seed": seed if (augmented_views or weights_id == "random") else None,
    }
    if augmented_views and augment:
        # Another augmentation makes other augmented views: other cached train features.
        determining["augment"] = dict(augment)
    tag = weights_id if len(weights_id) <= 16 else weights_id[:16]
    return f"{backbone}-{tag}-{image_size}px-{digest(determining, 8)}"


def _iter_errors(instance: Mapping, schema: Mapping, sections: Iterable[str] | None):
    """The schema's errors of the whole instance, or of its top-level `sections` only.

    An experiment is the validated configuration with a few sections overridden; checking
    only those keeps a sweep of hundreds of experiments fast. The errors' paths still start
    at the top level.
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    if sections is None:
        return validator.iter_errors(instance)
    properties = schema.get("properties", {})
    return itertools.chain.from_iterable(
        validator.descend(instance[name], properties[name], path=name)
        for name in sections
        if name in properties and name in instance
    )


def schema_errors(
    instance: Mapping, schema: Mapping, sections: Iterable[str] | None = None
) -> list[str]:
    """Every way `instance` breaks `schema`, one line each, naming the config key.

    `sections`: check only these top-level keys (the rest is known to be valid).
    """
    errors = []
    for error in sorted(
        _iter_errors(instance, schema, sections), key=lambda e: list(e.absolute_path)
    ):
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message
        if error.validator == "additionalProperties":
            message = message.replace("Additional properties are not allowed", "unknown key")
        errors.append(f"config key {key}: {message}")
    return errors


def numbers_from_text(
    instance, schema: Mapping, sections: Iterable[str] | None = None
) -> list[str]:
    """Turn numeric text into numbers where the schema wants a number; returns what changed.

    YAML 1.1 reads `1e-5` (no dot) as the string '1e-05'; a user means a number. Only values
    the schema types as number are touched, so text settings stay text. `sections`: look at
    these top-level keys only.
    """
    changed = []
    for _ in range(100):  # each pass fixes every error it sees; nested ones may need more
        fixed = False
        for error in _iter_errors(instance, schema, sections):
            wanted = error.validator_value if error.validator == "type" else None
            wanted = [wanted] if isinstance(wanted, str) else wanted or []
            if "number" not in wanted or not isinstance(error.instance, str):
                continue
            try:
                number = float(error.instance)
            except ValueError:
                continue
            *parents, leaf = error.absolute_path
            if not parents and leaf is None:
                continue
            target = instance
            for part in parents:
                target = target[part]
            target[leaf] = number
            changed.append(".".join(str(p) for p in error.absolute_path))
            fixed = True
        if not fixed:
            return changed
    return changed


def check_experiments(
    experiments: Mapping[str, dict], overrides: Mapping[str, Mapping], schema: Mapping
) -> dict[str, tuple[list[str], list[str]]]:
    """`numbers_from_text` and `schema_errors` of every experiment, converting in place.

    Returns name -> (keys read as numbers, errors). Only the sections an experiment
    overrides are checked (the others are the validated configuration's), and each distinct
    value of a section once: the 500 experiments of a 25 x 20 grid hold 45 distinct ones.
    """
    checked: dict[tuple[str, str], tuple[object, list[str], list[str]]] = {}
    results = {}
    for name, experiment in experiments.items():
        changed, errors = [], []
        for section in sorted(set(overrides[name]) & set(experiment)):
            key = (section, json.dumps(experiment[section], sort_keys=True, default=repr))
            if key not in checked:
                probe = {section: copy.deepcopy(experiment[section])}
                found = numbers_from_text(probe, schema, [section])
                checked[key] = (probe[section], found, schema_errors(probe, schema, [section]))
            value, found, bad = checked[key]
            if found:
                experiment[section] = copy.deepcopy(value)
            changed += found
            errors += bad
        results[name] = (changed, errors)
    return results


# ---- one settings record per stage -------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """Base of the stage settings: strict parsing, JSON in and out, a stable digest."""

    SECTION: typing.ClassVar[str] = ""

    @classmethod
    def from_mapping(cls, values: Mapping, where: str = ""):
        where = where or f"config section {cls.SECTION}"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise UserError(f"{where}: missing setting(s) {', '.join(missing)}")
        hints = _type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], f"{where}: {k}") for k, v in values.items()})

    @classmethod
    def from_json(cls, text: str, where: str = ""):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{where or cls.SECTION} settings are not valid JSON: {error}"
            ) from None
        if not isinstance(values, dict):
            raise UserError(f"{where or cls.SECTION} settings must be a JSON object")
        return cls.from_mapping(values, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@cache
def _type_hints(cls: type) -> dict:
    """typing.get_type_hints evaluates every annotation anew; a sweep asks thousands of times."""
    return typing.get_type_hints(cls)


def _coerce(value, hint, where: str):
    """JSON gives ints for floats and lists for tuples; anything else of the wrong type is an
    error naming the setting."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and (hint is type(None) or type(None) in args):
        return None
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is dict and isinstance(value, dict):
        return value
    if isinstance(hint, type) and issubclass(hint, Record) and isinstance(value, Mapping):
        return hint.from_mapping(value, where)
    if isinstance(hint, type) and issubclass(hint, Record) and isinstance(value, hint):
        return value
    raise UserError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


@dataclass(frozen=True)
class DataSettings(Record):
    """verify_dataset: what the data must look like (the data root is a path, not a setting)."""

    SECTION: typing.ClassVar[str] = "data"
    splits: tuple[str, ...]
    expected_counts: dict | None = None
    on_count_mismatch: str = "error"
    duplicates: str = "error"
    near_duplicate_distance: int = 4


@dataclass(frozen=True)
class AugmentSettings(Record):
    """The random changes of training images, for the augmented feature views and fine tuning.

    Order: crop (or plain resize), flips, rotation, colour jitter, TrivialAugment.
    """

    SECTION: typing.ClassVar[str] = "augment"
    horizontal_flip: bool = True
    vertical_flip: bool = False
    crop_scale: tuple[float, ...] | None = (0.7, 1.0)
    rotation: float = 0.0
    color_jitter: float = 0.0
    trivial_augment: bool = False

    def __post_init__(self):
        if self.crop_scale is not None and (
            len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise UserError(
                f"augment.crop_scale must be [min, max] with 0 < min <= max <= 1 or null, "
                f"not {list(self.crop_scale)}"
            )


@dataclass(frozen=True)
class FeatureSettings(Record):
    """extract_features: everything that determines the cached features, and the batch size.

    `weights` is the identity of the backbone weights (torchvision name, `file-<sha256>` of
    a local file, or `random`), not a path.
    """

    SECTION: typing.ClassVar[str] = "features"
    backbone: str
    weights: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmented_views: int
    seed: int
    batch_size: int = 64
    augment: AugmentSettings = AugmentSettings()


@dataclass(frozen=True)
class HeadSettings(Record):
    SECTION: typing.ClassVar[str] = "head"
    epochs: int
    lr: float
    batch_size: int
    dropout: float
    seed: int


@dataclass(frozen=True)
class FinetuneSettings(Record):
    SECTION: typing.ClassVar[str] = "finetune"
    epochs: int
    lr: float
    batch_size: int
    unfreeze_blocks: int | None
    warmup_epochs: int
    patience: int
    min_delta: float
    seed: int
    warmup_start_factor: float = 0.5
    amp: bool = True
    deterministic: bool = True
    batchnorm: str = "auto"
    monitor: str = "val_loss"
    restore_best: bool = True
    augment: AugmentSettings = AugmentSettings()

    def __post_init__(self):
        if self.batchnorm not in ("auto", "frozen", "train"):
            raise UserError(
                f"finetune.batchnorm must be auto, frozen or train, not {self.batchnorm!r}"
            )
        if self.monitor not in ("val_loss", "val_accuracy"):
            raise UserError(
                f"finetune.monitor must be val_loss or val_accuracy, not {self.monitor!r}"
            )
        if self.batchnorm == "train":
            self.batchnorm_for("random")  # refused at load, not in the job

    def batchnorm_for(self, weights: str) -> str:
        """frozen or train for a backbone of these weights (`auto`: train only random ones)."""
        mode = self.batchnorm
        if mode == "auto":
            mode = "train" if weights == "random" else "frozen"
        if mode == "train" and self.batch_size < 2:
            raise UserError(
                "finetune.batch_size 1 cannot train BatchNorm statistics (one value per "
                "channel); use finetune.batchnorm: frozen or a batch size of at least 2"
            )
        return mode


@dataclass(frozen=True)
class EvaluateSettings(Record):
    SECTION: typing.ClassVar[str] = "evaluate"
    batch_size: int = 64


def stage_settings(experiment: Mapping, record: type[Record], name: str) -> Record:
    """The record of one stage from an experiment's full config: its section, plus the
    shared `seed` and `augment` where the record has them."""
    values = dict(experiment[record.SECTION])
    fields = {f.name for f in dataclasses.fields(record)}
    for shared in ("seed", "augment"):
        if shared in fields:
            values[shared] = experiment[shared]
    return record.from_mapping(values, f"experiment '{name}', config section {record.SECTION}")
