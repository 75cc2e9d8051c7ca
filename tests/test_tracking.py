"""Training logs in TensorBoard and MLflow: what a run holds, and that a training stopped
(as Slurm stops it) and resumed continues the same TensorBoard run and the same MLflow run
with every epoch exactly once. Real trainings (train_head on small feature files), real
event files read back with TensorBoard's own reader, a real MLflow sqlite store. The
workflow-level part (the config keys reaching the jobs, nothing re-run by turning logs on
or off) uses the shared small_run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from helpers import SMALL_DATA, STAGE_OUTPUTS, assert_ok, overlay, small_config, snakemake
from transfer_learning import checkpoint, stages, tracking
from transfer_learning.checkpoint import FeatureFile, ModelIdentity
from transfer_learning.errors import TrainingInterrupted
from transfer_learning.io import read_tsv
from transfer_learning.settings import HeadSettings
from transfer_learning.train import EpochObserver

EPOCHS = 6
STOP_AFTER = 3
CURVES = {"train_loss", "val_loss", "train_acc", "val_acc", "lr", "seconds"}


def _features(folder, split, n, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, 8, generator=generator) + labels[:, None] * 0.8
    path = folder / f"{split}.pt"
    identity = ModelIdentity("mobilenet_v2", "random", 32, [0.5] * 3, [0.25] * 3, 1, ["a", "b"])
    checkpoint.save(
        FeatureFile(
            identity=identity, split=split, features=features, labels=labels,
            views=torch.zeros(n, dtype=torch.long), paths=[f"{i}.jpg" for i in range(n)],
        ),
        path,
    )  # fmt: skip
    return path


class StopAt(EpochObserver):
    """Stops the training after an epoch is saved for resuming, as SIGUSR1 from Slurm does
    between two epochs; placed between the two logs, one of them has seen the epoch and the
    other has not."""

    def on_epoch(self, row):
        if row["epoch"] == STOP_AFTER:
            raise TrainingInterrupted(10)


def _args(**values):
    keys = ("tensorboard", "mlflow", "mlflow_experiment", "run_name")
    return argparse.Namespace(**{key: values.get(key) for key in keys})


def _train(folder, logs, *, stop: bool):
    settings = HeadSettings(epochs=EPOCHS, lr=0.05, batch_size=8, dropout=0.0, seed=3)
    output = folder / "results/exp/head/model.pt"
    tensorboard, mlflow = logs.observers
    # With the stop between them, MLflow has logged the last epoch before the stop (it must
    # not log it twice) and TensorBoard has not (it must not miss it).
    observers = [mlflow, StopAt(), tensorboard] if stop else [mlflow, tensorboard]
    with logs:
        stages.train_head(
            settings,
            train_features=str(_features(folder, "train", 40, 1)),
            val_features=str(_features(folder, "val", 20, 2)),
            output=str(output),
            history=str(folder / "results/exp/head/history.tsv"),
            resume=str(folder / "results/.resume/exp/head.pt"),
            device="cpu",
            observers=observers,
        )
        logs.finish(str(output), str(folder / "results/exp/head/history.tsv"))


def _logs(folder, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setenv(
        tracking.ENVIRONMENT,
        json.dumps({"tensorboard": True, "mlflow": "sqlite:///results/mlflow.db"}),
    )
    settings = HeadSettings(epochs=EPOCHS, lr=0.05, batch_size=8, dropout=0.0, seed=3)
    return tracking.training_logs(
        _args(),
        stage="head",
        settings=settings,
        output="results/exp/head/model.pt",
        resume="results/.resume/exp/head.pt",
    )


def _scalars(log_dir):
    """{tag: [(step, value), ...]} as TensorBoard reads the folder (orphans purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(log_dir))
    reader.Reload()
    return {
        tag: [(event.step, event.value) for event in reader.Scalars(tag)]
        for tag in reader.Tags()["scalars"]
    }


def _raw_steps(log_dir, tag):
    """Every step of `tag` in the event files themselves, purging or not."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == tag for value in event.summary.value):
                steps.append(event.step)
    return steps


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A head training stopped after epoch STOP_AFTER and resumed, with both logs on;
    (folder, MLflow run id after the first job, its status then)."""
    folder = tmp_path_factory.mktemp("tracking")
    monkeypatch = pytest.MonkeyPatch()
    try:
        with pytest.raises(TrainingInterrupted):
            _train(folder, _logs(folder, monkeypatch), stop=True)
        run_file = folder / "results/.resume/exp/head.pt.mlflow-run"
        first_run = run_file.read_text().strip()
        from mlflow.tracking import MlflowClient

        client = MlflowClient("sqlite:///results/mlflow.db")
        status = client.get_run(first_run).info.status
        _train(folder, _logs(folder, monkeypatch), stop=False)
    finally:
        monkeypatch.undo()
    return folder, first_run, status


