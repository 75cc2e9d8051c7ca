"""The Expanse profiles on a real Slurm cluster, checked against Slurm's own records.

The cluster is tests/cluster: one node shaped like an Expanse GPU node (40 cores, 384 GB,
4 fake GPUs, feature lustre; plus some room for CPU jobs) and a second, small one for
jobs over two nodes (partition multinode), Expanse's partition names
(gpu-preempt included, with a higher-priority gpu-priority partition that may preempt it),
accounting through slurmdbd that rejects unknown accounts, finished jobs forgotten by
slurmctld after seconds (MinJobAge). A private instance (own state dir, own free ports)
starts once for this module and stops at its end. Without Slurm, or not as root, the
module's cluster tests are skipped; in CI (CI=true) they fail instead.

Every run is the real command line: `snakemake --profile profiles/expanse[-one-job]`, or
`tools/controller.py start --profile profiles/expanse`, with only the account
(SBATCH_ACCOUNT), the GPU partition option (EXPANSE_GPU_PARTITION), the data (a config
overlay: smaller demo data, fewer epochs, data root outside the working directory) and the
status-check intervals set here; no resource is overridden. Each run is bounded by
`timeout -k 10` or a deadline. The cluster runs start together at the beginning (fixture
`runs`) and each test waits for its own: a Slurm job costs two Snakemake start-ups plus
the plugin's growing status-check interval, so one after the other they would take several
times as long.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import REPO, copy_workdir, jobs, overlay, snakemake, tail, write_images
from slurm_helpers import (
    Cluster,
    Run,
    clean_env,
    minutes_to_timelimit,
    missing_requirements,
    submitted_job_ids,
    tres,
)

PROFILE = REPO / "profiles" / "expanse"
ONE_JOB = REPO / "profiles" / "expanse-one-job"
DEMO = REPO / "config" / "demo.yaml"
CONTROLLER_TOOL = REPO / "tools" / "controller.py"
# The only settings the tests add on the command line: short status-check intervals.
STATUS_CHECKS = [
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1",
]  # fmt: skip

GPU_RULES = ("extract_features", "finetune", "evaluate", "predict")
LOCAL_RULES = ("make_demo_data", "fetch_data", "fetch_weights")
# Every rule of the workflow, read from rules/*.smk, so a new rule needs no edit here.
ALL_RULES = tuple(
    sorted(
        {
            name
            for path in (REPO / "rules").glob("*.smk")
            for name in re.findall(r"^\s*rule (\w+):", path.read_text(), re.M)
        }
    )
)
CPU_RULES = tuple(r for r in ALL_RULES if r not in (*GPU_RULES, *LOCAL_RULES))
TRAINING_RULES = ("train_head", "finetune")
GROUPED_RULES = ("extract_features", "train_head", "finetune", "evaluate")
# Rules whose mem_mb the profiles compute from the size of their inputs.
MEMORY_BY_INPUT = ("extract_features", "train_head")
ONE_ALLOCATION_KEYS = ("groups", "group-components", "resources", "set-resource-scopes")
SIGNAL = "--signal=USR1@300"
GPU_PARTITION = "?repr(GPU_PARTITION)"
# Exit status of `timeout -k 10 ...` when the run ran out of time: 124 after TERM; when
# Snakemake ignored TERM, timeout sends KILL to its process group, itself included.
TIMED_OUT = (124, 137, -9)

# The demo, smaller: 64 images of 32 px, 3 + 3 epochs. Config only, no resources.
FAST = {
    "data": {
        "expected_counts": {
            "train": {"circles": 16, "squares": 16},
            "val": {"circles": 8, "squares": 8},
            "test": {"circles": 8, "squares": 8},
        },
        "demo": {"image_size": 32},
    },
    "model": {"image_size": 32},
    "head": {"epochs": 3},
    "finetune": {"epochs": 3, "warmup_epochs": 1, "patience": 3},
}
# The small demo with a fine-tuning long enough to interrupt it mid-way (an epoch takes
# half a second to a second here) and no early stop before its end.
LONG_FINETUNE = {**FAST, "finetune": {"epochs": 30, "warmup_epochs": 1, "patience": 40}}
# A sweep: baseline and one grid point, which share their features.
SWEEP = {**FAST, "experiments": {"lr": {"grid": {"finetune.lr": [0.003]}}}}
SWEEP_EXPERIMENTS = ("baseline", "lr_lr0.003")
# Everything but the plots (rules/report.smk): the stages whose jobs the tests check.
STAGE_TARGETS = [
    "results/data/counts.tsv",
    "results/summary.tsv",
    *(
        f"results/baseline/eval/{stage}/{name}.tsv"
        for stage in ("head", "finetune")
        for name in ("metrics", "predictions", "confusion")
    ),
]
STAGE_OUTPUTS = [
    *STAGE_TARGETS,
    "results/data/manifest.tsv",
    "results/baseline/head/model.pt",
    "results/baseline/head/history.tsv",
    "results/baseline/finetune/model.pt",
    "results/baseline/finetune/history.tsv",
]
FINETUNE_HISTORY = "results/baseline/finetune/history.tsv"


# ---- the profiles as data ----------------------------------------------------------------


def load_profile(path: Path) -> dict:
    """The profile's YAML (yte's `?` keys and values stay text)."""
    return yaml.safe_load((path / "config.v8+.yaml").read_text())


def profile_resource(profile: dict, rule: str, name: str):
    """The profile's value for a rule: its set-resources entry, else default-resources."""
    return profile["set-resources"].get(rule, {}).get(name, profile["default-resources"][name])


def runtime(profile: dict, rule: str, attempt: int = 1) -> int:
    """The rule's runtime in minutes for that attempt, as Snakemake evaluates it."""
    return eval(str(profile_resource(profile, rule, "runtime")), {"attempt": attempt})


def rule_of(comment: str, rules=ALL_RULES) -> str | None:
    """The rule of a Slurm job from the plugin's comment rule_<rule>[_wildcards_<...>]."""
    for rule in sorted(rules, key=len, reverse=True):
        if comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_"):
            return rule
    return None


