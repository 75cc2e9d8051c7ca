"""transfer_learning.sources: which Python each rule runs, for the code re-run trigger."""

from __future__ import annotations

from helpers import REPO
from transfer_learning import sources

SCRIPTS = REPO / "workflow_scripts"


def _names(script):
    return {path.name for path in sources.stage_sources(SCRIPTS / script)}


def test_each_entry_point_reaches_exactly_the_modules_it_imports():
    finetune = _names("finetune.py")
    assert {"finetune.py", "stages.py", "train.py", "models.py", "data.py"} <= finetune
    assert {"plots.py", "verify.py", "fetch.py", "summary.py"}.isdisjoint(finetune)
    plots = _names("plot_stage.py")
    assert "plots.py" in plots
    assert {"train.py", "stages.py", "models.py"}.isdisjoint(plots)
    assert {"verify.py", "images.py"} <= _names("verify_dataset.py")


def test_digest_changes_with_any_reached_file(tmp_path):
    package = tmp_path / "transfer_learning"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "used.py").write_text("from .leaf import x\n")
    (package / "leaf.py").write_text("x = 1\n")
    (package / "unused.py").write_text("y = 2\n")
    entry = tmp_path / "entry.py"
    entry.write_text("from transfer_learning import used\n")
    assert [p.name for p in sources.stage_sources(entry)] == [
        "entry.py", "__init__.py", "leaf.py", "used.py",
    ]  # fmt: skip
    before = sources.code_digest.__wrapped__(entry)
    (package / "unused.py").write_text("y = 3\n")
    assert sources.code_digest.__wrapped__(entry) == before
    (package / "leaf.py").write_text("x = 2\n")
    assert sources.code_digest.__wrapped__(entry) != before
