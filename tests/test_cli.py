"""transfer_learning.cli: the settings record on the command line, and how programs fail."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from transfer_learning import cli  # noqa: E402
from transfer_learning.errors import UserError  # noqa: E402
from transfer_learning.settings import FinetuneSettings  # noqa: E402

SETTINGS = (
    '{"epochs": 3, "lr": 1e-05, "batch_size": 16, "unfreeze_blocks": null,'
    ' "warmup_epochs": 1, "patience": 2, "min_delta": 0.001, "seed": 5}'
)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_settings(parser, FinetuneSettings)
    return cli.settings_from_args(parser.parse_args(list(argv)), FinetuneSettings)


def test_settings_record_from_json_with_flags_overriding_fields():
    settings = _parse("--settings", SETTINGS, "--lr", "1e-4", "--no-amp", "--unfreeze-blocks", "7")
    assert settings == FinetuneSettings(
        epochs=3, lr=1e-4, batch_size=16, unfreeze_blocks=7, warmup_epochs=1, patience=2,
        min_delta=0.001, seed=5, amp=False,
    )  # fmt: skip
    assert _parse("--settings", SETTINGS, "--unfreeze-blocks", "none").unfreeze_blocks is None


def test_settings_from_a_file_and_every_field_listed_in_help(tmp_path, capsys):
    path = tmp_path / "settings.json"
    path.write_text(SETTINGS)
    assert _parse("--settings", str(path)).lr == 1e-5
    parser = argparse.ArgumentParser()
    cli.add_settings(parser, FinetuneSettings)
    parser.print_help()
    text = capsys.readouterr().out
    for flag in ("--epochs", "--lr", "--warmup-start-factor", "--amp", "--deterministic"):
        assert flag in text


def test_missing_and_unknown_settings_are_named():
    with pytest.raises(UserError, match="missing setting.*epochs"):
        _parse("--settings", '{"lr": 1}')
    with pytest.raises(UserError, match="unknown setting.*learning_rate"):
        _parse("--settings", SETTINGS[:-1] + ', "learning_rate": 1}')
    with pytest.raises(UserError, match="batch_size: expected int"):
        _parse("--settings", SETTINGS.replace('"batch_size": 16', '"batch_size": "16"'))


def _run(main, **kwargs):
    with pytest.raises(SystemExit) as stop:
        cli.run("prog", main, **kwargs)
    return stop.value.code


def test_user_errors_are_one_line_and_exit_1(caplog):
    def main():
        raise UserError("data root data/x does not exist (config key data.root)")

    with caplog.at_level(logging.ERROR):
        assert _run(main) == 1
    assert caplog.messages == ["prog: data root data/x does not exist (config key data.root)"]
    assert caplog.records[0].exc_info is None


def test_programming_errors_keep_their_traceback():
    def main():
        return {}["missing key"]

    with pytest.raises(KeyError):  # not turned into one line: Python prints the traceback
        cli.run("prog", main)


def test_out_of_memory_keeps_the_traceback_and_names_the_setting(caplog):
    class OutOfMemoryError(RuntimeError):  # the name torch.cuda.OutOfMemoryError has
        pass

    def main():
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with caplog.at_level(logging.ERROR):
        assert _run(main, memory_hint="finetune.batch_size") == 1
    assert "lower finetune.batch_size" in caplog.text
    assert caplog.records[0].exc_info is not None  # logged with its traceback


def test_interrupted_training_exits_75(caplog):
    import signal

    from transfer_learning.errors import TrainingInterrupted

    def main():
        raise TrainingInterrupted(signal.SIGUSR1)

    assert _run(main) == cli.EXIT_INTERRUPTED == 75
