"""Training curves where users look: TensorBoard event files and MLflow runs.

Config keys `logging.tensorboard`, `logging.mlflow` and `logging.mlflow_experiment` (or the
flags of `add_arguments` in a hand run). Each is an `EpochObserver` of the training loop:
per epoch the losses, accuracies, learning rate and seconds; at the end the settings with
the final figures (TensorBoard's hparams; MLflow params and metrics) and, in MLflow, the
checkpoint, the history table and a learning-curve plot as artifacts. TensorBoard and
MLflow are imported only when they are switched on.

Neither changes a result, so neither re-runs a training: the workflow passes them through
the environment (`ENVIRONMENT`, set in rules/common.smk), not as a tracked param, and the
entry points load this module with importlib, so an edit here is not part of the training
stages' code digest (`sources.py`) either.

A resumed training continues the same run, with every epoch once:
- TensorBoard: the same folder. The event files of the earlier job go and the epochs
  already run are written again from the resumed history, with `purge_step=1` so that a
  TensorBoard already showing the old files drops their points too.
- MLflow: the run whose id the first job left beside the resume file
  (`<resume file>.mlflow-run`); only the epochs that run lacks are logged (a job may have
  stopped between saving an epoch and logging it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import UserError
from .train import EpochObserver, FitResult

log = logging.getLogger("transfer_learning")

# The workflow's `logging` config section as JSON (rules/common.smk sets it for every job).
ENVIRONMENT = "TRANSFER_LEARNING_LOGGING"
DEFAULT_MLFLOW_EXPERIMENT = "transfer_learning"
# history.tsv column -> (TensorBoard tag, MLflow metric)
CURVES = {
    "train_loss": ("loss/train", "train_loss"),
    "val_loss": ("loss/val", "val_loss"),
    "train_acc": ("accuracy/train", "train_accuracy"),
    "val_acc": ("accuracy/val", "val_accuracy"),
    "lr": ("learning_rate", "learning_rate"),
    "seconds": ("epoch_seconds", "epoch_seconds"),
}
EVENT_FILE_PREFIX = "events.out.tfevents."
RUN_ID_SUFFIX = ".mlflow-run"
MLFLOW_BATCH = 900  # MLflow takes at most 1000 metrics per call
CONNECT_ATTEMPTS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "training logs (never change results; default: the workflow's logging config)"
    )
    group.add_argument(
        "--tensorboard", default=None, metavar="DIR", help="folder of TensorBoard event files"
    )
    group.add_argument("--mlflow", default=None, metavar="URI", help="MLflow tracking URI")
    group.add_argument("--mlflow-experiment", default=None, metavar="NAME")
    group.add_argument("--run-name", default=None, help="default: <experiment>/<stage>")


def _from_environment() -> dict:
    text = os.environ.get(ENVIRONMENT, "")
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"environment variable {ENVIRONMENT} is not JSON: {error}") from None
    return values if isinstance(values, dict) else {}


def _off(value: str | None) -> bool:
    return value is not None and value.lower() in ("", "none", "null")


def flatten(values: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested settings as flat `a.b` keys; lists and None as text (hparams and params)."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def final_metrics(result: FitResult) -> dict[str, float]:
    """The kept epoch's figures and how long the training was."""
    kept = result.history[result.best_epoch - 1] if result.history else {}
    return {
        "best_epoch": float(result.best_epoch),
        "best_val_loss": float(result.best_val_loss),
        "best_val_accuracy": float(kept.get("val_acc", float("nan"))),
        "epochs_run": float(len(result.history)),
        "train_seconds": float(result.seconds),
    }


