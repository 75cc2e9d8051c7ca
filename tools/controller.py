#!/usr/bin/env python3
"""Run the workflow on a Slurm cluster with Snakemake itself as a Slurm job.

Run it in the working directory (where results/, logs/ and .snakemake/ are written):

    tools/controller.py start --profile profiles/expanse [SNAKEMAKE ARGUMENTS ...]
    tools/controller.py status
    tools/controller.py cancel

start   1. refuses if a controller of this working directory is queued or running;
        2. cancels stage jobs that a controller which ended (time limit, failed node) left
           behind, and the Snakemake lock it left (the next controller redoes or resumes
           those stages);
        3. runs the login-node rules here (downloads: compute nodes may have no internet);
        4. submits the controller, <profile>/controller.sbatch, which runs
           `snakemake --profile <profile> SNAKEMAKE ARGUMENTS` and submits and watches
           the stage jobs; its log is logs/controller/<jobid>.log.
        The same command starts a run, and continues it after its controller ended:
        finished stages are kept, interrupted trainings resume.
status  the controller and the stage jobs of this working directory, and the run's
        progress from the controller's log.
cancel  cancels the controller (which cancels its stage jobs first), then any stage job
        of this working directory that is still there.

One controller per working directory: it is found in squeue by its job name
(snakemake-controller) and its working directory. Other Snakemake processes in the same
working directory are not looked for: do not run Snakemake there by hand meanwhile.
The site's part (partition, time limit and memory of the controller) is the #SBATCH lines
of <profile>/controller.sbatch; the account comes from SBATCH_ACCOUNT, as for the stages.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLER_JOB_NAME = "snakemake-controller"
# Rules that run on the login node (`localrule: True`: downloads, demo data).
LOGIN_NODE_RULES = ("fetch_data", "fetch_weights", "make_demo_data")
LOG_DIR = Path("logs") / "controller"
# Stage jobs of the Slurm plugin carry rule_<rule>_... or group_<group>_... as comment.
STAGE_COMMENT = re.compile(r"^(rule|group)_")
# How long a cancelled job may take to leave the queue (Slurm's KillWait, Snakemake
# cancelling its jobs).
CANCEL_TIMEOUT = 300


class ControllerError(Exception):
    """A problem the user can fix; its message says how."""


@dataclass(frozen=True)
class Job:
    job_id: str  # as squeue prints it: 123, 124_2, 125_[3-4]
    array_id: str  # the id scancel needs for the whole job (the array's, for a task)
    name: str
    state: str
    comment: str
    elapsed: str

    @property
    def is_controller(self) -> bool:
        return self.name == CONTROLLER_JOB_NAME

    @property
    def is_stage(self) -> bool:
        return not self.is_controller and bool(STAGE_COMMENT.match(self.comment))


def run_slurm(*command: str) -> str:
    if shutil.which(command[0]) is None:
        raise ControllerError(
            f"{command[0]} is not on PATH: run this on a login node of the Slurm cluster"
        )
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControllerError(f"`{' '.join(command)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def jobs_in(workdir: Path) -> list[Job]:
    """This user's queued and running jobs whose working directory is `workdir`."""
    out = run_slurm("squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%A|%j|%T|%M|%k|%Z")
    jobs = []
    for line in out.splitlines():
        job_id, array_id, name, state, elapsed, comment, jobdir = line.split("|", 6)
        if os.path.realpath(jobdir) == os.path.realpath(workdir):
            jobs.append(Job(job_id, array_id, name, state, comment, elapsed))
    return jobs


def cancel(jobs: list[Job], workdir: Path, what: str) -> None:
    """scancel these jobs and wait until they have left the queue."""
    ids = sorted({job.array_id for job in jobs}, key=int)
    print(f"Cancelling {what}: {' '.join(ids)}", flush=True)
    run_slurm("scancel", *ids)
    deadline = time.monotonic() + CANCEL_TIMEOUT
    while any(job.array_id in ids for job in jobs_in(workdir)):
        if time.monotonic() > deadline:
            raise ControllerError(
                f"jobs {' '.join(ids)} are still in the queue {CANCEL_TIMEOUT} s after "
                "scancel; check `squeue -u $USER` and try again"
            )
        time.sleep(2)


def snakemake(profile: Path, args: list[str], *extra: str, capture: bool = False) -> str:
    """`snakemake --profile <profile> <args> <extra>` here, on the login node."""
    command = ["snakemake", "--profile", str(profile), *args, *extra]
    proc = subprocess.run(command, text=True, capture_output=capture)
    if proc.returncode != 0:
        detail = f":\n{proc.stdout}{proc.stderr}" if capture else " (see above)"
        raise ControllerError(f"`{' '.join(command)}` failed{detail}")
    return proc.stdout or ""


