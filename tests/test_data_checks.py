"""The data checks through the real Snakemake command line: the verify_dataset rule passes
valid oddities, hidden files and a warned count; it lists every problem in one message and
starts nothing downstream; it names a missing data root; it accepts braces in file names.

transfer_learning.verify on its own is tested in test_verify.py.
"""

from __future__ import annotations

import shutil

from helpers import (
    COUNTS,
    ODD_NAMES,
    add_oddities,
    assert_ok,
    corrupt,
    job_stats,
    jobs,
    jpeg_bytes,
    overlay,
    small_config,
    snakemake,
    truncated,
    write_images,
)
from transfer_learning.io import read_tsv

MANIFEST_COLUMNS = [
    "split", "class", "path", "bytes", "width", "height", "sha256", "phash",
]  # fmt: skip


def test_rule_passes_with_oddities_hidden_files_and_a_warned_count(tmp_path):
    workdir = tmp_path / "work"
    root = write_images(workdir / "data" / "images", COUNTS, size=32, seed=8)
    add_oddities(root / "train" / "cats")
    (root / "train" / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "val" / "dogs" / "._dogs.9.jpg").write_bytes(b"\x00\x05\x16\x07")
    sorted((root / "test" / "dogs").iterdir())[0].unlink()  # one short: only warned
    counts = {**COUNTS, "train": {"cats": 4 + len(ODD_NAMES), "dogs": 4}}
    config = small_config("data/images", counts, data={"on_count_mismatch": "warn"})
    proc = snakemake(
        workdir, "verify_dataset", "--configfile", overlay(tmp_path / "o.yaml", config)
    )
    assert_ok(proc, "verify_dataset")
    assert job_stats(proc.stdout) == {"verify_dataset": 1}

    manifest = read_tsv(workdir / "results" / "data" / "manifest.tsv")
    assert list(manifest[0]) == MANIFEST_COLUMNS
    assert len(manifest) == 16 - 1 + len(ODD_NAMES)
    paths = {row["path"] for row in manifest}
    assert {f"train/cats/{name}" for name in ODD_NAMES} <= paths
    assert not any("/." in p for p in paths)
    by_path = {row["path"]: row for row in manifest}
    assert by_path["train/cats/tiny.jpg"]["width"] == "16"
    for row in manifest:
        assert len(row["sha256"]) == 64 and int(row["bytes"]) > 0
        assert len(row["phash"]) == 16

    counts_rows = read_tsv(workdir / "results" / "data" / "counts.tsv")
    assert list(counts_rows[0]) == ["split", "class", "found", "expected", "status"]
    status = {(r["split"], r["class"]): (r["found"], r["status"]) for r in counts_rows}
    assert status[("test", "dogs")] == ("1", "mismatch")
    assert status[("train", "cats")] == (str(4 + len(ODD_NAMES)), "ok")

    log = (workdir / "logs" / "verify_dataset.log").read_text()
    assert "skipped hidden file train/cats/.DS_Store" in log
    assert "skipped hidden file val/dogs/._dogs.9.jpg" in log
    assert "test/dogs: found 1 usable images, expected 2" in log


def test_rule_failure_lists_every_problem_and_starts_nothing_downstream(tmp_path):
    workdir = tmp_path / "work"
    root = write_images(workdir / "data" / "images", COUNTS, size=32, seed=9)
    cats = root / "train" / "cats"
    good = sorted(cats.iterdir())[0]
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "cut.jpg").write_bytes(truncated(good))
    (cats / "bad.jpg").write_bytes(corrupt(good))
    (cats / "notes.jpg").write_text("hello\n")
    shutil.copy(good, root / "test" / "dogs" / "leaked.jpg")
    shutil.rmtree(root / "val" / "dogs")
    config = small_config("data/images", COUNTS)
    proc = snakemake(workdir, "--configfile", overlay(tmp_path / "o.yaml", config))
    assert proc.returncode != 0

    log = (workdir / "logs" / "verify_dataset.log").read_text()
    # One message, every problem in it, each naming its file or folder.
    assert log.count("problem(s) in the data under") == 1
    for needle in (
        "train/cats/empty.jpg: zero-byte file",
        "train/cats/cut.jpg: truncated image",
        "train/cats/bad.jpg: corrupt image",
        "train/cats/notes.jpg: not an image",
        "test/dogs/leaked.jpg",
        "split val/ lacks class folder(s) ['dogs']",
        "test/dogs: found 3 usable images, expected 2",
    ):
        assert needle in log, f"{needle!r} not in the log:\n{log}"
    assert "Nothing downstream was started" in log

    # Snakemake started verify_dataset and nothing after it.
    started = {job["rule"] for job in jobs(proc.stdout)}
    assert started == {"verify_dataset"}, started
    assert "Error in rule verify_dataset" in proc.stdout
    for absent in (
        "results/features",
        "results/baseline",
        "logs/extract_features",
        "results/summary.tsv",
    ):
        assert not (workdir / absent).exists(), absent
    # And verify_dataset itself left no output behind for a later run to trust.
    assert not (workdir / "results/data/manifest.tsv").exists()
    assert not (workdir / "results/data/counts.tsv").exists()


def test_rule_names_a_missing_data_root(tmp_path):
    workdir = tmp_path / "work"
    config = small_config("data/nowhere", COUNTS)
    proc = snakemake(
        workdir, "verify_dataset", "--configfile", overlay(tmp_path / "o.yaml", config)
    )
    assert proc.returncode != 0
    log = (workdir / "logs" / "verify_dataset.log").read_text()
    assert "data root data/nowhere does not exist (config key data.root)" in log


def test_rule_accepts_braces_in_file_names(tmp_path):
    workdir = tmp_path / "work"
    root = write_images(workdir / "data" / "images", COUNTS, size=32, seed=10)
    (root / "train" / "cats" / "photo {1}.jpg").write_bytes(jpeg_bytes((50, 150, 250)))
    counts = {**COUNTS, "train": {"cats": 5, "dogs": 4}}
    config = small_config("data/images", counts)
    proc = snakemake(
        workdir, "verify_dataset", "--configfile", overlay(tmp_path / "o.yaml", config)
    )
    assert_ok(proc, "verify_dataset")
    paths = {row["path"] for row in read_tsv(workdir / "results" / "data" / "manifest.tsv")}
    assert "train/cats/photo {1}.jpg" in paths
