"""The Expanse profiles on a real Slurm cluster, checked against Slurm's own records.

The cluster is tests/cluster: one node shaped like an Expanse GPU node (40 cores, 384 GB,
4 fake GPUs, feature lustre), Expanse's partition names, accounting through slurmdbd that
rejects unknown accounts. A private instance (own state dir, own free ports) starts once
for this module and stops at its end. Without Slurm, or not as root, the module's cluster
tests are skipped; in CI (CI=true) they fail instead.

Every run is the real command line: `snakemake --profile profiles/expanse[-one-job]` with
only the account (SBATCH_ACCOUNT), the data (a config overlay: smaller demo data, fewer
epochs, data root outside the working directory) and the status-check intervals set here;
no resource is overridden. Each run is bounded by `timeout -k 10`. The cluster runs start
together at the beginning (fixture `runs`) and each test waits for its own: a Slurm job
costs two Snakemake start-ups plus the plugin's growing status-check interval, so one after
the other they would take three times as long.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, jobs, overlay, snakemake, tail, write_images
from slurm_helpers import (
    Cluster,
    Run,
    clean_env,
    minutes_to_timelimit,
    missing_requirements,
    tres,
)

PROFILE = REPO / "profiles" / "expanse"
ONE_JOB = REPO / "profiles" / "expanse-one-job"
DEMO = REPO / "config" / "demo.yaml"
# The only settings the tests add on the command line: short status-check intervals.
STATUS_CHECKS = [
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1",
]  # fmt: skip

GPU_RULES = ("extract_features", "finetune", "evaluate")
CPU_RULES = (
    "verify_dataset", "train_head", "summarize", "plot_experiment", "plot_stage", "plot_summary",
)  # fmt: skip
LOCAL_RULES = ("make_demo_data", "fetch_data", "fetch_weights")
TRAINING_RULES = ("train_head", "finetune")
GROUPED_RULES = ("extract_features", "train_head", "finetune", "evaluate")
ONE_ALLOCATION_KEYS = ("groups", "group-components", "resources", "set-resource-scopes")
SIGNAL = "--signal=USR1@300"
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


# ---- the profiles as data ----------------------------------------------------------------


def load_profile(path: Path) -> dict:
    """The profile's YAML (yte's `?` keys and values stay text)."""
    return yaml.safe_load((path / "config.v8+.yaml").read_text())


def profile_resource(profile: dict, rule: str, name: str):
    return profile["set-resources"][rule][name]


def runtime(profile: dict, rule: str, attempt: int = 1) -> int:
    """The rule's runtime in minutes for that attempt, as Snakemake evaluates it."""
    return eval(str(profile_resource(profile, rule, "runtime")), {"attempt": attempt})


def rule_of(comment: str, rules) -> str | None:
    """The rule of a Slurm job from the plugin's comment rule_<rule>[_wildcards_<...>]."""
    for rule in sorted(rules, key=len, reverse=True):
        if comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_"):
            return rule
    return None


ALL_RULES = (*GPU_RULES, *CPU_RULES, *LOCAL_RULES)