def profile_dir(name: str) -> Path:
    profile = Path(name).resolve()
    if not any((profile / f).is_file() for f in ("config.v8+.yaml", "config.yaml")):
        raise ControllerError(f"--profile {name}: no Snakemake profile (config.v8+.yaml) there")
    if not (profile / "controller.sbatch").is_file():
        raise ControllerError(
            f"--profile {name}: there is no controller.sbatch, the controller job's script "
            "with its resources; copy profiles/expanse/controller.sbatch and adapt its "
            "#SBATCH lines to your site"
        )
    return profile


def start(profile_name: str, args: list[str]) -> None:
    workdir = Path.cwd()
    for arg in args:
        if arg.split("=")[0] in ("-d", "--directory", "--profile"):
            raise ControllerError(
                f"{arg}: run tools/controller.py in the working directory, with one --profile"
            )
    profile = profile_dir(profile_name)
    jobs = jobs_in(workdir)
    controllers = [job for job in jobs if job.is_controller]
    if controllers:
        job = controllers[0]
        raise ControllerError(
            f"a controller of {workdir} is already {job.state} as Slurm job {job.job_id} "
            f"(log: {LOG_DIR / job.job_id}.log). One controller per working directory: "
            "watch it with `tools/controller.py status`, stop the run with "
            "`tools/controller.py cancel`."
        )
    leftovers = [job for job in jobs if job.is_stage]
    if leftovers:
        cancel(leftovers, workdir, "stage jobs left behind by a controller that ended")
    if any((workdir / ".snakemake" / "locks").glob("*.lock")):
        print("Removing the Snakemake lock left behind by a controller that ended.", flush=True)
        snakemake(profile, args, "--unlock")

    rules = set(snakemake(profile, args, "--list-rules", capture=True).split())
    login_rules = [rule for rule in LOGIN_NODE_RULES if rule in rules]
    if login_rules:
        print(f"Login-node rules first, here: {' '.join(login_rules)}", flush=True)
        snakemake(profile, args, "--until", *login_rules)

    (workdir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    out = run_slurm(
        "sbatch",
        "--parsable",
        f"--job-name={CONTROLLER_JOB_NAME}",
        f"--chdir={workdir}",
        f"--output={workdir / LOG_DIR}/%j.log",
        str(profile / "controller.sbatch"),
        "--profile",
        str(profile),
        *args,
    )
    job_id = out.strip().split(";")[0]
    print(
        f"Submitted the controller as Slurm job {job_id}.\n"
        f"  its log:         {LOG_DIR / job_id}.log\n"
        "  watch the run:   tools/controller.py status\n"
        "  stop the run:    tools/controller.py cancel\n"
        "  after its end (time limit, failed node, cancelled): the same command again\n"
        "  continues the run."
    )


def progress(log: Path) -> str:
    """The last 'N of M steps (x%) done' line of a controller log."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "steps (" in line]
    return lines[-1].strip() if lines else "no step finished yet"


def status() -> None:
    workdir = Path.cwd()
    jobs = jobs_in(workdir)
    controllers = [job for job in jobs if job.is_controller]
    stages = [job for job in jobs if job.is_stage]
    if controllers:
        for job in controllers:
            log = LOG_DIR / f"{job.job_id}.log"
            done = progress(log) if log.is_file() else "no log yet"
            print(f"controller  {job.job_id:>10}  {job.state:<10} {job.elapsed:>10}  {log}: {done}")
    else:
        logs = sorted(LOG_DIR.glob("*.log"), key=lambda p: p.stat().st_mtime)
        last = f" (last log: {logs[-1]}: {progress(logs[-1])})" if logs else ""
        print(f"No controller is queued or running for {workdir}{last}.")
    for job in stages:
        print(f"stage       {job.job_id:>10}  {job.state:<10} {job.elapsed:>10}  {job.comment}")


def cancel_run() -> None:
    workdir = Path.cwd()
    jobs = jobs_in(workdir)
    controllers = [job for job in jobs if job.is_controller]
    if controllers:
        # The controller cancels its own stage jobs first (see controller.sbatch).
        cancel(controllers, workdir, "the controller")
    stages = [job for job in jobs_in(workdir) if job.is_stage]
    if stages:
        cancel(stages, workdir, "stage jobs")
    if not controllers and not stages:
        print(f"Nothing to cancel: no controller or stage job runs for {workdir}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See README.md, 'Running on Expanse'.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser(
        "start",
        help="login-node rules here, then the controller as a Slurm job",
        description="Unknown arguments go to Snakemake (e.g. --configfile my.yaml).",
        allow_abbrev=False,
    )
    start_parser.add_argument("--profile", required=True, help="e.g. profiles/expanse")
    commands.add_parser("status", help="the controller and stage jobs of this directory")
    commands.add_parser("cancel", help="cancel the controller and its stage jobs")
    options, snakemake_args = parser.parse_known_args(argv)
    if options.command != "start" and snakemake_args:
        parser.error(f"unrecognized arguments: {' '.join(snakemake_args)}")
    try:
        if options.command == "start":
            start(options.profile, snakemake_args)
        elif options.command == "status":
            status()
        else:
            cancel_run()
    except ControllerError as error:
        print(f"tools/controller.py {options.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