def by_rule(rows: dict[str, dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in rows.values():
        found.setdefault(rule_of(row["Comment"]) or row["Comment"], []).append(row)
    return found


def run_report(run, rows=None) -> str:
    text = f"{run.name}: exit {run.returncode} after {run.seconds or 0:.0f} s\n{run.tail(100)}"
    if rows:
        text += "\nsacct:\n" + "\n".join(str(r) for r in rows.values())
    return text


def assert_run_ok(run: Run) -> None:
    if run.returncode != 0:
        pytest.fail(run_report(run))


def assert_outputs(workdir: Path, paths) -> None:
    missing = [p for p in paths if not (workdir / p).is_file()]
    assert not missing, f"missing outputs in {workdir}: {missing}"


def history_without_times(path: Path) -> list[dict]:
    """A history.tsv's rows without the column of wall times (`seconds`)."""
    header, *rows = path.read_text().splitlines()
    names = header.split("\t")
    return [
        {k: v for k, v in zip(names, row.split("\t"), strict=True) if k != "seconds"}
        for row in rows
    ]


# ---- profile checks that need no cluster ---------------------------------------------------


def test_one_job_profile_is_the_per_stage_profile_plus_groups():
    """expanse-one-job = expanse + the job-group keys + what a group needs: one partition
    and one slurm_extra for all its members, and no job arrays for the grouped rules.
    Nothing else may drift apart, the controller's script included."""
    stages, one_job = load_profile(PROFILE), load_profile(ONE_JOB)
    expected = copy.deepcopy(stages)
    for rule in GROUPED_RULES:
        expected["set-resources"][rule]["slurm_partition"] = GPU_PARTITION
        expected["set-resources"][rule]["slurm_extra"] = f"'{SIGNAL}'"
    for key in ONE_ALLOCATION_KEYS:
        expected[key] = one_job[key]
    expected["slurm-array-jobs"] = ",".join(
        r for r in ("verify_dataset", "summarize", "plot_experiment", "plot_stage", "plot_summary")
    )
    definitions = [
        d.replace("profiles/expanse-one-job", "profiles/expanse")
        for d in one_job["__definitions__"]
    ]
    assert {**one_job, "__definitions__": definitions} == expected
    assert one_job["groups"] == dict.fromkeys(GROUPED_RULES, "gpu_stages")
    assert one_job["resources"] == {"gpu": 1}
    assert one_job["set-resource-scopes"] == {"gpu": "local"}
    assert not set(one_job["slurm-array-jobs"].split(",")) & set(GROUPED_RULES)
    assert (ONE_JOB / "controller.sbatch").read_text() == (
        PROFILE / "controller.sbatch"
    ).read_text()


def test_login_node_rules_of_the_controller_tool_are_the_local_rules():
    """tools/controller.py runs the workflow's local rules on the login node before it
    submits the controller: its list must be the rules marked `localrule: True`."""
    local = set()
    for path in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"^(?=\s*rule \w+:)", path.read_text(), flags=re.M):
            name = re.match(r"\s*rule (\w+):", block)
            if name and re.search(r"^\s*localrule: True", block, re.M):
                local.add(name.group(1))
    text = CONTROLLER_TOOL.read_text()
    listed = re.search(r"^LOGIN_NODE_RULES = \((.*)\)$", text, re.M).group(1)
    assert set(re.findall(r'"(\w+)"', listed)) == local == set(LOCAL_RULES)


def test_dry_run_maps_every_rule_onto_expanse(tmp_path):
    """What the profile gives each job of the whole default target, plots included, as
    Snakemake resolves it (rules' own values overridden, attempt 1)."""
    proc = snakemake(
        tmp_path / "work", "--profile", PROFILE, "--configfile", DEMO, "-n",
        cores=None, env=clean_env(SBATCH_ACCOUNT="testacct"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, tail(proc.stdout)
    profile = load_profile(PROFILE)
    seen = set()
    for job in jobs(proc.stdout):
        rule = job["rule"]
        if rule == "all":
            continue
        seen.add(rule)
        resources = dict(r.split("=", 1) for r in job["resources"].split(", "))
        assert resources["slurm_account"] == "testacct", rule
        assert resources["constraint"] == "lustre", rule
        assert "qos" not in resources, rule
        if rule in LOCAL_RULES:
            continue
        assert rule in profile["set-resources"], f"profiles/expanse does not map rule {rule}"
        assert int(resources["runtime"]) == runtime(profile, rule), rule
        if rule in MEMORY_BY_INPUT:
            # From the size of inputs not made yet: test_memory_follows_the_input_size.
            assert resources["mem_mb"] == "<TBD>", rule
        else:
            assert int(resources["mem_mb"]) == profile_resource(profile, rule, "mem_mb"), rule
        assert (resources.get("slurm_extra") == SIGNAL) == (rule in TRAINING_RULES), rule
        if rule in GPU_RULES:
            assert resources["slurm_partition"] == "gpu-shared", rule
            assert (resources["gpu"], resources["cpus_per_task"]) == ("1", "10"), rule
            assert resources["mem_mb"] in (str(92 * 1024), "<TBD>"), rule
        else:
            assert resources["slurm_partition"] == "shared", rule
            assert "gpu" not in resources, rule
    assert seen >= {*GROUPED_RULES, "verify_dataset", "summarize", "make_demo_data"}, seen


def _memory_of_dry_run(workdir: Path) -> dict[str, int]:
    proc = snakemake(
        workdir, "--profile", PROFILE, "-n", "--forcerun", *MEMORY_BY_INPUT,
        "--configfile", DEMO, cores=None, env=clean_env(SBATCH_ACCOUNT="testacct"),
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, tail(proc.stdout)
    memory = {}
    for job in jobs(proc.stdout):
        if job["rule"] in MEMORY_BY_INPUT:
            resources = dict(r.split("=", 1) for r in job["resources"].split(", "))
            memory.setdefault(job["rule"], set()).add(int(resources["mem_mb"]))
    return {rule: values.pop() for rule, values in memory.items() if len(values) == 1}


def test_memory_follows_the_input_size(demo_run, tmp_path):
    """mem_mb of extract_features and train_head as Snakemake evaluates the profile's
    expressions from their inputs' sizes: the memory model of README "Benchmark" (feature
    rows per MB of manifest; the head maps its feature files), within the GPU's share of
    92 GB and the 2 GB per core that are charged anyway."""
    workdir = copy_workdir(demo_run, tmp_path / "work")
    manifest = workdir / "results" / "data" / "manifest.tsv"
    train, val = (next(workdir.glob(f"results/features/*/{s}.pt")) for s in ("train", "val"))

    def expected():
        manifest_mb = manifest.stat().st_size / 2**20
        features_mb = (train.stat().st_size + val.stat().st_size) / 2**20
        return {
            "extract_features": max(92 * 1024, int(4000 + 150 * manifest_mb)),
            "train_head": max(4000, int(1000 + 1.25 * features_mb)),
        }

    small = _memory_of_dry_run(workdir)
    assert small == expected() == {"extract_features": 92 * 1024, "train_head": 4000}
    # A data set of millions of images, as far as the sizes go: the files grow (sparse,
    # so nothing is written) and a dry run reads nothing but their sizes.
    os.truncate(manifest, 1 << 30)
    os.truncate(train, 8 << 30)
    large = _memory_of_dry_run(workdir)
    assert large == expected()
    assert large["extract_features"] == 4000 + 150 * 1024
    assert large["train_head"] == int(1000 + 1.25 * (8 * 1024 + val.stat().st_size / 2**20))


def test_gpu_partition_option_puts_only_the_gpu_stages_on_gpu_preempt(tmp_path):
    """EXPANSE_GPU_PARTITION=gpu-preempt moves the GPU stages, nothing else; any other
    value stops the run before anything runs, saying what is allowed."""
    target = "results/baseline/eval/finetune/metrics.tsv"
    env = clean_env(SBATCH_ACCOUNT="testacct", EXPANSE_GPU_PARTITION="gpu-preempt")
    proc = snakemake(
        tmp_path / "work", target, "--profile", PROFILE, "--configfile", DEMO, "-n",
        cores=None, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, tail(proc.stdout)
    partitions = {
        job["rule"]: dict(r.split("=", 1) for r in job["resources"].split(", "))["slurm_partition"]
        for job in jobs(proc.stdout)
        if job["rule"] not in (*LOCAL_RULES, "all")
    }
    assert set(partitions) == {"verify_dataset", "train_head", *GPU_RULES} - {"predict"}
    assert partitions == {
        rule: "gpu-preempt" if rule in GPU_RULES else "shared" for rule in partitions
    }, partitions

    env["EXPANSE_GPU_PARTITION"] = "gpu"
    workdir = tmp_path / "bad"
    proc = snakemake(workdir, "--profile", PROFILE, "-n", cores=None, env=env, timeout=120)
    assert proc.returncode == 1, tail(proc.stdout)
    assert "EXPANSE_GPU_PARTITION='gpu' is not one of gpu-shared, gpu-preempt" in proc.stdout
    assert "Building DAG" not in proc.stdout


def test_qos_comes_from_sbatch_qos(tmp_path):
    env = clean_env(SBATCH_ACCOUNT="testacct", SBATCH_QOS="gpu-shared-normal")
    target = "results/data/counts.tsv"
    proc = snakemake(
        tmp_path / "work", target, "--profile", PROFILE, "--configfile", DEMO, "-n",
        cores=None, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, tail(proc.stdout)
    (verify,) = [j for j in jobs(proc.stdout) if j["rule"] == "verify_dataset"]
    assert "qos=gpu-shared-normal" in verify["resources"].split(", ")


@pytest.mark.parametrize("profile", [PROFILE, ONE_JOB], ids=["expanse", "expanse-one-job"])
def test_missing_account_stops_before_anything_runs(tmp_path, profile):
    workdir = tmp_path / "work"
    env = clean_env()
    started = time.monotonic()
    proc = snakemake(
        workdir, "--profile", profile, "--configfile", DEMO, cores=None, env=env, timeout=120
    )
    assert proc.returncode == 1, tail(proc.stdout)
    assert time.monotonic() - started < 60
    assert "the environment variable SBATCH_ACCOUNT is not set" in proc.stdout
    assert "export SBATCH_ACCOUNT=" in proc.stdout
    # Stopped while reading the profile: no DAG, no local rule, no job.
    assert not (workdir / "data").exists()
    assert not (workdir / "logs").exists()
    assert "Building DAG" not in proc.stdout


# ---- the cluster and the runs ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Slurm tests, but {reason}")
        pytest.skip(reason)
    # Not under pytest's basetemp: munged refuses a socket below a directory that others
    # cannot traverse, and pytest's are private (0700).
    state = Path(tempfile.mkdtemp(prefix="tlwf-slurm-test-"))
    state.chmod(0o755)
    slurm = Cluster(state)
    try:
        slurm.start()
        yield slurm
    finally:
        print(slurm.stop())
        shutil.rmtree(state, ignore_errors=True)


def _selected_runs(request) -> set[str]:
    """Runs requested by the tests of this module that pytest will run."""
    names = set()
    for item in request.session.items:
        if item.module is request.module:
            names |= {n.removeprefix("run_") for n in item.fixturenames if n.startswith("run_")}
    return names


def _queue(cluster: Cluster) -> list[dict]:
    """squeue's jobs (pending, running, completing): id, array id, name, state, reason,
    comment, partition, working directory."""
    keys = ("id", "array_id", "name", "state", "reason", "comment", "partition", "workdir")
    out = cluster.run("squeue", "-h", "-o", "%i|%A|%j|%T|%r|%k|%P|%Z", check=False)
    return [dict(zip(keys, line.split("|", 7), strict=True)) for line in out.splitlines()]


def _running(cluster: Cluster, workdir: Path, rule: str) -> dict | None:
    """The RUNNING job of `rule` whose working directory is `workdir`, if any."""
    for job in _queue(cluster):
        if (
            rule_of(job["comment"]) == rule
            and job["state"] == "RUNNING"
            and os.path.realpath(job["workdir"]) == os.path.realpath(workdir)
        ):
            return job
    return None


def _epochs(log: Path) -> int:
    return len(re.findall(r"epoch \d+/", log.read_text())) if log.is_file() else 0


def _interrupt_job(
    cluster: Cluster, run: Run, rule: str, scancel: list[str], deadline: float, ready=None
) -> None:
    """`scancel <scancel args> <job>` on the run's job of `rule` once it is RUNNING (and
    `ready(run)` is true): a job stopped from outside. Records what it did in run.extra
    ("interrupted", or "interrupt_error"); for finetune also the log of that attempt,
    which the retry overwrites."""
    try:
        while time.monotonic() < deadline and run.proc.poll() is None:
            job = _running(cluster, run.workdir, rule)
            if job is not None and (ready is None or ready(run)):
                log = run.workdir / "logs" / rule / "baseline.log"
                cluster.run("scancel", *scancel, job["id"])
                run.extra["interrupted"] = {"job": job["id"], "epochs_done": _epochs(log)}
                # The stage's own account of the interruption (the retry's `> log`
                # replaces the file).
                until = time.monotonic() + 60
                while log.is_file() and time.monotonic() < until:
                    text = log.read_text()
                    run.extra["interrupted"]["log"] = text
                    if "stopped by signal" in text:
                        break
                    time.sleep(0.2)
                return
            time.sleep(0.3)
        run.extra["interrupt_error"] = f"no RUNNING {rule} job of this run to interrupt"
    except Exception as error:  # reported by the test, not lost in the thread
        run.extra["interrupt_error"] = repr(error)


def _snakemake_pid(run: Run) -> int:
    """The Snakemake process of a run (the child of its `timeout`)."""
    pid = run.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    (child,) = children
    return int(child)


def _cancel_unwatched(cluster: Cluster, run: Run, rule: str, deadline: float) -> None:
    """Plain `scancel` of the run's running job of `rule` while its Snakemake is stopped
    (SIGSTOP), which stays stopped until squeue no longer lists the job (MinJobAge of
    tests/cluster: seconds): when Snakemake looks again, the job ended longer ago than
    slurmctld keeps it. Records run.extra["interrupted"] (job, seconds until unlisted)."""
    try:
        while time.monotonic() < deadline and run.proc.poll() is None:
            job = _running(cluster, run.workdir, rule)
            if job is None:
                time.sleep(0.3)
                continue
            pid = _snakemake_pid(run)
            os.kill(pid, signal.SIGSTOP)
            try:
                cancelled = time.monotonic()
                cluster.run("scancel", job["id"])
                while cluster.run("squeue", "-h", "-t", "all", "-j", job["id"], check=False):
                    if time.monotonic() > cancelled + 180:
                        raise RuntimeError(f"squeue still lists job {job['id']} after 180 s")
                    time.sleep(1)
                unlisted = time.monotonic() - cancelled
            finally:
                os.kill(pid, signal.SIGCONT)
            run.extra["interrupted"] = {"job": job["id"], "unlisted_after": unlisted}
            return
        run.extra["interrupt_error"] = f"no RUNNING {rule} job of this run to cancel"
    except Exception as error:
        run.extra["interrupt_error"] = repr(error)


def _free_gpus(cluster: Cluster) -> int:
    """GPUs of the node that no job holds."""
    node = cluster.run("scontrol", "show", "node", "-o")
    configured = re.search(r"CfgTRES=\S*gres/gpu=(\d+)", node)
    allocated = re.search(r"AllocTRES=\S*gres/gpu=(\d+)", node)
    return int(configured.group(1)) - (int(allocated.group(1)) if allocated else 0)


def _preempt_finetune(cluster: Cluster, run: Run, deadline: float) -> None:
    """Preempt the run's fine tune on gpu-preempt once it has finished an epoch.

    A job on gpu-priority (higher PriorityTier) asks for one GPU more than the node has
    free, so only preempting the fine tune (then the only gpu-preempt job) makes room.
    The other runs start and end GPU jobs meanwhile: if the job starts without
    preempting, or cannot start even so, it is cancelled and submitted again with fresh
    numbers. Slurm holds a requeued job back for about two minutes (reason BeginTime);
    the test lets it go at once (`scontrol update StartTime=now`, what its owner may do).
    Records run.extra["preempted"] (job, epochs done, preemptor) or "preempt_error"."""
    tries = 0
    try:
        while time.monotonic() < deadline and run.proc.poll() is None:
            job = _running(cluster, run.workdir, "finetune")
            preemptable = [j for j in _queue(cluster) if j["partition"] == "gpu-preempt"]
            if job is None or len(preemptable) != 1 or not _has_resume_file(run):
                time.sleep(0.3)
                continue
            tries += 1
            epochs = _epochs(run.workdir / "logs" / "finetune" / "baseline.log")
            preemptor = cluster.run(
                "sbatch", "--parsable", f"--account={cluster.account}",
                "--partition=gpu-priority", f"--gpus={_free_gpus(cluster) + 1}",
                "--cpus-per-task=1", "--mem=1000", "--time=1", "--job-name=preemptor",
                "--output=/dev/null", "--wrap", "sleep 5",
            ).strip()  # fmt: skip
            until = time.monotonic() + 10
            while time.monotonic() < until:
                state = cluster.run("squeue", "-h", "-j", job["id"], "-o", "%T", check=False)
                if state.strip() not in ("RUNNING", ""):
                    break
                time.sleep(0.3)
            records = cluster.run("sacct", "-D", "-X", "-n", "-P", "-j", job["id"], "-o", "State")
            if "PREEMPTED" not in records.split():
                cluster.run("scancel", preemptor, check=False)
                continue
            run.extra["preempted"] = {
                "job": job["id"], "epochs_done": epochs, "preemptor": preemptor, "tries": tries,
            }  # fmt: skip
            until = time.monotonic() + 30
            while time.monotonic() < until:
                queued = cluster.run("squeue", "-h", "-j", job["id"], "-o", "%T|%r", check=False)
                if queued.strip() == "PENDING|BeginTime":
                    cluster.run("scontrol", "update", f"JobId={job['id']}", "StartTime=now")
                    return
                if queued.startswith("RUNNING"):
                    return
                time.sleep(0.3)
            return
        run.extra["preempt_error"] = f"the fine tune was not preempted ({tries} tries)"
    except Exception as error:
        run.extra["preempt_error"] = repr(error)


def _has_resume_file(run) -> bool:
    """finetune has finished at least one epoch: there is a state to resume from."""
    return (run.workdir / "results" / ".resume" / "baseline" / "finetune.pt").is_file()


@dataclass
class ControllerScenario:
    """Runs through tools/controller.py in a thread: `script(scenario, deadline)` calls
    the tool (`tool`, `start_controller`) and waits (`until`); the outputs of its steps
    and the controllers' job ids are kept in `steps` and `controllers`."""

    name: str
    workdir: Path
    cluster: Cluster
    env: dict
    args: list
    timeout: int
    script: Callable
    steps: dict = field(default_factory=dict)
    controllers: list = field(default_factory=list)
    started_at: str = ""
    error: str | None = None
    seconds: float | None = None
    returncode: int | None = None

    def start(self) -> ControllerScenario:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._started = time.monotonic()
        self._thread.start()
        return self

    def wait(self) -> ControllerScenario:
        self._thread.join(timeout=self.timeout + 60)
        if self._thread.is_alive():
            raise RuntimeError(f"{self.name} still running after {self.timeout + 60} s")
        return self

    def kill(self) -> None:
        for job_id in self.controllers:
            self.cluster.run("scancel", job_id, check=False)

    def tool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CONTROLLER_TOOL), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def start_controller(self, step: str) -> None:
        proc = self.tool("start", "--profile", str(PROFILE), *map(str, self.args))
        self.steps[step] = proc
        match = re.search(r"Submitted the controller as Slurm job (\d+)", proc.stdout)
        if proc.returncode != 0 or not match:
            raise RuntimeError(f"{step}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        self.controllers.append(match.group(1))

    def until(self, what: str, condition, deadline: float) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def gone(self, job_id: str) -> bool:
        return not any(j["id"] == job_id for j in _queue(self.cluster))

    def _run(self) -> None:
        try:
            self.script(self, self._started + self.timeout)
            self.returncode = 0
        except Exception as error:  # reported by the test
            self.error = repr(error)
            self.returncode = 1
            self.kill()
        self.seconds = time.monotonic() - self._started

    def tail(self, lines: int = 80) -> str:
        text = [f"error: {self.error}"] if self.error else []
        for step, proc in self.steps.items():
            if isinstance(proc, subprocess.CompletedProcess):
                text.append(f"--- {step}: exit {proc.returncode}\n{tail(proc.stdout, 20)}")
                text.append(tail(proc.stderr, 20))
        for job_id in self.controllers:
            path = self.workdir / "logs" / "controller" / f"{job_id}.log"
            if path.is_file():
                text.append(f"--- controller {job_id}\n{tail(path.read_text(), lines)}")
        return "\n".join(text)


def _cancel_and_restart(scenario: ControllerScenario, deadline: float) -> None:
    """1. `start`: the login-node rules here, then controller 1 as a Slurm job;
    2. `start` again while it runs: refused;
    3. once the fine tune has finished an epoch, `cancel`: the controller cancels its
       stage jobs and exits (what `scancel` of the controller or its time limit does);
    4. `start`: controller 2 finishes the run."""
    scenario.start_controller("start 1")
    scenario.steps["start while running"] = scenario.tool(
        "start", "--profile", str(PROFILE), *map(str, scenario.args)
    )
    scenario.until(
        "controller 1's fine tune to finish an epoch",
        lambda: (
            _running(scenario.cluster, scenario.workdir, "finetune") and _has_resume_file(scenario)
        ),
        deadline,
    )
    scenario.steps["cancel"] = scenario.tool("cancel")
    scenario.start_controller("start 2")
    scenario.until(
        "controller 2 to finish", lambda: scenario.gone(scenario.controllers[1]), deadline
    )


def _clean_up_after_a_dead_controller(scenario: ControllerScenario, deadline: float) -> None:
    """What a controller leaves when its node fails (it cannot cancel anything): a stage
    job still running in its working directory (a real job that carries a stage job's
    comment) and Snakemake's lock. `start` (with `-n`: a dry-run controller) must cancel
    the one, remove the other, and submit the controller."""
    workdir = scenario.workdir
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text(f"{workdir}/results/data/manifest.tsv\n")
    leftover = scenario.cluster.run(
        "sbatch", "--parsable", f"--account={scenario.cluster.account}",
        "--partition=shared", "--time=10", "--job-name=run-of-a-dead-controller",
        "--comment=rule_finetune_wildcards_baseline", f"--chdir={workdir}",
        "--output=/dev/null", "--wrap", "sleep 600",
    ).strip()  # fmt: skip
    scenario.steps["leftover"] = leftover
    scenario.until(
        "the leftover job to run",
        lambda: _running(scenario.cluster, workdir, "finetune") is not None,
        deadline,
    )
    scenario.start_controller("start")
    scenario.until(
        "the controller to finish", lambda: scenario.gone(scenario.controllers[0]), deadline
    )


@pytest.fixture(scope="module")
def runs(request, cluster, tmp_path_factory):
    """Start every run this module's selected tests need, all at once; {name: run}."""
    base = tmp_path_factory.mktemp("runs")
    wanted = _selected_runs(request)
    account = {"SBATCH_ACCOUNT": cluster.account}

    def demo_overlay(name, extra):
        # The data live outside the working directory, as on Lustre project space.
        return overlay(
            base / f"{name}.yaml",
            {**extra, "data": {**extra.get("data", {}), "root": str(base / "data" / name)}},
        )

    specs = {}
    # The controller as a Slurm job, cancelled and started again (the longest run: starts
    # first) ...
    specs["controller"] = dict(
        script=_cancel_and_restart, env=account, timeout=900,
        args=[
            "-s", REPO / "Snakefile", *STATUS_CHECKS, *STAGE_TARGETS,
            "--configfile", DEMO, demo_overlay("controller", LONG_FINETUNE),
        ],
    )  # fmt: skip
    # ... and what the next `start` cleans up when a controller could not.
    specs["leftovers"] = dict(
        script=_clean_up_after_a_dead_controller, env=account, timeout=300,
        args=[
            "-s", REPO / "Snakefile", *STATUS_CHECKS, "-n",
            "--configfile", DEMO, demo_overlay("leftovers", FAST),
        ],
    )  # fmt: skip
    # The fine tune on gpu-preempt, preempted by a job of a higher-priority partition.
    specs["preempted"] = dict(
        profile=PROFILE, env={**account, "EXPANSE_GPU_PARTITION": "gpu-preempt"}, timeout=600,
        args=[FINETUNE_HISTORY, "--configfile", DEMO, demo_overlay("preempted", LONG_FINETUNE)],
        thread=_preempt_finetune,
    )  # fmt: skip
    # e: the fine-tuning stopped from outside mid-run.
    specs["signalled"] = dict(
        profile=PROFILE, env=account, timeout=600,
        args=[
            "results/baseline/finetune/model.pt",
            "--configfile", DEMO, demo_overlay("signalled", LONG_FINETUNE),
        ],
        interrupt=dict(rule="finetune", scancel=["--signal=USR1"], ready=_has_resume_file),
    )  # fmt: skip
    # e': a job cancelled with plain scancel, while Snakemake is not looking, until
    # slurmctld has forgotten the job.
    specs["cancelled"] = dict(
        profile=PROFILE, env=account, timeout=300,
        args=["results/data/counts.tsv", "--configfile", DEMO, demo_overlay("cancelled", FAST)],
        thread=lambda cluster, run, deadline: _cancel_unwatched(
            cluster, run, "verify_dataset", deadline
        ),
    )  # fmt: skip
    # a: every stage its own job; a sweep of two experiments, as job arrays.
    specs["stages"] = dict(
        profile=PROFILE, env=account, timeout=600,
        args=[*STAGE_TARGETS, "--configfile", DEMO, demo_overlay("stages", SWEEP)],
    )  # fmt: skip
    # b: the GPU stages in one allocation; never interrupted, it is the fine tune that the
    # interrupted runs of the same config (LONG_FINETUNE) must reproduce.
    specs["one_job"] = dict(
        profile=ONE_JOB, env=account, timeout=600,
        args=[*STAGE_TARGETS, "--configfile", DEMO, demo_overlay("one_job", LONG_FINETUNE)],
    )  # fmt: skip
    # c: user data with a truncated JPEG: verify_dataset fails inside its Slurm job.
    if "failing" in wanted:
        counts = FAST["data"]["expected_counts"]
        root = write_images(base / "data" / "failing", counts, size=32, seed=3)
        broken = sorted((root / "train" / "circles").glob("*.jpg"))[0]
        broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
        failing = overlay(
            base / "failing.yaml",
            {"data": {"root": str(root), "source": None, "expected_counts": counts}},
        )
        specs["failing"] = dict(
            profile=PROFILE, env=account, timeout=300,
            args=["results/data/counts.tsv", "--configfile", failing],
        )  # fmt: skip
        specs["failing"]["broken"] = broken
    # d: an account Slurm does not know.
    specs["bad_account"] = dict(
        profile=PROFILE, env={"SBATCH_ACCOUNT": "nosuchacct"}, timeout=180,
        args=["--configfile", DEMO, demo_overlay("bad_account", FAST)],
    )  # fmt: skip

    started: dict = {}
    threads = []
    try:
        for name, spec in specs.items():
            if name not in wanted:
                continue
            if "script" in spec:
                started[name] = ControllerScenario(
                    name=name,
                    workdir=base / name,
                    cluster=cluster,
                    env=cluster.env(**spec["env"]),
                    args=spec["args"],
                    timeout=spec["timeout"],
                    script=spec["script"],
                ).start()
                continue
            run = Run(
                name=name,
                workdir=base / name,
                args=["--profile", spec["profile"], *STATUS_CHECKS, *spec["args"]],
                env=cluster.env(**spec["env"]),
                timeout=spec["timeout"],
            )
            run.extra.update({k: v for k, v in spec.items() if k == "broken"})
            started[name] = run.start()
            deadline = time.monotonic() + spec["timeout"]
            if "interrupt" in spec:
                thread = threading.Thread(
                    target=_interrupt_job,
                    args=(cluster, run),
                    kwargs={**spec["interrupt"], "deadline": deadline},
                    daemon=True,
                )
            elif "thread" in spec:
                thread = threading.Thread(
                    target=spec["thread"], args=(cluster, run, deadline), daemon=True
                )
            else:
                continue
            thread.start()
            threads.append(thread)
        yield started
    finally:
        for run in started.values():
            run.kill()
        for thread in threads:
            thread.join(timeout=30)


@pytest.fixture
def run_stages(runs):
    return runs["stages"].wait()


@pytest.fixture
def run_one_job(runs):
    return runs["one_job"].wait()


@pytest.fixture
def run_failing(runs):
    return runs["failing"].wait()


@pytest.fixture
def run_bad_account(runs):
    return runs["bad_account"].wait()


@pytest.fixture
def run_signalled(runs):
    return runs["signalled"].wait()


@pytest.fixture
def run_cancelled(runs):
    return runs["cancelled"].wait()


@pytest.fixture
def run_preempted(runs):
    return runs["preempted"].wait()


@pytest.fixture
def run_controller(runs):
    return runs["controller"].wait()


@pytest.fixture
def run_leftovers(runs):
    return runs["leftovers"].wait()


# ---- a. every stage its own job; a sweep as job arrays -----------------------------------


def test_each_stage_is_its_own_slurm_job(cluster, run_stages):
    run = run_stages
    assert_run_ok(run)
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)
    jobs_by_rule = by_rule(rows)
    counts = {rule: len(found) for rule, found in jobs_by_rule.items()}
    assert counts == {
        "verify_dataset": 1, "extract_features": 2, "train_head": 2,
        "finetune": 2, "evaluate": 4, "summarize": 1,
    }, report  # fmt: skip

    # Everything Slurm ran for this run (by the run's job name) is what the plugin
    # reported: the login-node rules never became Slurm jobs.
    named = cluster.jobs_named(run.run_id, run.started_at, expect=len(rows))
    assert {r["JobID"] for r in named} == set(rows), report
    assert not {r["Comment"] for r in named} & {f"rule_{rule}" for rule in LOCAL_RULES}
    assert "localrule make_demo_data:" in run.output

    profile = load_profile(PROFILE)
    for rule, found in jobs_by_rule.items():
        for row in found:
            allocated = tres(row)
            what = f"{rule} job {row['JobID']}: {row}"
            assert row["State"] == "COMPLETED", what
            assert row["Account"] == cluster.account, what
            assert row["JobName"] == run.run_id, what
            assert row["Constraints"] == "lustre", what
            assert row["Timelimit"] == minutes_to_timelimit(runtime(profile, rule)), what
            if rule in GPU_RULES:
                assert row["Partition"] == "gpu-shared", what
                assert allocated.get("gres/gpu") == "1", what
                assert allocated["cpu"] == "10", what
                # Exactly one GPU's share, array tasks included (no memory "fudge").
                assert allocated["mem"] == "92G", what
            else:
                assert row["Partition"] == "shared", what
                assert "gres/gpu" not in allocated, what
                # Expanse's shared partition: 2 GB per core, so nothing is wasted (array
                # tasks included: no memory "fudge"). The demo's inputs are small, so a
                # memory that follows the input size is its minimum here.
                allocated_mb = int(allocated["mem"].removesuffix("M"))
                if rule not in MEMORY_BY_INPUT:
                    assert allocated_mb == profile_resource(profile, rule, "mem_mb"), what
                assert int(allocated["cpu"]) * 2000 == allocated_mb, what

    assert_outputs(run.workdir, STAGE_OUTPUTS)
    assert_outputs(
        run.workdir,
        [
            f"results/features/{key}/{split}.pt"
            for key in _feature_keys(run)
            for split in ("train", "val")
        ],
    )
    # Slurm's log of every job is kept under logs/slurm/, one file per job id.
    slurm_logs = {p.stem: p for p in (run.workdir / "logs" / "slurm").rglob("*.log")}
    assert set(slurm_logs) == set(rows), report
    for job_id, row in rows.items():
        rule = rule_of(row["Comment"])
        assert slurm_logs[job_id].is_relative_to(run.workdir / "logs" / "slurm" / f"rule_{rule}")
        assert f"Finished jobid: 0 (Rule: {rule})" in slurm_logs[job_id].read_text()


def test_a_sweep_goes_to_slurm_as_job_arrays(cluster, run_stages):
    """Jobs of one rule that are ready together are one sbatch call, a job array whose
    tasks sacct lists as <jobid>_<task>: the two feature extractions, and the two
    experiments' heads. Fewer submissions than jobs, every experiment's outputs there."""
    run = run_stages
    assert_run_ok(run)
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)
    arrays: dict[str, list[str]] = {}
    for job_id in rows:
        if "_" in job_id:
            array, task = job_id.split("_")
            arrays.setdefault(array, []).append(task)
    array_rules = {}
    for array, tasks in arrays.items():
        assert sorted(tasks, key=int) == [str(t) for t in range(1, len(tasks) + 1)], report
        (rule,) = {rule_of(rows[f"{array}_{task}"]["Comment"]) for task in tasks}
        array_rules[rule] = len(tasks)
    assert array_rules.get("extract_features") == 2, report
    assert array_rules.get("train_head") == 2, report
    submissions = len({job_id.split("_")[0] for job_id in rows})
    assert submissions < len(rows), report
    assert run.output.count("Submitted array job with Snakemake IDs") == len(arrays)
    for experiment in SWEEP_EXPERIMENTS:
        assert_outputs(
            run.workdir,
            [
                f"results/{experiment}/head/model.pt",
                f"results/{experiment}/finetune/model.pt",
                f"results/{experiment}/eval/finetune/metrics.tsv",
            ],
        )
    summary = (run.workdir / "results" / "summary.tsv").read_text()
    assert all(experiment in summary for experiment in SWEEP_EXPERIMENTS), summary


def _feature_keys(run: Run) -> list[str]:
    return sorted(p.name for p in (run.workdir / "results" / "features").iterdir())


# ---- b. one allocation ---------------------------------------------------------------------


def test_one_allocation_runs_the_gpu_stages_in_one_job_with_one_gpu(cluster, run_one_job):
    run = run_one_job
    assert_run_ok(run)
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)
    groups = [r for r in rows.values() if r["Comment"].startswith("rule_gpu_stages")]
    assert len(groups) == 1, report
    (group,) = groups
    others = sorted(rule_of(r["Comment"]) for r in rows.values() if r is not group)
    assert others == ["summarize", "verify_dataset"], report

    allocated = tres(group)
    assert group["State"] == "COMPLETED", report
    assert group["Partition"] == "gpu-shared", report
    assert (allocated.get("gres/gpu"), allocated["cpu"], allocated["mem"]) == ("1", "10", "92G"), (
        report
    )
    assert group["Constraints"] == "lustre", report
    # The stages run one after the other, so the time limit is the sum of theirs.
    profile = load_profile(ONE_JOB)
    stage_jobs = {"extract_features": 2, "train_head": 1, "finetune": 1, "evaluate": 2}
    minutes = sum(runtime(profile, rule) * n for rule, n in stage_jobs.items())
    assert group["Timelimit"] == minutes_to_timelimit(minutes), report
    # ... each as a job step of that one allocation.
    steps = [s for s in cluster.steps(group["JobID"]) if s["JobID"].split(".")[1].isdigit()]
    assert len(steps) == sum(stage_jobs.values()), steps
    assert all(s["State"] == "COMPLETED" for s in steps), steps

    assert_outputs(run.workdir, STAGE_OUTPUTS)
    group_logs = list((run.workdir / "logs" / "slurm").glob("group_gpu_stages*/*.log"))
    assert [p.stem for p in group_logs] == [group["JobID"]]


# ---- c. a stage that fails ---------------------------------------------------------------


def test_failing_stage_names_rule_and_slurm_log(cluster, run_failing):
    run = run_failing
    assert run.returncode not in (0, *TIMED_OUT), run_report(run)
    output = run.output
    assert "Error in rule verify_dataset:" in output, run_report(run)
    # The error names the rule's log and the job's Slurm log; both exist and say why.
    slurm_logs = sorted(set(re.findall(r"(/\S+/logs/slurm/rule_verify_dataset/\d+\.log)", output)))
    assert slurm_logs, run_report(run)
    for path in map(Path, slurm_logs):
        assert path.is_file(), path
        text = path.read_text()
        assert "Error in rule verify_dataset:" in text, text
        assert "(command exited with non-zero exit code)" in text, text
    rule_log = (run.workdir / "logs" / "verify_dataset.log").read_text()
    broken = run.extra["broken"]
    assert "truncated image" in rule_log and broken.name in rule_log, rule_log

    # Slurm's view: the job failed twice (retries: 1), the retry with twice the time.
    rows = cluster.sacct(run.job_ids)
    assert [r["State"] for r in rows.values()] == ["FAILED", "FAILED"], run_report(run, rows)
    profile = load_profile(PROFILE)
    assert [r["Timelimit"] for r in rows.values()] == [
        minutes_to_timelimit(runtime(profile, "verify_dataset", attempt)) for attempt in (1, 2)
    ]
    assert not (run.workdir / "results" / "data" / "counts.tsv").exists()


# ---- d. an account Slurm does not know -----------------------------------------------------


def test_unknown_account_fails_before_any_submission(cluster, run_bad_account):
    run = run_bad_account
    assert run.returncode not in (0, *TIMED_OUT), run_report(run)
    assert "The given account nosuchacct appears to be invalid" in run.output, run_report(run)
    assert cluster.account in run.output  # "Available accounts: ..."
    assert run.job_ids == []
    assert run.run_id
    assert cluster.jobs_named(run.run_id, run.started_at) == []
    assert not list((run.workdir / "logs" / "slurm").rglob("*.log"))
    assert run.seconds < 120


# ---- e. a job stopped from outside ----------------------------------------------------------


def test_signalled_finetune_is_retried_and_resumes(cluster, run_signalled):
    """`scancel --signal=USR1` on the running finetune job: the signal the profile's
    `--signal=USR1@300` sends before the time limit, delivered the same way (to every
    process of the job's steps, not the batch shell). The training stops after the batch,
    keeps its resume file and exits non-zero; Snakemake reports the failed job with its
    Slurm log, submits it again with twice the time, and the retry resumes."""
    run = run_signalled
    assert "interrupt_error" not in run.extra, run.extra["interrupt_error"] + run_report(run)
    interrupted = run.extra["interrupted"]
    assert_run_ok(run)
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)

    # The signal reached the training process, which saved and stopped.
    first_log = interrupted.get("log", "")
    assert "received SIGUSR1: stopping after this batch" in first_log, first_log
    assert "stopped by signal SIGUSR1; state saved" in first_log, first_log

    # Snakemake reports the failure with the job's Slurm log, then submits it once more.
    job = interrupted["job"]
    assert f"SLURM-job '{job}' failed, SLURM status is: 'FAILED'" in run.output, report
    slurm_log = run.workdir / "logs" / "slurm" / "rule_finetune" / "baseline" / f"{job}.log"
    assert str(slurm_log) in run.output, report
    assert "Error in rule finetune:" in slurm_log.read_text()
    assert "Trying to restart job" in run.output, report

    finetunes = by_rule(rows)["finetune"]
    profile = load_profile(PROFILE)
    assert [(r["JobID"], r["State"]) for r in finetunes] == [
        (job, "FAILED"),
        (finetunes[-1]["JobID"], "COMPLETED"),
    ], report
    # The retry had twice the time (runtime = 60 * attempt) ...
    assert [r["Timelimit"] for r in finetunes] == [
        minutes_to_timelimit(runtime(profile, "finetune", attempt)) for attempt in (1, 2)
    ]
    # ... and continued from the resume file instead of starting over.
    log = (run.workdir / "logs" / "finetune" / "baseline.log").read_text()
    resumed = re.search(
        r"finetune: resuming after epoch (\d+) from results/\.resume/baseline/finetune\.pt", log
    )
    assert resumed, log
    epoch = int(resumed.group(1))
    assert epoch >= max(1, interrupted["epochs_done"]), (interrupted, log)
    assert f"finetune epoch {epoch}/" not in log, log  # not trained again
    assert f"finetune epoch {epoch + 1}/" in log, log
    assert_outputs(
        run.workdir, ["results/baseline/finetune/model.pt", "results/baseline/finetune/history.tsv"]
    )
    history = (run.workdir / "results" / "baseline" / "finetune" / "history.tsv").read_text()
    assert len(history.strip().splitlines()) == 1 + LONG_FINETUNE["finetune"]["epochs"], history
    assert not _has_resume_file(run)


def _assert_cancelled_and_retried(cluster: Cluster, run: Run) -> str:
    """The run's verify_dataset job, cancelled with plain scancel, was reported as failed
    with its Slurm log and retried (retries: 1), and the run finished; its job id."""
    assert "interrupt_error" not in run.extra, run.extra["interrupt_error"] + run_report(run)
    job = run.extra["interrupted"]["job"]
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)
    assert rows[job]["State"].startswith("CANCELLED by "), report
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in run.output, report
    slurm_log = run.workdir / "logs" / "slurm" / "rule_verify_dataset" / f"{job}.log"
    assert str(slurm_log) in run.output, report
    assert "Trying to restart job" in run.output, report
    assert_run_ok(run)
    verify = [(r["JobID"], r["State"].split()[0]) for r in by_rule(rows)["verify_dataset"]]
    assert verify == [(job, "CANCELLED"), (verify[-1][0], "COMPLETED")], report
    assert_outputs(run.workdir, ["results/data/counts.tsv"])
    return job


def test_cancelled_job_is_reported_and_retried(cluster, run_cancelled):
    """Plain `scancel` (as an administrator, or you, would): Slurm records the job as
    'CANCELLED by <uid>', which the profile makes the plugin read as CANCELLED: the run
    reports the failed job with its logs and the retry runs it again; no hang."""
    _assert_cancelled_and_retried(cluster, run_cancelled)


def test_cancelled_job_is_noticed_after_slurm_forgot_it(cluster, run_cancelled):
    """The job was cancelled while Snakemake was not looking (stopped), which went on
    only once slurmctld had dropped the job (MinJobAge): squeue no longer knew it, sacct
    (the profile's status command) did, so the run still reported and retried it."""
    run = run_cancelled
    job = _assert_cancelled_and_retried(cluster, run)
    assert run.extra["interrupted"]["unlisted_after"] > 0
    assert cluster.run("squeue", "-h", "-t", "all", "-j", job, check=False) == ""


# ---- f. preemption ---------------------------------------------------------------------------


def test_preempted_finetune_is_requeued_and_resumes_with_the_same_history(
    cluster, run_preempted, run_one_job
):
    """EXPANSE_GPU_PARTITION=gpu-preempt: the GPU stages run on gpu-preempt, and a job of
    a higher-priority partition preempts the running fine tune. Slurm requeues it under
    the same job id (the profile submits with --requeue), Snakemake keeps waiting (no
    failure, no retry), the requeued job resumes after the last finished epoch, and the
    history is that of the same fine tune never interrupted (one_job's run)."""
    run = run_preempted
    assert "preempt_error" not in run.extra, run.extra["preempt_error"] + run_report(run)
    preempted = run.extra["preempted"]
    assert_run_ok(run)
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)
    for rule in ("extract_features", "finetune"):
        assert {r["Partition"] for r in by_rule(rows)[rule]} == {"gpu-preempt"}, report
    job = preempted["job"]
    assert [r["JobID"] for r in by_rule(rows)["finetune"]] == [job], report
    assert "Trying to restart job" not in run.output, report
    # Slurm's records of the job: preempted, then run again to the end, same id.
    records = cluster.run("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State")
    assert records.split() == [f"{job}|PREEMPTED", f"{job}|COMPLETED"], records

    log = (run.workdir / "logs" / "finetune" / "baseline.log").read_text()
    resumed = re.search(r"finetune: resuming after epoch (\d+)", log)
    assert resumed, log
    assert int(resumed.group(1)) >= max(1, preempted["epochs_done"] - 1), (preempted, log)
    assert_run_ok(run_one_job)
    assert history_without_times(run.workdir / FINETUNE_HISTORY) == history_without_times(
        run_one_job.workdir / FINETUNE_HISTORY
    )