class TensorBoardLog(EpochObserver):
    """One TensorBoard run (folder) per experiment and stage."""

    def __init__(self, log_dir: str | os.PathLike, hparams: Mapping[str, object]):
        self.log_dir = Path(log_dir)
        self.hparams = dict(hparams)
        self.writer = None

    def on_start(self, history: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # The run holds this training's epochs only: a fresh start drops an earlier
            # training's curves, a resume writes the saved epochs again (see module doc).
            for old in self.log_dir.glob(f"{EVENT_FILE_PREFIX}*"):
                old.unlink()
            self.writer = SummaryWriter(str(self.log_dir), purge_step=1)
        except OSError as error:
            raise UserError(
                f"cannot write TensorBoard logs to {self.log_dir}: {error} "
                "(config key logging.tensorboard)"
            ) from None
        for row in history:
            self._write(row)
        self.writer.flush()

    def _write(self, row: Mapping) -> None:
        for column, (tag, _) in CURVES.items():
            self.writer.add_scalar(tag, float(row[column]), int(row["epoch"]))

    def on_epoch(self, row: dict) -> None:
        self._write(row)
        self.writer.flush()

    def on_end(self, result: FitResult) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"final/{name}": value for name, value in final_metrics(result).items()}
        for summary in hparams(self.hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)
        self.writer.flush()

    def finish(self, checkpoint: str, history: str) -> None:
        self.close()

    def abort(self, status: str) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock beside a sqlite store while a job connects: MLflow creates its
    tables on first use, and two jobs doing that at once fail. Where the file system has no
    locks, the retries of `_connect` remain."""
    database = _sqlite_path(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


class MlflowLog(EpochObserver):
    """One MLflow run per experiment and stage, found again when a training resumes."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, object],
        tags: Mapping[str, str],
        run_id_file: str | os.PathLike | None,
    ):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params)
        self.tags = dict(tags)
        self.run_id_file = Path(run_id_file) if run_id_file else None
        self.client = None
        self.run_id: str | None = None
        self.pending: list[dict] = []

    # -- the run ---------------------------------------------------------------------------

    def on_start(self, history: list[dict]) -> None:
        if self.uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked: the user asked, by this URI.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            experiment_id = self._connect()
            earlier = self._earlier_run()
            if history and earlier is not None:
                self.run_id = earlier
                self.client.update_run(self.run_id, status="RUNNING")
                logged = self._logged_steps()
                log.info("mlflow: continuing run %s (%s)", self.run_id, self.run_name)
            else:
                if earlier is not None:
                    self._end_stale(earlier)
                self.run_id = self._new_run(experiment_id)
                logged = {}
            self._log_rows(history, logged)
        except UserError:
            raise
        except Exception as error:  # an unreachable server, an unwritable store, ...
            raise UserError(
                f"cannot log to MLflow at {self.uri}: {type(error).__name__}: {error} "
                "(config key logging.mlflow)"
            ) from None

    def _connect(self) -> str:
        """The client and the MLflow experiment's id; creates the store and the experiment
        the first time. Jobs that start together (a sweep's trainings) take turns."""
        from mlflow.tracking import MlflowClient

        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                with _store_lock(self.uri):
                    self.client = MlflowClient(tracking_uri=self.uri)
                    return self._experiment_id()
            except Exception as error:
                if attempt == CONNECT_ATTEMPTS:
                    raise
                log.info("mlflow: %s: %s; trying again", type(error).__name__, error)
                time.sleep(attempt)
        raise AssertionError("unreachable")

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        database = _sqlite_path(self.uri)
        if database is not None:
            # Artifacts beside the database, not in whatever folder the first job ran in.
            location = str(database.resolve().parent / "mlartifacts")
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _earlier_run(self) -> str | None:
        """The run id an earlier job of this training left, if that run still exists."""
        if self.run_id_file is None or not self.run_id_file.is_file():
            return None
        run_id = self.run_id_file.read_text().strip()
        try:
            self.client.get_run(run_id)
        except Exception:  # deleted, or another store
            return None
        return run_id

    def _end_stale(self, run_id: str) -> None:
        """The run of a training that will not be continued (new settings, new inputs)."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status="KILLED")

    def _new_run(self, experiment_id: str) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        params = [Param(key, str(value)) for key, value in self.params.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])
        if self.run_id_file is not None:
            self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(run.info.run_id + "\n")
        log.info("mlflow: run %s (%s) at %s", run.info.run_id, self.run_name, self.uri)
        return run.info.run_id

    def _logged_steps(self) -> dict[str, set[int]]:
        return {
            metric: {m.step for m in self.client.get_metric_history(self.run_id, metric)}
            for _, metric in CURVES.values()
        }

    def _log_rows(self, rows: Sequence[Mapping], logged: Mapping[str, set[int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(metric, float(row[column]), now, int(row["epoch"]))
            for row in rows
            for column, (_, metric) in CURVES.items()
            if int(row["epoch"]) not in logged.get(metric, ())
        ]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + MLFLOW_BATCH])

    # -- during and after the training -----------------------------------------------------

    def _quietly(self, what: str, action, *args) -> None:
        """Logging must not cost a training: a failure after the start is a warning."""
        try:
            action(*args)
        except Exception as error:
            log.warning("mlflow: could not %s: %s: %s", what, type(error).__name__, error)

    def on_epoch(self, row: dict) -> None:
        # An epoch that failed to go (a busy store) goes with the next one.
        self.pending.append(row)
        self._quietly(f"log epoch {row['epoch']}", self._log_pending)

    def _log_pending(self) -> None:
        self._log_rows(self.pending, {})
        self.pending = []

    def on_end(self, result: FitResult) -> None:
        from mlflow.entities import Metric

        if self.pending:
            self._quietly("log the epochs left over", self._log_pending)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in final_metrics(result).items()]
        self._quietly("log the final metrics", self.client.log_batch, self.run_id, metrics)
        self._quietly("tag the kept epoch", self.client.set_tag, self.run_id, "kept", result.kept)

    def finish(self, checkpoint: str, history: str) -> None:
        """Model identity and artifacts once the stage's outputs exist; the run is FINISHED."""
        self._quietly("log the model's identity", self._log_identity, checkpoint)
        self._quietly("log the checkpoint", self.client.log_artifact, self.run_id, checkpoint)
        self._quietly("log the history", self.client.log_artifact, self.run_id, history)
        self._quietly("log the learning curves", self._log_curves, history)
        self._quietly("end the run", self.client.set_terminated, self.run_id, "FINISHED")
        if self.run_id_file is not None:
            self.run_id_file.unlink(missing_ok=True)

    def _log_identity(self, path: str) -> None:
        """What the stage's settings do not say: backbone, weights, image size, classes."""
        from mlflow.entities import Param

        from .checkpoint import load_stage

        identity = load_stage(path).identity
        values = {
            "model.backbone": identity.backbone,
            "model.weights": identity.weights,
            "model.image_size": identity.image_size,
            "classes": json.dumps(identity.classes, ensure_ascii=False),
        }
        params = [Param(key, str(value)) for key, value in values.items()]
        self.client.log_batch(self.run_id, params=params)

    def _log_curves(self, history: str) -> None:
        from . import plots

        stage = self.tags.get("stage", "")
        with tempfile.TemporaryDirectory() as folder:
            picture = Path(folder) / "learning_curves.png"
            if stage == "finetune":
                plots.learning_curves([], history, picture, title=self.run_name)
            else:
                plots.learning_curves(history, None, picture, title=self.run_name)
            self.client.log_artifact(self.run_id, str(picture))

    def abort(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self._quietly("end the run", self.client.set_terminated, self.run_id, status)


class TrainingLogs:
    """The observers of one training, as a context: `finish` after the outputs are written;
    leaving with an exception ends the MLflow run as KILLED (stopped by Slurm, resumable)
    or FAILED."""

    def __init__(self, observers: Sequence[EpochObserver] = ()):
        self.observers = list(observers)

    def __enter__(self) -> TrainingLogs:
        return self

    def finish(self, checkpoint: str, history: str) -> None:
        for observer in self.observers:
            observer.finish(checkpoint, history)

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            return
        status = "KILLED" if kind.__name__ == "TrainingInterrupted" else "FAILED"
        for observer in self.observers:
            observer.abort(status)


def training_logs(
    args: argparse.Namespace, *, stage: str, settings, output: str, resume: str | None
) -> TrainingLogs:
    """The observers a training stage's command line (or the workflow's config) asks for.

    By default the TensorBoard folder is `results/<experiment>/tensorboard/<stage>` and
    the run name `<experiment>/<stage>`, from the stage's `--output` (the workflow writes
    `results/<experiment>/<stage>/model.pt`).
    """
    if int(os.environ.get("RANK", "0")) > 0:
        # Under torchrun only rank 0 reports (train.fit runs observers there alone).
        return TrainingLogs()
    config = _from_environment()
    experiment_dir = Path(output).parent.parent
    experiment_name = experiment_dir.resolve().name
    run_name = args.run_name or f"{experiment_name}/{stage}"
    hparams = {"stage": stage, **flatten(settings.to_dict())}
    observers: list[EpochObserver] = []

    tensorboard = args.tensorboard
    if tensorboard is None and config.get("tensorboard"):
        tensorboard = str(experiment_dir / "tensorboard" / stage)
    if tensorboard is not None and not _off(tensorboard):
        observers.append(TensorBoardLog(tensorboard, hparams))

    uri = args.mlflow if args.mlflow is not None else config.get("mlflow")
    if uri is not None and not _off(uri):
        experiment = (
            args.mlflow_experiment or config.get("mlflow_experiment") or DEFAULT_MLFLOW_EXPERIMENT
        )
        observers.append(
            MlflowLog(
                uri,
                experiment,
                run_name,
                hparams,
                {"experiment": experiment_name, "stage": stage},
                f"{resume}{RUN_ID_SUFFIX}" if resume else None,
            )
        )
    return TrainingLogs(observers)
