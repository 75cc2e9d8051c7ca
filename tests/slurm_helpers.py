"""The local Slurm cluster of tests/cluster, Snakemake runs against it, and Slurm's records.

Used by tests/test_slurm.py.

    Cluster(state)       start.sh/stop.sh on a private state dir and free loopback ports;
                         .env() is the environment of a Snakemake run against it
    Run                  one `timeout -k 10 <s> snakemake ...` in the background
    Cluster.sacct(ids)   Slurm's accounting rows of those jobs, once they are final
    submitted_job_ids    the Slurm job ids a Snakemake output reports (array tasks as
                         <jobid>_<task>)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import REPO, SNAKEMAKE, snake_env

CLUSTER_SCRIPTS = REPO / "tests" / "cluster"
# What start.sh runs plus the clients the tests call.
REQUIRED_PROGRAMS = (
    "munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd",
    "sacctmgr", "sbatch", "srun", "sacct", "squeue", "scancel", "scontrol",
)  # fmt: skip
# The Slurm clients that Snakemake and its plugins call, in a job as well as outside.
CLIENTS = ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol", "sinfo", "sacctmgr")
SACCT_FIELDS = (
    "JobID", "JobName", "Comment", "Account", "Partition", "State", "ExitCode",
    "AllocTRES", "Timelimit", "Constraints", "Submit", "Start", "End",
)  # fmt: skip
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def missing_requirements() -> str | None:
    """Why the local cluster cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root (tests/cluster/README.md)"
    missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing:
        return (
            f"Slurm is not installed (missing: {', '.join(missing)}); "
            "apt-get install slurm-wlm slurmdbd munge mariadb-server"
        )
    return None


def clean_env(**extra: str) -> dict:
    """Environment of a Snakemake run: the venv first on PATH, none of the caller's Slurm
    settings (an inherited SBATCH_ACCOUNT, SBATCH_QOS or SLURM_JOB_ID would change what
    the profiles do), then `extra`."""
    env = snake_env()
    for name in list(env):
        if name.startswith(
            ("SBATCH_", "SLURM_", "SRUN_", "SALLOC_", "SNAKEMAKE_SLURM", "EXPANSE_")
        ):
            del env[name]
    env.update(extra)
    return env