# ---- g. the controller as a Slurm job ---------------------------------------------------------


def test_controller_runs_the_workflow_as_a_slurm_job_and_continues_after_it_ended(
    cluster, run_controller, run_one_job
):
    """tools/controller.py: the login-node rules ran where the tool ran, every stage job
    was submitted by a controller job while it ran; a second controller was refused;
    `cancel` made the controller cancel its stage jobs and release its lock; the next
    controller finished the run without redoing a finished stage, and the fine tune,
    resumed, has the history of one never interrupted."""
    scenario = run_controller
    assert scenario.error is None, scenario.tail()
    report = scenario.tail()
    ctl1, ctl2 = scenario.controllers
    steps = scenario.steps

    # The login-node part ran in the tool, before the controller; the tool submitted no
    # stage job itself.
    assert re.search(r"Login-node rules first, here: .*make_demo_data", steps["start 1"].stdout)
    assert "localrule make_demo_data:" in steps["start 1"].stderr, report
    for step in ("start 1", "start 2"):
        assert not submitted_job_ids(steps[step].stdout + steps[step].stderr), report
    # One controller per working directory.
    refused = steps["start while running"]
    assert refused.returncode == 1, report
    assert "already" in refused.stderr and f"Slurm job {ctl1}" in refused.stderr, refused.stderr
    assert "Login-node rules" not in refused.stdout

    # The controllers: small jobs on shared, each with its log under logs/controller/.
    controllers = cluster.sacct([ctl1, ctl2])
    for job_id, row in controllers.items():
        assert row["JobName"] == "snakemake-controller", row
        assert row["Partition"] == "shared", row
        assert (tres(row)["cpu"], tres(row)["mem"]) == ("1", "4G"), row
        assert (scenario.workdir / "logs" / "controller" / f"{job_id}.log").is_file()
    assert controllers[ctl1]["State"].startswith("CANCELLED"), report
    assert controllers[ctl2]["State"] == "COMPLETED", report

    # Every stage job was submitted by a controller, while that controller ran.
    submitted = {}
    for job_id in (ctl1, ctl2):
        log = (scenario.workdir / "logs" / "controller" / f"{job_id}.log").read_text()
        for stage_job in submitted_job_ids(log):
            submitted[stage_job] = job_id
    rows = cluster.sacct(list(submitted))
    run_ids = {
        re.search(r"SLURM run ID: (\S+)", path.read_text()).group(1)
        for path in (scenario.workdir / "logs" / "controller").glob("*.log")
    }
    named = cluster.jobs_named(",".join(sorted(run_ids)), scenario.started_at, expect=len(rows))
    assert {r["JobID"] for r in named} == set(rows), report
    for stage_job, row in rows.items():
        controller = controllers[submitted[stage_job]]
        assert controller["Start"] <= row["Submit"] <= controller["End"], (row, controller)

    # `cancel`: the controller cancelled its own stage jobs and released its lock, so
    # the next start found nothing to clean up.
    assert steps["cancel"].returncode == 0, report
    assert f"Cancelling the controller: {ctl1}" in steps["cancel"].stdout, report
    ctl1_log = (scenario.workdir / "logs" / "controller" / f"{ctl1}.log").read_text()
    assert "Terminating processes on user request" in ctl1_log, report
    assert "left behind" not in steps["start 2"].stdout, report
    assert "Removing the Snakemake lock" not in steps["start 2"].stdout, report

    # Finished stages were not redone: the data, features and head by controller 1 only,
    # the fine tune interrupted and finished by controller 2.
    jobs_by_rule = by_rule(rows)
    for rule in ("verify_dataset", "extract_features", "train_head"):
        assert {(submitted[r["JobID"]], r["State"]) for r in jobs_by_rule[rule]} == {
            (ctl1, "COMPLETED")
        }, report
    finetunes = [(submitted[r["JobID"]], r["State"].split()[0]) for r in jobs_by_rule["finetune"]]
    assert finetunes == [(ctl1, "CANCELLED"), (ctl2, "COMPLETED")], report
    assert [submitted[r["JobID"]] for r in jobs_by_rule["summarize"]] == [ctl2], report
    # The head's evaluation runs beside the first fine tune: it finished then, or it was
    # cancelled with it and ran again. No job was cancelled for another reason, and none
    # ran to its end twice (array tasks share a comment: the extractions, checked above).
    assert all(r["State"].split()[0] in ("COMPLETED", "CANCELLED") for r in rows.values())
    finished = [r["Comment"] for r in rows.values() if r["State"] == "COMPLETED"]
    finished = [c for c in finished if rule_of(c) != "extract_features"]
    assert len(finished) == len(set(finished)), report
    log = (scenario.workdir / "logs" / "finetune" / "baseline.log").read_text()
    assert "finetune: resuming after epoch" in log, log
    assert_outputs(scenario.workdir, STAGE_OUTPUTS)
    assert_run_ok(run_one_job)
    assert history_without_times(scenario.workdir / FINETUNE_HISTORY) == history_without_times(
        run_one_job.workdir / FINETUNE_HISTORY
    )