def by_rule(rows: dict[str, dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in rows.values():
        found.setdefault(rule_of(row["Comment"], ALL_RULES) or row["Comment"], []).append(row)
    return found


def run_report(run: Run, rows=None) -> str:
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


# ---- profile checks that need no cluster ---------------------------------------------------


def test_one_job_profile_is_the_per_stage_profile_plus_groups():
    """expanse-one-job = expanse + the job-group keys + what a group needs: one partition
    and one slurm_extra for all its members. Nothing else may drift apart."""
    stages, one_job = load_profile(PROFILE), load_profile(ONE_JOB)
    expected = copy.deepcopy(stages)
    for rule in GROUPED_RULES:
        expected["set-resources"][rule]["slurm_partition"] = "'gpu-shared'"
        expected["set-resources"][rule]["slurm_extra"] = f"'{SIGNAL}'"
    for key in ONE_ALLOCATION_KEYS:
        expected[key] = one_job[key]
    definitions = [
        d.replace("profiles/expanse-one-job:", "profiles/expanse:")
        for d in one_job["__definitions__"]
    ]
    assert {**one_job, "__definitions__": definitions} == expected
    assert one_job["groups"] == dict.fromkeys(GROUPED_RULES, "gpu_stages")
    assert one_job["resources"] == {"gpu": 1}
    assert one_job["set-resource-scopes"] == {"gpu": "local"}


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
        assert int(resources["runtime"]) == runtime(profile, rule), rule
        assert int(resources["mem_mb"]) == profile_resource(profile, rule, "mem_mb"), rule
        assert (resources.get("slurm_extra") == SIGNAL) == (rule in TRAINING_RULES), rule
        if rule in GPU_RULES:
            assert resources["slurm_partition"] == "gpu-shared", rule
            assert (resources["gpu"], resources["cpus_per_task"]) == ("1", "10"), rule
            assert resources["mem_mb"] == str(92 * 1024), rule
        else:
            assert resources["slurm_partition"] == "shared", rule
            assert "gpu" not in resources, rule
    assert seen >= {*GPU_RULES, *CPU_RULES, "make_demo_data"}, seen


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


def _interrupt_job(
    cluster: Cluster, run: Run, rule: str, scancel: list[str], deadline: float, ready=None
) -> None:
    """`scancel <scancel args> <job>` on the run's job of `rule` once it is RUNNING (and
    `ready(run)` is true): a job stopped from outside. Records what it did in run.extra
    ("interrupted", or "interrupt_error"); for finetune also the log of that attempt,
    which the retry overwrites."""
    workdir = str(run.workdir.resolve())
    try:
        while time.monotonic() < deadline and run.proc.poll() is None:
            out = cluster.run("squeue", "-h", "-o", "%A|%k|%T|%Z", check=False)
            for line in out.splitlines():
                job_id, comment, state, jobdir = line.split("|", 3)
                if (
                    rule_of(comment, ALL_RULES) == rule
                    and state == "RUNNING"
                    and str(Path(jobdir).resolve()) == workdir
                    and (ready is None or ready(run))
                ):
                    log = run.workdir / "logs" / rule / "baseline.log"
                    epochs = len(re.findall(r"epoch \d+/", log.read_text())) if log.is_file() else 0
                    cluster.run("scancel", *scancel, job_id)
                    run.extra["interrupted"] = {"job": job_id, "epochs_done": epochs}
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


def _has_resume_file(run: Run) -> bool:
    """finetune has finished at least one epoch: there is a state to resume from."""
    return (run.workdir / "results" / ".resume" / "baseline" / "finetune.pt").is_file()


@pytest.fixture(scope="module")
def runs(request, cluster, tmp_path_factory):
    """Start every run this module's selected tests need, all at once; {name: Run}."""
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
    # e: the fine-tuning stopped from outside mid-run (the longest run: starts first).
    specs["signalled"] = dict(
        profile=PROFILE, env=account, timeout=600,
        args=[
            "results/baseline/finetune/model.pt",
            "--configfile", DEMO, demo_overlay("signalled", LONG_FINETUNE),
        ],
        interrupt=dict(rule="finetune", scancel=["--signal=USR1"], ready=_has_resume_file),
    )  # fmt: skip
    # e': a job cancelled with plain scancel; short, its run ends at its timeout if the
    # plugin never notices (see the test).
    specs["cancelled"] = dict(
        profile=PROFILE, env=account, timeout=240,
        args=["results/data/counts.tsv", "--configfile", DEMO, demo_overlay("cancelled", FAST)],
        interrupt=dict(rule="verify_dataset", scancel=[]),
    )  # fmt: skip
    # a: every stage its own job.
    specs["stages"] = dict(
        profile=PROFILE, env=account, timeout=600,
        args=[*STAGE_TARGETS, "--configfile", DEMO, demo_overlay("stages", FAST)],
    )  # fmt: skip
    # b: the GPU stages in one allocation.
    specs["one_job"] = dict(
        profile=ONE_JOB, env=account, timeout=600,
        args=[*STAGE_TARGETS, "--configfile", DEMO, demo_overlay("one_job", FAST)],
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

    started: dict[str, Run] = {}
    threads = []
    try:
        for name, spec in specs.items():
            if name not in wanted:
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
            if "interrupt" in spec:
                thread = threading.Thread(
                    target=_interrupt_job,
                    args=(cluster, run),
                    kwargs={**spec["interrupt"], "deadline": time.monotonic() + spec["timeout"]},
                    daemon=True,
                )
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


# ---- a. every stage its own job ------------------------------------------------------------


def test_each_stage_is_its_own_slurm_job(cluster, run_stages):
    run = run_stages
    assert_run_ok(run)
    rows = cluster.sacct(run.job_ids)
    report = run_report(run, rows)
    jobs_by_rule = by_rule(rows)
    counts = {rule: len(found) for rule, found in jobs_by_rule.items()}
    assert counts == {
        "verify_dataset": 1, "extract_features": 2, "train_head": 1,
        "finetune": 1, "evaluate": 2, "summarize": 1,
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
                assert allocated["mem"] == "92G", what
            else:
                assert row["Partition"] == "shared", what
                assert "gres/gpu" not in allocated, what
                # Expanse's shared partition: 2 GB per core, so nothing is wasted.
                mem_mb = profile_resource(profile, rule, "mem_mb")
                assert allocated["mem"] == f"{mem_mb}M", what
                assert int(allocated["cpu"]) * 2000 == mem_mb, what

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
        rule = rule_of(row["Comment"], ALL_RULES)
        assert slurm_logs[job_id].is_relative_to(run.workdir / "logs" / "slurm" / f"rule_{rule}")
        assert f"Finished jobid: 0 (Rule: {rule})" in slurm_logs[job_id].read_text()


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
    others = sorted(rule_of(r["Comment"], ALL_RULES) for r in rows.values() if r is not group)
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


# What snakemake-executor-plugin-slurm 2.8.0 does with a job cancelled by plain scancel.
PLUGIN_CANCELLED_BUG = (
    "snakemake-executor-plugin-slurm 2.8.0 compares sacct's State with 'CANCELLED', but "
    "sacct reports a cancelled job as 'CANCELLED by <uid>', so the plugin keeps it as "
    "running and Snakemake waits for ever (here: until the run's timeout)"
)


def test_cancelled_job_is_reported_and_retried(cluster, run_cancelled):
    """Plain `scancel` (as an administrator, or you, would): Slurm records the job as
    'CANCELLED by <uid>'. Snakemake should report it and retry it (retries: 1). Expected
    to fail (xfail) with the plugin version pinned here, for exactly that reason only."""
    run = run_cancelled
    assert "interrupt_error" not in run.extra, run.extra["interrupt_error"] + run_report(run)
    job = run.extra["interrupted"]["job"]
    rows = cluster.sacct([job])
    assert rows[job]["State"].startswith("CANCELLED by "), rows
    reported = f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED" in run.output
    if run.returncode in TIMED_OUT and not reported:
        pytest.xfail(PLUGIN_CANCELLED_BUG)
    assert reported, run_report(run)
    assert "Trying to restart job" in run.output, run_report(run)
    assert_run_ok(run)
