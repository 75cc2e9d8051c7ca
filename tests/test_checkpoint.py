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