def test_next_start_cleans_up_after_a_controller_that_could_not(cluster, run_leftovers):
    """A controller whose node failed leaves a running stage job and Snakemake's lock:
    `start` cancels the job, removes the lock, and submits the controller, whose
    Snakemake (here a dry run, `-n`) then reads the workflow with the profile."""
    scenario = run_leftovers
    assert scenario.error is None, scenario.tail()
    report = scenario.tail()
    leftover = scenario.steps["leftover"]
    start = scenario.steps["start"]
    assert f"Cancelling stage jobs left behind by a controller that ended: {leftover}" in (
        start.stdout
    ), report
    assert "Removing the Snakemake lock" in start.stdout, report
    assert not list((scenario.workdir / ".snakemake" / "locks").glob("*.lock")), report
    assert cluster.sacct([leftover])[leftover]["State"].startswith("CANCELLED"), report
    (controller,) = scenario.controllers
    assert cluster.sacct([controller])[controller]["State"] == "COMPLETED", report
    log = (scenario.workdir / "logs" / "controller" / f"{controller}.log").read_text()
    assert "This was a dry-run" in log, report
    assert "rule verify_dataset:" in log, report


# ---- f. one experiment's evaluation on two nodes ---------------------------------------------


def _two_node_profile(folder: Path) -> Path:
    """profiles/expanse with README's multi-node recipe for `evaluate`, shrunk to the test
    cluster's second node: 2 nodes, one GPU and one process each, the rule in the batch
    script (`mpi`) so that launch.py's srun can start a torchrun on each node."""
    shutil.copytree(PROFILE, folder)
    config_file = folder / "config.v8+.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["set-resources"]["evaluate"].update(
        slurm_partition="'multinode'", nodes=2, gpu=2, mpi="'srun'", tasks=2,
        cpus_per_task=1, mem_mb=2000,
    )  # fmt: skip
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def test_evaluation_on_two_nodes_gives_the_one_process_results(cluster, run_stages, tmp_path):
    """One Slurm job on two nodes: launch.py's srun starts a torchrun on each, they meet
    (c10d) on the first node, and the two processes' metrics and predictions are those of
    the one-GPU job of the same run."""
    assert_run_ok(run_stages)
    workdir = copy_workdir(run_stages.workdir, tmp_path / "work")
    configs = run_stages.args[run_stages.args.index("--configfile") :]
    evaluation = "results/baseline/eval/head"
    run = Run(
        name="two_nodes",
        workdir=workdir,
        args=[
            "--profile", _two_node_profile(tmp_path / "profile"), *STATUS_CHECKS,
            f"{evaluation}/metrics.tsv", "--forcerun", "evaluate",
            "--rerun-triggers", "mtime", "input", *configs,
        ],
        env=cluster.env(SBATCH_ACCOUNT=cluster.account),
        timeout=300,
    ).start().wait()  # fmt: skip
    assert_run_ok(run)
    (job,) = run.job_ids
    row = cluster.sacct([job])[job]
    assert row["State"] == "COMPLETED", run_report(run)
    assert row["Partition"] == "multinode" and tres(row)["node"] == "2", row
    # The torchrun step: one task on each node, one GPU each.
    (step,) = [s for s in cluster.steps(job) if s["JobID"] == f"{job}.0"]
    assert "node=2" in step["AllocTRES"] and "gres/gpu=2" in step["AllocTRES"], step
    log = (workdir / "logs" / "evaluate" / "baseline" / "head.log").read_text()
    assert "2 processes (1 on this node), backend gloo" in log, log
    for name in ("metrics", "predictions", "confusion"):
        one = (run_stages.workdir / evaluation / f"{name}.tsv").read_text()
        assert (workdir / evaluation / f"{name}.tsv").read_text() == one, name
