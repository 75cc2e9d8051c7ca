"""Pure functions over the config: experiments, feature keys, setting hashes.

`rules/common.smk` is the only place that reads the config; it calls these, so they are
unit-tested without Snakemake.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Mapping

# What an experiment may override; the data are shared by all experiments.
EXPERIMENT_SECTIONS = ("model", "seed", "features", "head", "finetune", "evaluate")


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
    for name, overrides in experiments.items():
        overrides = dict(overrides or {})
        grid = overrides.pop("grid", None)
        if not grid:
            expanded[name] = overrides
            continue
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            combo = copy.deepcopy(overrides)
            parts = [name]
            for key, value in zip(keys, values, strict=True):
                set_dotted(combo, key, value)
                parts.append(f"{key.split('.')[-1]}{_value_label(value)}")
            expanded["_".join(parts)] = combo
    return expanded


def experiment_configs(config: Mapping) -> dict[str, dict]:
    """Experiment name -> the full config it runs with (base config + its overrides)."""
    base = {k: v for k, v in config.items() if k != "experiments"}
    experiments = expand_experiments(config.get("experiments") or {"baseline": {}})
    return {name: deep_merge(base, overrides) for name, overrides in experiments.items()}


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
    tag = weights_id if len(weights_id) <= 16 else weights_id[:16]
    return f"{backbone}-{tag}-{image_size}px-{digest(determining, 8)}"


def schema_errors(instance: Mapping, schema: Mapping) -> list[str]:
    """Every way `instance` breaks `schema`, one line each, naming the config key."""
    from jsonschema import Draft202012Validator

    errors = []
    for error in sorted(
        Draft202012Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path)
    ):
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message
        if error.validator == "additionalProperties":
            message = message.replace("Additional properties are not allowed", "unknown key")
        errors.append(f"config key {key}: {message}")
    return errors
