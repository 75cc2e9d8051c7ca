"""Lint, formatting and rule declarations, checked without running a stage: `snakemake
--lint`, `snakefmt --check`, every rule's log/benchmark/threads/resources, no site settings
in the rules, and a dry run through the Expanse profile."""

from __future__ import annotations

import re
import subprocess

from helpers import GPU_RULES, REPO, VENV_BIN, assert_ok, job_stats, snake_env, snakemake, tail

STAGE_RULES = {
    "verify_dataset",
    "extract_features",
    "train_head",
    "finetune",
    "evaluate",
    "summarize",
}

PROFILE = REPO / "profiles" / "expanse"


def test_expanse_profile_dry_run_lists_every_stage(tmp_path):
    proc = snakemake(
        tmp_path / "work",
        "-n",
        "--profile",
        PROFILE,
        cores=None,
        env=snake_env(SBATCH_ACCOUNT="dummy"),
        timeout=180,
    )
    assert_ok(proc, "dry run with the expanse profile")
    stats = job_stats(proc.stdout)
    assert STAGE_RULES <= set(stats), stats
    assert stats["extract_features"] == 2 and stats["evaluate"] == 2
    # The course config uses pretrained weights: fetched once, on the login node.
    assert stats.get("fetch_weights") == 1


def test_snakemake_lint_passes(tmp_path):
    proc = snakemake(
        tmp_path / "work",
        "--lint",
        "--configfile",
        REPO / "config" / "demo.yaml",
        cores=None,
        timeout=180,
    )
    assert proc.returncode == 0, tail(proc.stdout, 200)


def test_snakefmt_check_passes():
    snakefmt = VENV_BIN / "snakefmt"
    proc = subprocess.run(
        ["timeout", "-k", "10", "120", str(snakefmt), "--check", "Snakefile", "rules"],
        cwd=REPO,
        env=snake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]


def _rule_blocks():
    blocks = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        text = path.read_text()
        starts = list(re.finditer(r"^[ \t]*rule (\w+):", text, re.M))
        if not starts:  # helpers only (common.smk)
            continue
        for match, following in zip(starts, starts[1:] + [None], strict=True):
            end = following.start() if following else len(text)
            blocks[match.group(1)] = (path.name, text[match.start() : end])
    return blocks


def test_every_rule_declares_log_benchmark_threads_resources(tmp_path):
    blocks = _rule_blocks()
    listed = snakemake(
        tmp_path / "work", "--list-rules", "--configfile", REPO / "config" / "demo.yaml", cores=None
    )
    assert_ok(listed, "--list-rules")
    names = set(re.findall(r"^(\w+)$", listed.stdout, re.M)) - {"all"}
    assert names and names <= set(blocks), names - set(blocks)
    for name, (file, block) in blocks.items():
        for directive in ("log:", "benchmark:", "threads:", "resources:"):
            assert re.search(rf"^\s+{directive}", block, re.M), (
                f"{file}: rule {name} lacks {directive}"
            )
        gpu = re.search(r"^\s+gpu\s*=\s*1\s*,?\s*$", block, re.M)
        assert bool(gpu) == (name in GPU_RULES), f"{file}: rule {name} gpu declaration"


def test_no_site_settings_in_rules():
    """Partitions, accounts, QOS and node constraints belong to the profile, not the rules."""
    pattern = re.compile(
        r"(?<![\w-])(slurm_partition|slurm_account|partition|account|qos|constraint|"
        r"gpu-shared|gpu-debug|sbatch|--gres|--gpus)(?![\w-])",
        re.I,
    )
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not pattern.search(code), f"{path.name}:{number}: {line.strip()}"