def test_resumed_tensorboard_run_has_every_epoch_once(resumed):
    folder, _, _ = resumed
    history = read_tsv(folder / "results/exp/head/history.tsv")
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    log_dir = folder / "results/exp/tensorboard/head"
    scalars = _scalars(log_dir)
    for column, (tag, _) in tracking.CURVES.items():
        assert [step for step, _ in scalars[tag]] == list(range(1, EPOCHS + 1)), tag
        expected = [float(r[column]) for r in history]
        assert [value for _, value in scalars[tag]] == pytest.approx(expected, rel=1e-5), tag
    # Not only as TensorBoard shows it: the files themselves hold each epoch once.
    assert _raw_steps(log_dir, "loss/val") == list(range(1, EPOCHS + 1))
    assert scalars["final/best_epoch"] == [(0, float(torch.load(
        folder / "results/exp/head/model.pt", weights_only=True)["best_epoch"]))]  # fmt: skip


def test_resumed_mlflow_run_is_the_same_run_with_every_epoch_once(resumed):
    from mlflow.tracking import MlflowClient

    folder, first_run, status_after_stop = resumed
    assert status_after_stop == "KILLED"  # stopped by "Slurm", waiting to be resumed
    client = MlflowClient(f"sqlite:///{folder}/results/mlflow.db")
    experiment = client.get_experiment_by_name(tracking.DEFAULT_MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [first_run]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "exp/head"
    assert run.data.tags["stage"] == "head" and run.data.tags["experiment"] == "exp"
    assert run.data.params["lr"] == "0.05" and run.data.params["model.backbone"] == "mobilenet_v2"
    history = read_tsv(folder / "results/exp/head/history.tsv")
    for column, (_, metric) in tracking.CURVES.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(first_run, metric))
        assert [step for step, _ in logged] == list(range(1, EPOCHS + 1)), metric
        expected = [float(r[column]) for r in history]
        assert [value for _, value in logged] == pytest.approx(expected, rel=1e-5), metric
    state = torch.load(folder / "results/exp/head/model.pt", weights_only=True)
    assert run.data.metrics["best_epoch"] == state["best_epoch"]
    artifacts = {a.path for a in client.list_artifacts(first_run)}
    assert artifacts == {"model.pt", "history.tsv", "learning_curves.png"}
    # The run id file goes once the stage is done: a later training is a new run.
    assert not (folder / "results/.resume/exp/head.pt.mlflow-run").exists()


def test_logs_are_off_unless_asked(monkeypatch):
    monkeypatch.delenv(tracking.ENVIRONMENT, raising=False)
    settings = HeadSettings(epochs=1, lr=0.1, batch_size=2, dropout=0.0, seed=1)
    logs = tracking.training_logs(
        _args(), stage="head", settings=settings, output="r/e/head/model.pt", resume=None
    )
    assert logs.observers == []
    # A hand run's flags win over the workflow's config; 'none' switches one off.
    monkeypatch.setenv(tracking.ENVIRONMENT, json.dumps({"tensorboard": True, "mlflow": "x:"}))
    logs = tracking.training_logs(
        _args(tensorboard="tb", mlflow="none"),
        stage="head",
        settings=settings,
        output="r/e/head/model.pt",
        resume=None,
    )
    assert [type(o).__name__ for o in logs.observers] == ["TensorBoardLog"]
    assert str(logs.observers[0].log_dir) == "tb"


def test_unusable_mlflow_store_names_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "CONNECT_ATTEMPTS", 1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = tracking.MlflowLog(f"sqlite:///{blocker}/mlflow.db", "x", "e/head", {}, {}, None)
    with pytest.raises(Exception, match="logging.mlflow"):
        log.on_start([])


# ---- the workflow ------------------------------------------------------------------------


def test_workflow_jobs_log_both_stages(small_run):
    from mlflow.tracking import MlflowClient

    for stage in ("head", "finetune"):
        history = read_tsv(small_run / f"results/baseline/{stage}/history.tsv")
        scalars = _scalars(small_run / f"results/baseline/tensorboard/{stage}")
        assert [s for s, _ in scalars["loss/val"]] == [int(r["epoch"]) for r in history]
    client = MlflowClient(f"sqlite:///{small_run}/results/mlflow.db")
    experiment = client.get_experiment_by_name(tracking.DEFAULT_MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["baseline/finetune", "baseline/head"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_turning_logs_off_reruns_nothing(small_run, tmp_path):
    config = small_config(SMALL_DATA, logging={"tensorboard": False, "mlflow": None})
    proc = snakemake(
        small_run, *STAGE_OUTPUTS, "-n", "--configfile", overlay(tmp_path / "c.yaml", config)
    )
    assert_ok(proc)
    assert "Nothing to be done" in proc.stdout
