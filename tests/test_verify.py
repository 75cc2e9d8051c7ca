"""Data verification: transfer_learning.verify on its own, and the verify_dataset rule.

Every broken tree is built from real generated JPEGs and then damaged the way real data
sets are: empty files, cut-off downloads, bad bytes, text saved as .jpg, a forgotten
folder, an image copied into the test split, Finder litter.
"""

from __future__ import annotations

import hashlib
import io
import shutil

import pytest
from conftest import assert_ok, job_stats, jobs, overlay, small_config, snakemake, write_images
from PIL import Image
from transfer_learning import data, verify
from transfer_learning.io import read_tsv

SPLITS = ["train", "val", "test"]
COUNTS = {
    "train": {"cats": 4, "dogs": 4},
    "val": {"cats": 2, "dogs": 2},
    "test": {"cats": 2, "dogs": 2},
}
MANIFEST_COLUMNS = ["split", "class", "path", "bytes", "width", "height", "sha256"]


@pytest.fixture()
def tree(tmp_path):
    return write_images(tmp_path / "images", COUNTS, size=32, seed=5)


def _jpeg_bytes(colour=(200, 30, 30), size=(32, 32), mode="RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _truncated(path) -> bytes:
    raw = path.read_bytes()
    return raw[: len(raw) * 6 // 10]


def _corrupt(path) -> bytes:
    """A JPEG that PIL opens but cannot decode: its quantisation-table marker is broken."""
    raw = bytearray(path.read_bytes())
    marker = raw.index(b"\xff\xdb")
    raw[marker] = 0x00
    return bytes(raw)


def _any_image(tree, split, label):
    return sorted((tree / split / label).iterdir())[-1]


def _problem_for(report, needle):
    found = [p for p in report.problems if needle in p]
    assert found, f"no problem mentions {needle!r}:\n" + "\n".join(report.problems)
    return found[0]


# ---- unit: transfer_learning.verify ------------------------------------------------------


def test_good_tree_gives_manifest_and_counts(tree):
    report = verify.verify_dataset(tree, SPLITS, COUNTS, threads=2)
    assert report.ok, report.problems
    assert report.warnings == [] and report.skipped == []
    assert len(report.manifest) == 16
    for row in report.manifest:
        path = tree / row["path"]
        assert row["path"] == f"{row['split']}/{row['class']}/{path.name}"
        assert row["bytes"] == path.stat().st_size
        assert (row["width"], row["height"]) == (32, 32)
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [(r["split"], r["class"], r["found"], r["status"]) for r in report.counts] == [
        (s, c, COUNTS[s][c], "ok") for s in SPLITS for c in ("cats", "dogs")
    ]


def test_every_problem_reported_in_one_message(tree):
    cats = tree / "train" / "cats"
    good = sorted(cats.iterdir())[0]
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "cut.jpg").write_bytes(_truncated(good))
    (cats / "bad.jpg").write_bytes(_corrupt(good))
    (cats / "notes.jpg").write_text("not a picture, a shopping list\n")
    # One dog too few in train.
    sorted((tree / "train" / "dogs").iterdir())[0].unlink()
    # A class only the training split has.
    (tree / "train" / "birds").mkdir()
    (tree / "train" / "birds" / "b.jpg").write_bytes(_jpeg_bytes((20, 90, 200)))
    # The val split lost its dogs; a training image was copied into val.
    shutil.rmtree(tree / "val" / "dogs")
    shutil.copy(good, tree / "val" / "cats" / "copied.jpg")
    # A nested folder inside a class folder.
    (tree / "test" / "cats" / "more").mkdir()

    report = verify.verify_dataset(tree, SPLITS, COUNTS)
    assert not report.ok
    assert "zero-byte" in _problem_for(report, "train/cats/empty.jpg")
    assert "truncated" in _problem_for(report, "train/cats/cut.jpg")
    assert "corrupt" in _problem_for(report, "train/cats/bad.jpg")
    assert "not an image" in _problem_for(report, "train/cats/notes.jpg")
    assert "expected 4" in _problem_for(report, "train/dogs: found 3")
    assert "data.expected_counts.train" in _problem_for(report, "class folder train/birds/")
    missing = _problem_for(report, "split val/ lacks")
    assert "dogs" in missing and "birds" in missing
    assert "birds" in _problem_for(report, "split test/ lacks")
    assert "val.dogs" in _problem_for(report, "val/dogs/ is missing")
    leak = _problem_for(report, "more than one split")
    assert f"train/cats/{good.name}" in leak and "val/cats/copied.jpg" in leak
    # The leaked copy in val is also one cat too many there.
    _problem_for(report, "val/cats: found 3")
    _problem_for(report, "test/cats/more")
    # The four unusable images are not in the manifest, the usable ones are.
    paths = {row["path"] for row in report.manifest}
    assert not paths & {f"train/cats/{n}" for n in ("empty.jpg", "cut.jpg", "bad.jpg", "notes.jpg")}
    assert "val/cats/copied.jpg" in paths

    message = verify.format_problems(report, tree)
    assert message.startswith(f"verify_dataset: {len(report.problems)} problem(s)")
    assert all(problem in message for problem in report.problems)
    assert len(report.problems) >= 12


def test_missing_and_empty_splits_reported_together(tree):
    shutil.rmtree(tree / "test")
    shutil.rmtree(tree / "val")
    (tree / "val").mkdir()
    for image in (tree / "train" / "dogs").iterdir():
        image.unlink()
    report = verify.verify_dataset(tree, SPLITS, COUNTS)
    assert "is missing" in _problem_for(report, "split folder test/")
    assert "no class folders" in _problem_for(report, "split val/")
    assert "contains no images" in _problem_for(report, "class folder train/dogs/")
    # The rest of the training split is still checked and listed.
    assert {(row["split"], row["class"]) for row in report.manifest} == {("train", "cats")}


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bad_data_root(tmp_path, kind):
    root = tmp_path / "images"
    if kind == "file":
        root.write_text("I am not a folder")
    report = verify.verify_dataset(root, SPLITS, COUNTS)
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert str(root) in problem and "data.root" in problem
    assert ("does not exist" if kind == "missing" else "is a file") in problem


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_count_off_by_one(tree, mode):
    sorted((tree / "test" / "dogs").iterdir())[0].unlink()
    report = verify.verify_dataset(tree, SPLITS, COUNTS, on_count_mismatch=mode)
    text = "test/dogs: found 1 usable images, expected 2 (data.expected_counts.test.dogs)"
    if mode == "error":
        assert report.problems == [text]
    else:
        assert report.ok
        assert report.warnings == [text]
    row = next(r for r in report.counts if (r["split"], r["class"]) == ("test", "dogs"))
    assert (row["found"], row["expected"], row["status"]) == (1, 2, "mismatch")


def test_warn_does_not_demote_broken_files(tree):
    (tree / "val" / "dogs" / "empty.jpg").write_bytes(b"")
    report = verify.verify_dataset(tree, SPLITS, COUNTS, on_count_mismatch="warn")
    assert not report.ok
    _problem_for(report, "val/dogs/empty.jpg")


def test_no_expected_counts_skips_the_count_check(tree):
    sorted((tree / "test" / "dogs").iterdir())[0].unlink()
    report = verify.verify_dataset(tree, SPLITS, None)
    assert report.ok, report.problems
    assert {r["status"] for r in report.counts} == {"ok"}


def test_identical_images_within_one_split_only_warn(tree):
    source = _any_image(tree, "train", "cats")
    shutil.copy(source, tree / "train" / "cats" / "twin.jpg")
    counts = {**COUNTS, "train": {"cats": 5, "dogs": 4}}
    report = verify.verify_dataset(tree, SPLITS, counts)
    assert report.ok, report.problems
    assert any("within one split" in w and "twin.jpg" in w for w in report.warnings)


def test_hidden_files_skipped_and_listed(tree):
    (tree / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "train" / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "train" / "cats" / "._cats.1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tree / "val" / ".hidden_folder").mkdir()
    report = verify.verify_dataset(tree, SPLITS, COUNTS)
    assert report.ok, report.problems
    assert set(report.skipped) == {
        "train/.DS_Store",
        "train/cats/.DS_Store",
        "train/cats/._cats.1.jpg",
        "val/.hidden_folder",
    }
    assert not any("/." in row["path"] for row in report.manifest)
    assert len(report.manifest) == 16


ODD_NAMES = [
    "grey.jpg",
    "alpha.png",
    "cmyk.jpg",
    "plain.png",
    "rotated.jpg",
    "tiny.jpg",
    "my cat photo.jpg",
    "chat_éléphant_ü.jpg",
    "UPPER.JPG",
]


def _add_oddities(folder):
    """Valid images of unusual kinds and names, nine of them."""
    Image.new("L", (40, 30), 90).save(folder / "grey.jpg")
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 15, 30))
    rgba.save(folder / "alpha.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (36, 36), (10, 200, 10)).save(folder / "plain.png")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (16, 16), (120, 60, 30)).save(folder / "tiny.jpg")
    Image.new("RGB", (33, 33), (1, 2, 3)).save(folder / "my cat photo.jpg")
    Image.new("RGB", (34, 34), (4, 5, 6)).save(folder / "chat_éléphant_ü.jpg")
    (folder / "UPPER.JPG").write_bytes(_jpeg_bytes((9, 9, 99)))


def test_valid_oddities_pass_and_load_as_rgb(tree):
    _add_oddities(tree / "train" / "cats")
    counts = {**COUNTS, "train": {"cats": 4 + len(ODD_NAMES), "dogs": 4}}
    report = verify.verify_dataset(tree, SPLITS, counts)
    assert report.ok, report.problems
    rows = {row["path"]: row for row in report.manifest}
    for name in ODD_NAMES:
        assert f"train/cats/{name}" in rows, name
    assert (rows["train/cats/tiny.jpg"]["width"], rows["train/cats/tiny.jpg"]["height"]) == (16, 16)
    # Every oddity goes through the training data path as a 3 x 32 x 32 tensor.
    records = [data.Record("train", "cats", f"train/cats/{name}") for name in ODD_NAMES]
    dataset = data.ImageDataset(tree, records, ["cats", "dogs"], 32, [0.5] * 3, [0.5] * 3, views=2)
    for i in range(len(dataset)):
        tensor, label = dataset[i]
        assert tuple(tensor.shape) == (3, 32, 32) and label == 0


# ---- the verify_dataset rule -------------------------------------------------------------


def test_rule_passes_with_oddities_hidden_files_and_a_warned_count(tmp_path):
    workdir = tmp_path / "work"
    root = write_images(workdir / "data" / "images", COUNTS, size=32, seed=8)
    _add_oddities(root / "train" / "cats")
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
    (cats / "cut.jpg").write_bytes(_truncated(good))
    (cats / "bad.jpg").write_bytes(_corrupt(good))
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
    (root / "train" / "cats" / "photo {1}.jpg").write_bytes(_jpeg_bytes((50, 150, 250)))
    counts = {**COUNTS, "train": {"cats": 5, "dogs": 4}}
    config = small_config("data/images", counts)
    proc = snakemake(
        workdir, "verify_dataset", "--configfile", overlay(tmp_path / "o.yaml", config)
    )
    assert_ok(proc, "verify_dataset")
    paths = {row["path"] for row in read_tsv(workdir / "results" / "data" / "manifest.tsv")}
    assert "train/cats/photo {1}.jpg" in paths
