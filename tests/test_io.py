"""transfer_learning.io: atomic writes that leave nothing half-written, tables and
checkpoints that round-trip, checkpoints loaded weights-only."""

from __future__ import annotations

import pytest
import torch
from transfer_learning import io


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "deep" / "table.tsv"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as partial:
            partial.write_text("half a table")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "deep").iterdir()) == []

    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as partial:
            partial.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert list((tmp_path / "deep").iterdir()) == [target]

    with io.atomic_path(target) as partial:
        partial.write_text("new\n")
    assert target.read_text() == "new\n"
    assert list((tmp_path / "deep").iterdir()) == [target]


def test_tables_and_checkpoints_round_trip(tmp_path):
    rows = [{"a": 1, "b": 0.123456789, "c": None}, {"a": 2, "b": 1e-9, "c": "x y"}]
    io.write_tsv(tmp_path / "t.tsv", rows)
    assert (tmp_path / "t.tsv").read_text() == "a\tb\tc\n1\t0.123457\t\n2\t1e-09\tx y\n"
    assert io.read_tsv(tmp_path / "t.tsv")[1] == {"a": "2", "b": "1e-09", "c": "x y"}
    io.save_checkpoint({"w": torch.ones(2), "names": ["a"]}, tmp_path / "c.pt")
    assert io.load_checkpoint(tmp_path / "c.pt")["names"] == ["a"]
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "absent.pt")


class _Pickled:
    pass


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    torch.save({"thing": _Pickled()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        io.load_checkpoint(tmp_path / "evil.pt")
