"""transfer_learning.settings: overlays merged, experiments and grids expanded, the feature
key, schema errors named all at once, numbers written as text. No Snakemake."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import MEAN, REPO, STD
from transfer_learning import settings
from transfer_learning.errors import UserError


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


def test_feature_key_tracks_the_augmentation_only_with_augmented_views():
    flip = {"horizontal_flip": True}
    no_flip = {"horizontal_flip": False}
    assert _key(augment=flip) == _key(augment=no_flip)  # no augmented views: no effect
    assert _key(augmented_views=1, augment=flip) != _key(augmented_views=1, augment=no_flip)


def test_every_record_field_is_a_schema_key_and_the_reverse():
    """A setting added to the schema but not to its record (or the reverse) cannot slip by."""
    import yaml

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    shared = {"seed", "augment"}
    for record in (
        settings.AugmentSettings,
        settings.HeadSettings,
        settings.FinetuneSettings,
        settings.EvaluateSettings,
    ):
        fields = {f.name for f in dataclasses.fields(record)}
        keys = set(schema[record.SECTION]["properties"])
        assert fields - shared == keys - shared, record.SECTION
        # The defaults file gives every record a complete, valid section.
        section = dict(config[record.SECTION])
        section.update({k: config[k] for k in shared & fields})
        assert record.from_mapping(section)
    data_fields = {f.name for f in dataclasses.fields(settings.DataSettings)}
    assert data_fields <= set(schema["data"]["properties"])
    feature_fields = {f.name for f in dataclasses.fields(settings.FeatureSettings)}
    assert set(schema["features"]["properties"]) <= feature_fields


def test_finetune_record_rejects_what_cannot_run():
    base = dict(epochs=1, lr=1.0, batch_size=1, unfreeze_blocks=None, warmup_epochs=0,
                patience=1, min_delta=0.0, seed=1)  # fmt: skip
    assert settings.FinetuneSettings.from_mapping(base).batchnorm == "auto"
    with pytest.raises(UserError, match="batch_size 1 cannot train BatchNorm"):
        settings.FinetuneSettings.from_mapping({**base, "batchnorm": "train"})
    with pytest.raises(UserError, match="crop_scale"):
        settings.FinetuneSettings.from_mapping({**base, "augment": {"crop_scale": [0.9, 0.2]}})
