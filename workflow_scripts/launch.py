#!/usr/bin/env python3
"""Run a stage program as one process per GPU: the rule's `gpu` and `nodes` resources decide.

Usage (the GPU rules' shell lines):
    launch.py --gpu {resources.gpu} --nodes {resources.nodes} -- finetune.py --settings ...

- 1 GPU: the program replaces this process (exec) with exactly the arguments after `--`;
  no torchrun, no process group: the one-GPU path of every stage as it always was.
- N GPUs on one node: `torchrun --standalone --nproc-per-node N program ...`; torchrun
  gives each process its rank and GPU (distributed.py) and waits for all of them.
- N GPUs on M nodes (`gpu` counts the job's GPUs, as sbatch's --gpus does; N/M per node):
  `srun` starts one torchrun per node, and they meet (c10d rendezvous) on this node, the
  job's first, where Snakemake runs the rule. Needs a Slurm allocation of M nodes whose
  job script runs the rule itself (the `mpi` resource; README, "Several GPUs").

With torchrun this program stays, as torchrun's parent, for one reason: exit status 75.
A training process stopped by a signal saves its state and exits 75, which the profiles
and the README promise for an interrupted job; torchrun exits 1 whenever a process fails.
Each process that stops so leaves a mark in a folder named by the environment
(`cli.INTERRUPTED_MARKS`, in the working directory, which every node of a job shares),
and a failed torchrun with a mark there makes this program exit 75.

`--dry-run` prints the command instead of running it. Importing torch would cost seconds,
so this program runs torchrun as `python -m torch.distributed.run` with its own Python.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

# cli.py's names, repeated: importing the package would import numpy for nothing.
INTERRUPTED_MARKS = "TRANSFER_LEARNING_INTERRUPTED_MARKS"
EXIT_INTERRUPTED = 75
# torchrun's default rendezvous port; a job's own port is offset by its job id, so two
# multi-node jobs that share a node do not meet each other.
RDZV_BASE_PORT = 29400


def per_node(gpus: int, nodes: int) -> int:
    if gpus < 0 or nodes < 1:
        raise SystemExit(f"launch.py: --gpu {gpus} --nodes {nodes}: out of range")
    if gpus % nodes:
        raise SystemExit(
            f"launch.py: --gpu {gpus} GPUs cannot be spread evenly over --nodes {nodes} "
            "(resources gpu counts the job's GPUs: give a multiple of nodes)"
        )
    return gpus // nodes


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]


def one_process(args: argparse.Namespace) -> bool:
    return args.gpu <= 1 and args.nodes == 1  # gpu=0: a run on the CPU, one process as well


def command(args: argparse.Namespace) -> list[str]:
    """The command line that runs `args.program` on `args.gpu` GPUs over `args.nodes` nodes."""
    nproc = per_node(args.gpu, args.nodes)
    program = shutil.which(args.program[0]) or args.program[0]
    if one_process(args):
        return [program, *args.program[1:]]
    if args.nodes == 1:
        return [*torchrun(nproc), "--standalone", program, *args.program[1:]]
    job = os.environ.get("SLURM_JOB_ID")
    if job is None and not args.dry_run:
        raise SystemExit(
            f"launch.py: --nodes {args.nodes} needs a Slurm allocation of that many nodes "
            "(srun starts one torchrun per node); outside Slurm use one node"
        )
    host = args.rdzv_host or socket.gethostname()
    port = args.rdzv_port or RDZV_BASE_PORT + int(job or 0) % 1000
    srun = [
        "srun",
        f"--nodes={args.nodes}",
        f"--ntasks={args.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={nproc}",
        # The whole of each node's share of the job: its CPUs and memory.
        f"--cpus-per-task={os.environ.get('SLURM_CPUS_ON_NODE', '1')}",
        "--mem=0",
        # One failed node ends the step at once instead of leaving the others waiting.
        "--kill-on-bad-exit=1",
    ]
    return [
        *srun,
        *torchrun(nproc),
        f"--nnodes={args.nodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        f"--rdzv-id={job or 'dry-run'}",
        program,
        *args.program[1:],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=1, help="GPUs of the job (resources gpu)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    parser.add_argument("--rdzv-host", help="where the nodes meet (default: this node)")
    parser.add_argument("--rdzv-port", type=int, help="default: 29400 + job id %% 1000")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    args = parser.parse_args()
    if args.program[:1] == ["--"]:
        args.program = args.program[1:]
    if not args.program:
        parser.error("give the program to run after --")
    line = command(args)
    if args.dry_run:
        print(shlex.join(line))
        return
    sys.stdout.flush()
    if one_process(args):
        os.execvp(line[0], line)
    raise SystemExit(run_torchrun(line))


def run_torchrun(line: list[str]) -> int:
    """Run torchrun's `line`; its exit status, or 75 when it failed because a training
    process stopped for a signal (and saved its state)."""
    # Slurm's early SIGUSR1 (--signal=USR1@300), like its SIGTERM and a terminal's Ctrl-C,
    # reaches every process of the job step: torchrun's agent and the training processes
    # get their own, and nothing is passed on from here (a second SIGTERM would cut short
    # the agent's wait for the training processes to save). torchrun's agent has no handler
    # for SIGUSR1 and would die of it, leaving the training processes without their agent;
    # ignored here, it stays ignored in the agent, and the training processes install their
    # own handler. This process only waits.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    with tempfile.TemporaryDirectory(prefix=".launch-", dir=os.getcwd()) as marks:
        env = {**os.environ, INTERRUPTED_MARKS: marks}
        status = subprocess.run(line, env=env, check=False).returncode
        if status != 0 and os.listdir(marks):
            return EXIT_INTERRUPTED
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    main()
