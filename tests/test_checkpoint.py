"""transfer_learning.checkpoint: typed records on disk, format versions, content digests,
the resume key."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import stage_checkpoint
from transfer_learning import checkpoint
from transfer_learning.errors import InputNotFound, UserError
from transfer_learning.io import load_checkpoint, save_checkpoint
from transfer_learning.settings import HeadSettings


def test_stage_checkpoint_round_trips_and_loads_weights_only(tmp_path):
    record = stage_checkpoint(head={"linear.weight": torch.ones(1, 4)}, best_epoch=3)
    checkpoint.save(record, tmp_path / "model.pt")
    payload = load_checkpoint(tmp_path / "model.pt")  # plain dict, weights_only
    assert payload["format"] == "stage" and payload["format_version"] == checkpoint.FORMAT_VERSION
    assert payload["classes"] == ["cats", "dogs"]  # identity flat, as documented
    loaded = checkpoint.load_stage(tmp_path / "model.pt")
    assert loaded.best_epoch == 3 and loaded.identity == record.identity
    assert torch.equal(loaded.head["linear.weight"], torch.ones(1, 4))


def test_another_format_version_or_kind_is_refused_with_the_rule_to_rerun(tmp_path):
    checkpoint.save(stage_checkpoint(), tmp_path / "model.pt")
    payload = load_checkpoint(tmp_path / "model.pt")
    save_checkpoint({**payload, "format_version": 1}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="version 1.*reads stage files of version 2.*train_head"):
        checkpoint.load_stage(tmp_path / "old.pt")
    with pytest.raises(UserError, match="is a stage file.*reads features files"):
        checkpoint.load_features(tmp_path / "model.pt")
    save_checkpoint({"best_epoch": 1}, tmp_path / "untagged.pt")
    with pytest.raises(UserError, match="without a format tag"):
        checkpoint.load_stage(tmp_path / "untagged.pt")
    with pytest.raises(InputNotFound, match="absent.pt"):
        checkpoint.load_stage(tmp_path / "absent.pt")


def test_fingerprints_see_content_not_timing():
    a = stage_checkpoint(head={"w": torch.zeros(3)}, train_seconds=1.0)
    assert checkpoint.stage_fingerprint(a) == checkpoint.stage_fingerprint(
        dataclasses.replace(a, train_seconds=99.0)
    )
    assert checkpoint.stage_fingerprint(a) != checkpoint.stage_fingerprint(
        dataclasses.replace(a, head={"w": torch.tensor([0.0, 0.0, 1e-7])})
    )


def test_resume_key_covers_settings_and_every_input():
    settings = HeadSettings(epochs=5, lr=1e-3, batch_size=16, dropout=0.2, seed=7)
    inputs = {"train": "a", "val": "b"}
    key = checkpoint.resume_key(settings, inputs)
    assert key == checkpoint.resume_key(settings, dict(inputs))
    assert key != checkpoint.resume_key(settings.replace(lr=1e-4), inputs)
    assert key != checkpoint.resume_key(settings, {**inputs, "val": "c"})
    assert checkpoint.fingerprint(torch.ones(2)) != checkpoint.fingerprint(torch.ones(3))
    assert checkpoint.fingerprint(torch.tensor(5)) != checkpoint.fingerprint(torch.tensor(6))


def _feature_file(features: torch.Tensor, views: torch.Tensor | None = None):
    identity = stage_checkpoint().identity
    n = len(features)
    return checkpoint.FeatureFile(
        identity=identity,
        split="train",
        features=features,
        labels=torch.arange(n) % 2,
        views=torch.zeros(n, dtype=torch.int64) if views is None else views,
        paths=[f"train/cats/{i}.jpg" for i in range(n)],
    )


def _mapped_files() -> str:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return maps.read()


def test_feature_files_load_memory_mapped_with_the_same_content(tmp_path):
    record = _feature_file(torch.randn(300, 64, generator=torch.Generator().manual_seed(0)))
    checkpoint.save(record, tmp_path / "mapped.pt")
    checkpoint.save(record, tmp_path / "read.pt")
    mapped = checkpoint.load_features(tmp_path / "mapped.pt")
    read = checkpoint.load_features(tmp_path / "read.pt", mmap=False)
    assert str(tmp_path / "mapped.pt") in _mapped_files()
    assert str(tmp_path / "read.pt") not in _mapped_files()
    assert torch.equal(mapped.features, record.features) and mapped.paths == record.paths
    # Same content, same fingerprint, whether the tensor is mapped or in memory.
    assert checkpoint.features_fingerprint(mapped) == checkpoint.features_fingerprint(read)
    assert checkpoint.features_fingerprint(mapped) == checkpoint.features_fingerprint(record)
    # The mapping is private: a change in the process never reaches the file.
    mapped.features[0, 0] = 1e6
    again = checkpoint.load_features(tmp_path / "mapped.pt", mmap=False)
    assert torch.equal(again.features, record.features)
