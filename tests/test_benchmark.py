"""tools/benchmark.py scale at a toy size: it builds its trees, runs the real programs and
prints its table. Nothing here is timed (README "Benchmark" has the figures)."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO


def test_scale_benchmark_runs_verification_at_a_toy_size(tmp_path):
    command = [
        sys.executable, str(REPO / "tools" / "benchmark.py"), "scale", "--images", "300",
        "--million", "600", "--repeats", "1", "--threads", "2", "--figures", "verify",
        "--work", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verified = (tmp_path / "verified" / "verify.log").read_text()
    assert "verify_dataset: 300 files in 30 class folders" in verified
    assert "300 images verified" in verified
    speed = re.search(
        r"^\| verify_dataset, 300 JPEGs .*\| ([\d.]+) \| >= 0.8 \|$", proc.stdout, re.M
    )
    assert speed and float(speed.group(1)) > 0, proc.stdout
    memory = re.search(
        r"^\| verify_dataset peak memory, all processes, 300 / \d+ images \|", proc.stdout, re.M
    )
    assert memory, proc.stdout
