"""Several processes, one stage (distributed.py, launch.py): real torchrun processes on the CPU
with the gloo backend, the path a GPU node takes with nccl.

- the launcher: one GPU runs the program itself, N GPUs torchrun, N GPUs on M nodes one
  torchrun per node under srun with a c10d rendezvous
- every process trains on its share of the one-process batches; inference shards are whole
  batches, gathered in order
- 2 processes (torchrun --standalone, through launch.py): the fine-tuning history matches one
  process within TOLERANCE; evaluation files are identical to one process; SIGUSR1 sent to
  ONE rank stops both after the same batch
- the resumed run, launched as two torchrun agents that meet on loopback (c10d, what two
  nodes do), ends with the history and weights of the uninterrupted 2-process run
- a Snakemake run with `--set-resources finetune:gpu=2 evaluate:gpu=2`

Run as a program (`test_distributed.py worker JOB.json`) this file is the torchrun worker
that runs the real stage functions; the tests start it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    REPO,
    SCRIPTS,
    StopAfter,
    assert_ok,
    copy_workdir,
    job_stats,
    snakemake,
    tail,
)
from transfer_learning import data, distributed, io, stages, train
from transfer_learning.settings import (
    EvaluateSettings,
    FeatureSettings,
    FinetuneSettings,
    HeadSettings,
)

LAUNCH = SCRIPTS / "launch.py"
PYTHON = sys.executable

# Fine tuning on 32 images: batches of 11 (shares of 6 and 5 images: uneven, so the loss
# weights matter), a last batch of 10 (5 + 5). No dropout (masks are drawn per process)
# and frozen BatchNorm (SyncBatchNorm needs CUDA): what remains between one and two
# processes is the order of floating-point sums (gradient all_reduce, batches of 6 instead
# of 11 through the convolutions).
FINETUNE = FinetuneSettings(
    epochs=3, lr=1e-4, batch_size=11, unfreeze_blocks=3, warmup_epochs=1, patience=10,
    min_delta=0.0, seed=7, batchnorm="frozen",
)  # fmt: skip
# Measured between 1 and 2 processes: losses within 3e-6 (relative), accuracies equal.
# Without the loss weights of the uneven shares the losses differ by 1e-3 to 1e-2. (At lr
# 1e-3 this random-weight network diverges, and rounding grows to 3e-3 in three epochs.)
TOLERANCE = dict(rel=1e-4, abs=1e-5)
HISTORY_FIGURES = ["train_loss", "train_acc", "val_loss", "val_acc", "lr"]


# ---- the torchrun worker ---------------------------------------------------------------------


def _finetune(job: dict, name: str, resume: str | None):
    folder = Path(job["out"])
    return stages.finetune(
        FinetuneSettings.from_mapping(job["finetune"]),
        head_checkpoint=job["head"],
        manifest=job["manifest"],
        data_root=job["root"],
        splits=["train", "val"],
        output=str(folder / f"{name}.pt"),
        history=str(folder / f"{name}.tsv"),
        resume=resume,
        device="cpu",
    )


def _finetune_stopped_on_one_rank(job: dict, rank: int) -> None:
    """SIGUSR1 to rank 1 alone, one batch into epoch 2; every rank records how far it got."""
    folder = Path(job["out"])
    real_fit = stages.fit
    trained = {"batches": 0}

    def counted(loader):
        for batch in loader:
            trained["batches"] += 1
            yield batch

    def fit(model, train_loader_for, *args, **kwargs):
        def loader_for(epoch):
            loader = train_loader_for(epoch)
            if epoch != 2:
                return loader
            return counted(StopAfter(loader, 1) if rank == 1 else loader)

        return real_fit(model, loader_for, *args, **kwargs)

    stages.fit = fit
    try:
        _finetune(job, "stopped", job["resume"])
        outcome = "finished"
    except train.TrainingInterrupted as stop:
        outcome = signal.Signals(stop.signum).name
    finally:
        stages.fit = real_fit
    record = {"outcome": outcome, "batches_in_epoch_2": trained["batches"]}
    (folder / f"stopped-rank{rank}.json").write_text(json.dumps(record))


# Batches of 5: 4 per split of 16, 2 per process. Batches of 16: one, and an empty shard.
EVAL_BATCH_SIZES = (5, 16)


def _evaluate(head, root, manifest, out: Path) -> None:
    for batch_size in EVAL_BATCH_SIZES:
        folder = out / f"eval{batch_size}"
        stages.evaluate(
            EvaluateSettings(batch_size=batch_size), checkpoint_path=str(head),
            manifest=str(manifest), data_root=str(root), splits=["val", "test"],
            metrics_out=str(folder / "metrics.tsv"),
            predictions_out=str(folder / "predictions.tsv"),
            confusion_out=str(folder / "confusion.tsv"), device="cpu",
        )  # fmt: skip


def worker(job_file: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    job = json.loads(Path(job_file).read_text())
    processes = distributed.setup("cpu")
    assert processes.world_size == 2, processes
    for step in job["steps"]:
        if step == "finetune":
            _finetune(job, "full", str(Path(job["out"]) / "full-resume.pt"))
        elif step == "evaluate":
            _evaluate(job["head"], job["root"], job["manifest"], Path(job["out"]))
        elif step == "stop_one_rank":
            _finetune_stopped_on_one_rank(job, processes.rank)
        elif step == "resume":
            _finetune(job, "resumed", job["resume"])


# ---- helpers -------------------------------------------------------------------------------


def _env() -> dict:
    """This Python's venv and the stage programs first on PATH, as in a rule's shell line."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), str(SCRIPTS), env.get("PATH", "")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID"):
        env.pop(name, None)
    return env