def free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on right now, so a cluster of our own cannot clash."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Cluster:
    """A private instance of tests/cluster: own state dir, own ports."""

    def __init__(self, state: Path):
        self.state = Path(state)
        ctld, slurmd, slurmd2, dbd, mysql = free_ports(5)
        self.script_env = {
            **os.environ,
            "TLWF_SLURMCTLD_PORT": str(ctld),
            "TLWF_SLURMD_PORT": str(slurmd),
            "TLWF_SLURMD2_PORT": str(slurmd2),
            "TLWF_SLURMDBD_PORT": str(dbd),
            "TLWF_MYSQL_PORT": str(mysql),
        }
        self.script_env.pop("SLURM_CONF", None)
        self.slurm_conf = self.state / "etc" / "slurm.conf"
        self.bin = self.state / "bin"
        self.account = "testacct"

    def start(self, timeout: int = 180) -> None:
        proc = subprocess.run(
            [str(CLUSTER_SCRIPTS / "start.sh"), str(self.state)],
            env=self.script_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            logs = "\n".join(
                f"--- {log.name}\n{_tail(log)}"
                for log in sorted((self.state / "log").glob("*.log"))
            )
            raise RuntimeError(f"tests/cluster/start.sh failed:\n{proc.stdout}\n{logs}")
        env_sh = (self.state / "env.sh").read_text()
        match = re.search(r"^export SLURM_CONF=(\S+)", env_sh, re.M)
        self.slurm_conf = Path(match.group(1))
        account = re.search(r"^export TLWF_SLURM_ACCOUNT=(\S+)", env_sh, re.M)
        self.account = account.group(1) if account else self.account
        self._write_client_shims()

    def stop(self, timeout: int = 120) -> str:
        proc = subprocess.run(
            [str(CLUSTER_SCRIPTS / "stop.sh"), str(self.state)],
            env=self.script_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        return proc.stdout

    def _write_client_shims(self) -> None:
        """`srun`, `sbatch`, `sacct`, ... that find this cluster's slurm.conf even without
        SLURM_CONF.

        The Slurm plugins remove every SLURM_* variable, SLURM_CONF included, wherever
        Snakemake runs inside a job: the job step executor before it calls `srun`, and the
        Slurm executor before it submits and watches the stage jobs from a controller job.
        On a real cluster the clients then read /etc/slurm/slurm.conf; this cluster's
        config lives in its state dir, so without the shims every such call fails with
        "Could not establish a configuration source". The shims only restore the config
        path; everything else is the real client.
        """
        self.bin.mkdir(parents=True, exist_ok=True)
        for client in CLIENTS:
            shim = self.bin / client
            real = shutil.which(client)
            if real is None:
                continue
            shim.write_text(
                "#!/bin/sh\n"
                "# Written by tests/slurm_helpers.py: the Slurm plugins drop SLURM_CONF.\n"
                f'export SLURM_CONF="${{SLURM_CONF:-{self.slurm_conf}}}"\n'
                f'exec {real} "$@"\n'
            )
            shim.chmod(0o755)

    def env(self, **extra: str) -> dict:
        """Environment of a Snakemake run against this cluster (see clean_env)."""
        env = clean_env(SLURM_CONF=str(self.slurm_conf))
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        env.update(extra)
        return env

    def run(self, *command: str, timeout: int = 30, check: bool = True) -> str:
        proc = subprocess.run(
            [str(c) for c in command],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, command))} failed: {proc.stderr}")
        return proc.stdout

    # ---- Slurm's records -------------------------------------------------------------

    def _sacct_rows(self, *args: str) -> list[dict]:
        out = self.run("sacct", "-X", "-P", "-n", "-o", ",".join(SACCT_FIELDS), *args)
        return [
            dict(zip(SACCT_FIELDS, line.split("|"), strict=True))
            for line in out.splitlines()
            if line
        ]

    def sacct(self, job_ids, timeout: float = 60) -> dict[str, dict]:
        """{job id: sacct row} of these jobs (allocations only), polled until every row is
        final and complete (partition and time limit arrive a little after the end)."""
        job_ids = [str(j) for j in job_ids]
        if not job_ids:
            return {}
        deadline = time.monotonic() + timeout
        while True:
            rows = {r["JobID"]: r for r in self._sacct_rows("-j", ",".join(job_ids))}
            done = all(
                j in rows
                and rows[j]["State"].split()[0] in FINAL_STATES
                and rows[j]["Partition"]
                and rows[j]["Timelimit"]
                for j in job_ids
            )
            if done or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)

    def steps(self, job_id) -> list[dict]:
        """The job's steps (batch, 0, 1, ...) as sacct rows."""
        out = self.run("sacct", "-P", "-n", "-j", str(job_id), "-o", "JobID,State,AllocTRES%200")
        rows = [
            dict(zip(("JobID", "State", "AllocTRES"), line.split("|"), strict=True))
            for line in out.split("\n")
            if line
        ]
        return [r for r in rows if "." in r["JobID"]]

    def jobs_named(self, name: str, since: str, expect: int = 0, timeout: float = 20) -> list[dict]:
        """All allocations with this job name (the plugin names every job of a run after the
        run's id) since `since`. This is a time-window query, which lags about 3 s behind
        the end of a job (tests/cluster/README.md): poll until `expect` rows are there,
        then once more after the lag, so a late extra row is seen too."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self._sacct_rows("--name", name, "-S", since, "-E", "now")
            if len(rows) >= expect or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(4)
        return self._sacct_rows("--name", name, "-S", since, "-E", "now")


SUBMITTED = re.compile(
    r"has been submitted with SLURM jobid (\d+)"
    r"|Submitted array job with Snakemake IDs \S+ and SLURM job ID (\d+)\. "
    r"The individual task IDs are (\d+)-(\d+)\."
)


def submitted_job_ids(output: str) -> list[str]:
    """The Slurm job ids that a Snakemake output reports, in order; the tasks of a job
    array as <jobid>_<task>, as sacct lists them."""
    ids = []
    for match in SUBMITTED.finditer(output):
        single, array, first, last = match.groups()
        if single:
            ids.append(single)
        else:
            ids.extend(f"{array}_{task}" for task in range(int(first), int(last) + 1))
    return ids


def tres(row: dict) -> dict[str, str]:
    """AllocTRES 'billing=10,cpu=10,gres/gpu=1,mem=92G,node=1' as a dict."""
    return dict(item.split("=", 1) for item in row["AllocTRES"].split(",") if "=" in item)


def minutes_to_timelimit(minutes: int) -> str:
    """Slurm's Timelimit text for a whole number of minutes: 00:30:00, 03:15:00, 1-02:00:00."""
    days, rest = divmod(int(minutes), 24 * 60)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text


@dataclass
class Run:
    """`timeout -k 10 <timeout> snakemake -s REPO/Snakefile -d <workdir> <args>` in the
    background; its merged output goes to <workdir>.out (outside the workdir, whose
    contents the tests inspect)."""

    name: str
    workdir: Path
    args: list
    env: dict
    timeout: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float | None = None
    returncode: int | None = None
    started_at: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.workdir.with_name(self.workdir.name + ".out")

    def start(self) -> Run:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            "timeout", "-k", "10", str(self.timeout),
            str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(self.workdir),
            *map(str, self.args),
        ]  # fmt: skip
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.started = time.monotonic()
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=str(self.workdir),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # Notes when the run ends, whenever a test gets round to waiting for it.
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        returncode = self.proc.wait()
        self.seconds = time.monotonic() - self.started
        self.returncode = returncode

    def wait(self) -> Run:
        """Wait for the end of the run (its `timeout` ends it at the latest)."""
        self._watcher.join(timeout=self.timeout + 60)
        if self.returncode is None:
            raise RuntimeError(f"run {self.name} still running after {self.timeout + 60} s")
        return self

    def kill(self) -> None:
        """Stop this run's own `timeout` process (it passes the signal on to Snakemake)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def job_ids(self) -> list[str]:
        """Slurm job ids in the order the plugin reported the submissions."""
        return submitted_job_ids(self.output)

    @property
    def run_id(self) -> str | None:
        """The plugin's id of this run; every Slurm job of the run carries it as its name."""
        match = re.search(r"SLURM run ID: (\S+)", self.output)
        return match.group(1) if match else None

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])
