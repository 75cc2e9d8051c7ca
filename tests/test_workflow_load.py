"""Loading the workflow: it needs no PyTorch, and a 500-experiment grid gives the right DAG.

Every Snakemake start parses the workflow, the Snakemake inside every Slurm job too, so
parsing must not import torch or torchvision (seconds each time): here they are replaced by
packages whose import fails, and a real dry run of a 25 x 20 grid (501 experiments with the
baseline) must still plan every job, each with its own settings. Also the two shortcuts
that keep loading fast: experiments checked once per distinct section value, and imports
read without `ast`. Timings are not asserted here; tools/benchmark.py measures them.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, SCRIPTS, assert_ok, job_stats, overlay, snake_env, snakemake
from transfer_learning import settings, sources

SEEDS = list(range(1, 26))
LRS = [round(1e-5 * (i + 1), 6) for i in range(20)]


@pytest.fixture(scope="module")
def no_pytorch(tmp_path_factory):
    """A PYTHONPATH folder whose torch and torchvision fail to import."""
    folder = tmp_path_factory.mktemp("no_pytorch")
    for name in ("torch", "torchvision"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} imported while loading the workflow')\n"
        )
    env = snake_env(PYTHONPATH=str(folder))
    proof = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert proof.returncode != 0, "the stand-in torch package did not shadow the real one"
    return env


def _shell_commands(output: str, script: str) -> list[list[str]]:
    """The words of every printed command line running `script`, from the script on (a
    launcher may come first)."""
    found = []
    for line in output.splitlines():
        if line.startswith("Shell command: "):
            words = shlex.split(line.partition("Shell command: ")[2].partition(" > ")[0])
            if script in words:
                found.append(words[words.index(script) :])
    return found


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_500_experiment_grid_plans_every_job_without_pytorch(tmp_path, no_pytorch):
    """The whole configuration is loaded (501 experiments); the targets, every grid point's
    fine-tuned model, keep the plan to the jobs checked here (a full dry run plans the
    evaluations, plots and exports too, and takes three times as long)."""
    config = overlay(
        tmp_path / "grid.yaml",
        {"experiments": {"sweep": {"grid": {"seed": SEEDS, "finetune.lr": LRS}}}},
    )
    names = {f"sweep_seed{s}_lr{lr:g}": (s, lr) for s in SEEDS for lr in LRS}
    assert len(names) == 500
    proc = snakemake(
        tmp_path / "work",
        "-n",
        "-p",
        *(f"results/{name}/finetune/model.pt" for name in names),
        "--configfile",
        REPO / "config" / "demo.yaml",
        config,
        env=no_pytorch,
        timeout=300,
    )
    assert_ok(proc, "dry run of the grid")
    stats = job_stats(proc.stdout)
    # Random weights (the demo): the seed changes the features, so one extraction per seed.
    expected = {
        "make_demo_data": 1, "verify_dataset": 1, "extract_features": 2 * 25,
        "train_head": 500, "finetune": 500,
    }  # fmt: skip
    assert stats == expected, stats

    # Each grid point fine-tunes with its own lr and seed, on the head it trained...
    finetunes = {}
    for words in _shell_commands(proc.stdout, "finetune.py"):
        experiment = _option(words, "--output").split("/")[1]
        settings = json.loads(_option(words, "--settings"))
        finetunes[experiment] = (settings["seed"], settings["lr"])
        assert _option(words, "--head") == f"results/{experiment}/head/model.pt"
    assert finetunes == names

    # ...and its head trains on the features extracted with its seed.
    feature_seed = {}
    for words in _shell_commands(proc.stdout, "extract_features.py"):
        key = _option(words, "--output").split("/")[2]
        feature_seed[key] = json.loads(_option(words, "--settings"))["seed"]
    assert sorted(feature_seed.values()) == SEEDS
    heads = set()
    for words in _shell_commands(proc.stdout, "train_head.py"):
        experiment = _option(words, "--output").split("/")[1]
        key = re.fullmatch(
            r"results/features/([^/]+)/train\.pt", _option(words, "--train-features")
        )
        assert feature_seed[key.group(1)] == names[experiment][0], experiment
        heads.add(experiment)
    assert heads == set(names)


def test_experiments_are_checked_once_per_distinct_section_value():
    """check_experiments: what each experiment overrides, converted and checked, in place."""
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    overrides = settings.expand_experiments(
        {
            "baseline": {},
            "text": {"head": {"lr": "1e-5"}},  # YAML 1.1 reads 1e-5 as text
            "sweep": {"grid": {"finetune.lr": [1.0e-4, -1.0], "seed": [1, 2]}},
        }
    )
    experiments = settings.experiment_configs(base, overrides)
    results = settings.check_experiments(experiments, overrides, schema)
    assert results["baseline"] == ([], [])
    assert results["text"] == (["head.lr"], [])
    assert experiments["text"]["head"]["lr"] == 1e-5
    assert experiments["baseline"]["head"]["lr"] == base["head"]["lr"]
    for seed in (1, 2):
        assert results[f"sweep_lr0.0001_seed{seed}"] == ([], [])
        (error,) = results[f"sweep_lr-1_seed{seed}"][1]
        assert error.startswith("config key finetune.lr: -1.0 ")


def _ast_imports(text: str) -> set:
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            found.add((node.level, node.module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            found.update((0, alias.name, ()) for alias in node.names)
    return found


def test_code_digest_reads_imports_as_python_does():
    """sources reads imports with a regular expression (an ast parse of every module at each
    Snakemake start costs a tenth of a second): it must find every import `ast` finds."""
    tricky = (
        "from .a import (  # not b)\n    b,\n    c as d,\n)\n"
        "from transfer_learning \\\n    import e as f, g\n"
        "if x: import transfer_learning.h\n"
        "import i; from .import j\n"
        "def k():\n    from ..l import m\n"
    )
    assert sources._imports(tricky) and set(sources._imports(tricky)) == _ast_imports(tricky)
    for path in [*SCRIPTS.glob("*.py"), *(SCRIPTS / "transfer_learning").glob("*.py")]:
        text = path.read_text()
        assert _ast_imports(text) <= set(sources._imports(text)), path.name