def _launch_line(*args: str) -> list[str]:
    """The command launch.py runs for `args` (its --dry-run output)."""
    proc = subprocess.run(
        [PYTHON, str(LAUNCH), "--dry-run", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _run(command: list[str], log: Path, **env: str):
    """Start `command` with its output in `log`; (process, log handle) for _wait."""
    handle = log.open("w")
    return subprocess.Popen(
        command, env={**_env(), **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent
    ), handle


def _wait(started, timeout: int = 300) -> int:
    process, handle = started
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
        handle.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _history(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in io.read_tsv(path)]


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head(small_tree):
    """A head trained on cached features of a random-weight MobileNetV2 (no dropout)."""
    folder, root, manifest = small_tree
    features = {}
    for split in ("train", "val"):
        features[split] = folder / "ddp-features" / f"{split}.pt"
        stages.extract_features(
            FeatureSettings(
                backbone="mobilenet_v2", weights="random", image_size=32,
                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augmented_views=0, seed=3,
                batch_size=16,
            ),
            manifest=str(manifest), data_root=str(root), split=split,
            output=str(features[split]), device="cpu",
        )  # fmt: skip
    stages.train_head(
        HeadSettings(epochs=2, lr=1e-3, batch_size=16, dropout=0.0, seed=7),
        train_features=str(features["train"]),
        val_features=str(features["val"]),
        output=str(folder / "ddp-head.pt"),
        history=str(folder / "ddp-head.tsv"),
        device="cpu",
    )
    return folder / "ddp-head.pt"


@pytest.fixture(scope="module")
def two_processes(small_tree, head, tmp_path_factory):
    """One torchrun launch (launch.py --gpu 2) of: the full fine tuning, the evaluation of
    the head, and the fine tuning stopped by SIGUSR1 on rank 1; then the resume, as two
    torchrun agents (one process each) that meet on loopback."""
    _, root, manifest = small_tree
    out = tmp_path_factory.mktemp("ddp")
    job = {
        "out": str(out), "head": str(head), "manifest": str(manifest), "root": str(root),
        "finetune": FINETUNE.to_dict(), "resume": str(out / "resume" / "finetune.pt"),
    }  # fmt: skip
    first = out / "first.json"
    first.write_text(json.dumps({**job, "steps": ["finetune", "evaluate", "stop_one_rank"]}))
    line = _launch_line("--gpu", "2", "--nodes", "1", "--", __file__, "worker", str(first))
    code = _wait(_run(line, out / "first.log"))
    assert code == 0, tail((out / "first.log").read_text(), 80)

    second = out / "second.json"
    second.write_text(json.dumps({**job, "steps": ["resume"]}))
    port = str(_free_port())
    line = _launch_line(
        "--gpu", "2", "--nodes", "2", "--rdzv-host", "127.0.0.1", "--rdzv-port", port,
        "--", __file__, "worker", str(second),
    )  # fmt: skip
    agent = line[line.index(PYTHON) :]  # what srun starts on each node
    # One thread per process, as torchrun sets for several processes per node (here one
    # per agent): the uninterrupted run had it, and the last bits depend on it.
    agents = [_run(agent, out / f"agent{i}.log", OMP_NUM_THREADS="1") for i in range(2)]
    codes = [_wait(started) for started in agents]
    logs = "\n".join(tail((out / f"agent{i}.log").read_text(), 60) for i in range(2))
    assert codes == [0, 0], logs
    return out


@pytest.fixture(scope="module")
def one_process(small_tree, head, tmp_path_factory):
    """The same fine tuning and evaluation in this process, with one thread as each torchrun
    process has: on the CPU the convolutions' last bits depend on the thread count."""
    _, root, manifest = small_tree
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _one_process_runs(head, root, manifest, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _one_process_runs(head, root, manifest, out):
    stages.finetune(
        FINETUNE, head_checkpoint=str(head), manifest=str(manifest), data_root=str(root),
        splits=["train", "val"], output=str(out / "full.pt"), history=str(out / "full.tsv"),
        device="cpu",
    )  # fmt: skip
    _evaluate(head, root, manifest, out)


# ---- without processes: shares, shards, the launcher's commands ----------------------------


def test_processes_share_the_one_process_batches_in_order():
    """32 images in batches of 11 over 1, 2 and 3 processes: the same batches, same order."""
    for epoch in (1, 2):
        one = data.EpochSampler(32, True, 5, encode_epoch=True, batch_size=11)
        one.set_epoch(epoch)
        batches = [list(one)[i : i + 11] for i in range(0, 32, 11)]
        for world_size in (2, 3):
            parts = []
            for rank in range(world_size):
                sampler = data.EpochSampler(
                    32, True, 5, encode_epoch=True, batch_size=11, rank=rank,
                    world_size=world_size,
                )  # fmt: skip
                sampler.set_epoch(epoch)
                order, size = list(sampler), sampler.local_batch_size
                assert len(order) == len(sampler)
                parts.append([order[i : i + size] for i in range(0, len(order), size)])
            together = [sum((p[k] for p in parts), []) for k in range(len(batches))]
            assert together == batches, (epoch, world_size)
    assert [data.EpochSampler(32, True, 5, False, 11, rank=r, world_size=3).local_batch_size
            for r in range(3)] == [4, 4, 3]  # fmt: skip


def test_a_last_batch_too_small_to_share_sits_out():
    # 34 images in batches of 16: one process keeps the last 2, two processes need 2 each
    # (BatchNorm in train mode), so those 2 sit this epoch out, as a lone image does.
    assert len(data.EpochSampler(34, True, 1, False, 16, drop_lone_last=True)) == 34
    assert len(data.EpochSampler(33, True, 1, False, 16, drop_lone_last=True)) == 32
    shares = [
        data.EpochSampler(34, True, 1, False, 16, drop_lone_last=True, rank=r, world_size=2)
        for r in range(2)
    ]
    assert [len(s) for s in shares] == [16, 16]
    with pytest.raises(ValueError, match="leave process 2 of 3 without images"):
        data.EpochSampler(2, True, 1, False, 16, rank=2, world_size=3)


def test_inference_shards_are_whole_batches_in_order():
    for n, batch, world_size in [(50, 8, 3), (16, 64, 2), (7, 2, 4)]:
        shards = [
            distributed.inference_shard(n, batch, distributed.Processes(rank, world_size))
            for rank in range(world_size)
        ]
        assert [i for shard in shards for i in shard] == list(range(n))
        assert all(shard.start % batch == 0 for shard in shards if len(shard))
    assert distributed.inference_shard(16, 64, distributed.Processes(1, 2)) == range(16, 16)


def test_launcher_runs_one_gpu_as_the_program_and_more_with_torchrun():
    program = str(SCRIPTS / "finetune.py")
    assert _launch_line("--gpu", "1", "--nodes", "1", "--", "finetune.py", "--lr", "1e-4") == [
        program, "--lr", "1e-4",
    ]  # fmt: skip
    assert _launch_line("--gpu", "4", "--nodes", "1", "--", "finetune.py", "--lr", "1") == [
        PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", program,
        "--lr", "1",
    ]  # fmt: skip
    line = _launch_line("--gpu", "8", "--nodes", "2", "--rdzv-host", "gpu01", "--", "evaluate.py")
    agent = line.index(PYTHON)
    assert line[0] == "srun" and "--nodes=2" in line and "--ntasks-per-node=1" in line[:agent]
    assert line[agent:] == [
        PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:29400", "--rdzv-id=dry-run",
        str(SCRIPTS / "evaluate.py"),
    ]  # fmt: skip
    uneven = subprocess.run(
        [PYTHON, str(LAUNCH), "--gpu", "3", "--nodes", "2", "--", "evaluate.py"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert uneven.returncode != 0 and "cannot be spread evenly" in uneven.stderr


# A stage program in miniature: cli.run around a main that ends as the job's rank says.
STAGE_ENDING = """
import os, signal, sys
sys.path.insert(0, {scripts!r})
from transfer_learning import cli
from transfer_learning.errors import TrainingInterrupted

def main():
    ending = sys.argv[1].split(",")[int(os.environ["RANK"])]
    if ending == "signal":
        raise TrainingInterrupted(signal.SIGUSR1)
    if ending == "error":
        raise RuntimeError("a bug")

cli.run("stage", main)
"""


@pytest.mark.parametrize(
    "endings, status",
    [("signal,signal", 75), ("done,signal", 75), ("done,error", 1), ("done,done", 0)],
)
def test_launcher_exits_75_when_a_process_stopped_for_a_signal(tmp_path, endings, status):
    """torchrun exits 1 when any process fails; launch.py says 75 when one was stopped by
    a signal (its state saved), as one process does, and leaves no marks behind."""
    program = tmp_path / "stage.py"
    program.write_text(STAGE_ENDING.format(scripts=str(SCRIPTS)))
    proc = subprocess.run(
        [PYTHON, str(LAUNCH), "--gpu", "2", "--", str(program), endings],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == status, proc.stderr[-3000:]
    if "signal" in endings:
        assert "stopped by signal SIGUSR1; state saved" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.py"]


def test_gpu_node_profile_is_the_expanse_profile_with_finetune_on_a_whole_node():
    """profiles/expanse-gpu-node: the `gpu` partition's whole node (4 GPUs, 40 cores, the
    node's memory) for finetune; every other setting is profiles/expanse's."""
    profiles = REPO / "profiles"
    expanse = yaml.safe_load((profiles / "expanse" / "config.v8+.yaml").read_text())
    node = yaml.safe_load((profiles / "expanse-gpu-node" / "config.v8+.yaml").read_text())
    finetune = node["set-resources"]["finetune"]
    assert finetune["slurm_partition"] == "'gpu'" and finetune["gpu"] == 4
    assert finetune["cpus_per_task"] == 40 == node["set-threads"]["finetune"]
    assert finetune["mem_mb"] == 4 * 94208  # four gpu-shared shares of 92 GiB
    assert finetune["slurm_extra"] == expanse["set-resources"]["finetune"]["slurm_extra"]
    node["set-resources"]["finetune"] = expanse["set-resources"]["finetune"]
    node["set-threads"]["finetune"] = expanse["set-threads"]["finetune"]
    assert node == expanse
    controller = "controller.sbatch"
    assert (profiles / "expanse-gpu-node" / controller).read_text() == (
        profiles / "expanse" / controller
    ).read_text()


# ---- two real processes ----------------------------------------------------------------------


def test_two_process_history_matches_one_process(two_processes, one_process):
    two = _history(two_processes / "full.tsv")
    one = _history(one_process / "full.tsv")
    assert [row["epoch"] for row in two] == ["1", "2", "3"]
    for row_two, row_one in zip(two, one, strict=True):
        for name in HISTORY_FIGURES:
            assert float(row_two[name]) == pytest.approx(float(row_one[name]), **TOLERANCE), (
                name,
                row_two,
                row_one,
            )
    weights_two = io.load_checkpoint(two_processes / "full.pt")["model"]
    weights_one = io.load_checkpoint(one_process / "full.pt")["model"]
    for key, value in weights_one.items():
        assert torch.allclose(weights_two[key].float(), value.float(), atol=1e-4), key
    log = (two_processes / "first.log").read_text()
    assert "2 processes (2 on this node), backend gloo" in log


def test_two_process_evaluation_is_identical_to_one_process(two_processes, one_process):
    for folder in (f"eval{batch_size}" for batch_size in EVAL_BATCH_SIZES):
        for name in ("metrics", "predictions", "confusion"):
            two = (two_processes / folder / f"{name}.tsv").read_text()
            assert two == (one_process / folder / f"{name}.tsv").read_text(), (folder, name)
        assert len(io.read_tsv(two_processes / folder / "predictions.tsv")) == 32


def test_a_signal_to_one_rank_stops_both_after_the_same_batch(two_processes):
    records = [json.loads((two_processes / f"stopped-rank{r}.json").read_text()) for r in (0, 1)]
    # Rank 1 received SIGUSR1 one batch into epoch 2; rank 0 received nothing. Both trained
    # that batch and stopped after it: their next collective would otherwise have hung.
    assert records == [{"outcome": "SIGUSR1", "batches_in_epoch_2": 2}] * 2
    log = (two_processes / "first.log").read_text()
    assert "[rank 1] received SIGUSR1: stopping after this batch" in log
    assert log.count("received SIGUSR1") == 1
    # The state of epoch 1, written by rank 0 alone; no outputs of the stopped run.
    assert not (two_processes / "stopped.pt").exists()
    assert not (two_processes / "stopped.tsv").exists()


def test_resumed_two_process_run_equals_the_uninterrupted_one(two_processes):
    """Resumed as two torchrun agents meeting on loopback (c10d), as two nodes meet."""
    logs = [(two_processes / f"agent{i}.log").read_text() for i in range(2)]
    assert sum("finetune: resuming after epoch 1" in log for log in logs) == 1, logs
    assert _history(two_processes / "resumed.tsv") == _history(two_processes / "full.tsv")
    resumed = io.load_checkpoint(two_processes / "resumed.pt")
    full = io.load_checkpoint(two_processes / "full.pt")
    assert resumed["best_epoch"] == full["best_epoch"]
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert not Path(json.loads((two_processes / "second.json").read_text())["resume"]).exists()


# ---- through Snakemake ---------------------------------------------------------------------


def test_snakemake_runs_the_gpu_stages_on_two_processes(small_run, tmp_path):
    """`--set-resources ...:gpu=2`: no config change, two processes for every GPU stage."""
    workdir = copy_workdir(small_run, tmp_path / "work")
    targets = ["results/baseline/finetune/model.pt", "results/baseline/eval/head/predictions.tsv"]
    # Only the two forced rules run: upstream outputs stay current even if the package's
    # code digest moved since small_run (mtime and input decide, not params).
    proc = snakemake(
        workdir, *targets, "--forcerun", "extract_features", "finetune", "evaluate",
        "--rerun-triggers", "mtime", "input", "--set-resources", "extract_features:gpu=2",
        "finetune:gpu=2", "evaluate:gpu=2",
        "--configfile", workdir / "config" / "small.yaml",
    )  # fmt: skip
    assert_ok(proc, "snakemake with two processes")
    assert job_stats(proc.stdout) == {
        "extract_features": 2, "train_head": 1, "finetune": 1, "evaluate": 1,
    }, tail(proc.stdout)  # fmt: skip
    # Extraction shards whole batches and gathers them in order: the one-process features
    # (to the last digits: the one-process run used two threads, each process here one).
    for one_file in sorted((small_run / "results" / "features").glob("*/*.pt")):
        two_file = workdir / one_file.relative_to(small_run)
        one, two = (torch.load(f, weights_only=True) for f in (one_file, two_file))
        assert one["paths"] == two["paths"] and torch.equal(one["labels"], two["labels"])
        scale = one["features"].abs().max()  # random weights: features can be tiny
        assert scale > 0 and (one["features"] - two["features"]).abs().max() <= 1e-4 * scale
    extract_log = next((workdir / "logs" / "extract_features").glob("*/train.log")).read_text()
    assert "2 processes (2 on this node), backend gloo" in extract_log, extract_log
    log = (workdir / "logs" / "finetune" / "baseline.log").read_text()
    assert "2 processes (2 on this node), backend gloo" in log, log
    # weights: null trains BatchNorm: on the CPU per process (SyncBatchNorm needs CUDA).
    assert "SyncBatchNorm needs CUDA" in log, log
    history = _history(workdir / "results/baseline/finetune/history.tsv")
    assert len(history) == 2 and all(float(row["train_loss"]) > 0 for row in history)
    # The head's evaluation on two processes gives the one-process run's predictions (to
    # the last digits: the one-process run used two threads, each process here one).
    path = "results/baseline/eval/head/predictions.tsv"
    two, one = io.read_tsv(workdir / path), io.read_tsv(small_run / path)
    assert [(r["path"], r["predicted"]) for r in two] == [(r["path"], r["predicted"]) for r in one]
    for row_two, row_one in zip(two, one, strict=True):
        assert float(row_two["probability"]) == pytest.approx(
            float(row_one["probability"]), abs=1e-5
        )
    eval_log = (workdir / "logs" / "evaluate" / "baseline" / "head.log").read_text()
    assert "2 processes (2 on this node), backend gloo" in eval_log, eval_log


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2])
