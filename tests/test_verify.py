"""transfer_learning.verify: data verification on its own (the verify_dataset rule, through
Snakemake, is tested in test_data_checks.py).

Every broken tree is built from real generated JPEGs and then damaged the way real data
sets are: empty files, cut-off downloads, bad bytes, text saved as .jpg, a forgotten
folder, an image copied into the test split, Finder litter.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    COUNTS,
    ODD_NAMES,
    SCRIPTS,
    add_oddities,
    corrupt,
    jpeg_bytes,
    truncated,
    write_images,
)
from PIL import Image
from transfer_learning import data, verify
from transfer_learning.errors import UserError
from transfer_learning.images import load_rgb
from transfer_learning.io import write_tsv

SPLITS = ["train", "val", "test"]


@pytest.fixture()
def tree(tmp_path):
    return write_images(tmp_path / "images", COUNTS, size=32, seed=5)


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
    (cats / "cut.jpg").write_bytes(truncated(good))
    (cats / "bad.jpg").write_bytes(corrupt(good))
    (cats / "notes.jpg").write_text("not a picture, a shopping list\n")
    # One dog too few in train.
    sorted((tree / "train" / "dogs").iterdir())[0].unlink()
    # A class only the training split has.
    (tree / "train" / "birds").mkdir()
    (tree / "train" / "birds" / "b.jpg").write_bytes(jpeg_bytes((20, 90, 200)))
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


def test_valid_oddities_pass_and_load_as_rgb(tree):
    add_oddities(tree / "train" / "cats")
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


# ---- unit: one walk for verification and Snakemake's tracking ---------------------------


def _linked(tree, relative, tmp_path):
    """Move tree/relative out of the tree and leave a symbolic link to it in its place."""
    inside = tree / relative
    outside = tmp_path / "elsewhere" / relative.replace("/", "_")
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(inside, outside)
    inside.symlink_to(outside, target_is_directory=True)
    return outside


def _walked_paths(root):
    return {path for _, _, path in verify.walk_dataset(root, SPLITS).files()}


@pytest.fixture(params=["class folder", "split folder", "data root"])
def linked_tree(request, tmp_path):
    """(root to verify, real folder behind a link holding train/cats images, its prefix)."""
    tree = write_images(tmp_path / "images", COUNTS, size=32, seed=5)
    if request.param == "class folder":
        return tree, _linked(tree, "train/cats", tmp_path)
    if request.param == "split folder":
        return tree, _linked(tree, "train", tmp_path) / "cats"
    link = tmp_path / "link_to_images"
    link.symlink_to(tree, target_is_directory=True)
    return link, tree / "train" / "cats"


def test_linked_folders_are_verified_and_walked(linked_tree):
    root, cats = linked_tree
    report = verify.verify_dataset(root, SPLITS, COUNTS)
    assert report.ok, report.problems
    paths = {row["path"] for row in report.manifest}
    assert {f"train/cats/{p.name}" for p in cats.iterdir()} <= paths
    assert len(paths) == 16
    assert _walked_paths(root) == paths


def test_digest_follows_links_for_added_removed_and_replaced_images(linked_tree):
    root, cats = linked_tree
    seen = [verify.tracking_digest(root, SPLITS)]
    files, size, digest = re.fullmatch(
        r"(\d+) files, (\d+) bytes, digest ([0-9a-f]{16})", seen[0]
    ).groups()
    assert int(files) > 0 and int(size) > 0 and int(digest, 16) >= 0
    assert verify.tracking_digest(root, SPLITS) == seen[0]  # stable

    (cats / "new.jpg").write_bytes(jpeg_bytes((10, 20, 30)))
    seen.append(verify.tracking_digest(root, SPLITS))
    (cats / "new.jpg").unlink()
    seen.append(verify.tracking_digest(root, SPLITS))
    assert seen[2] == seen[0]  # back to the same files

    victim = sorted(cats.iterdir())[0]
    victim.write_bytes(jpeg_bytes((250, 250, 0), size=(40, 40)))  # new content, same name
    seen.append(verify.tracking_digest(root, SPLITS))
    assert len(set(seen)) == 3, seen

    # Same size, new bytes: the modification time tells.
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    stat = victim.stat()
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert victim.stat().st_size == stat.st_size
    assert verify.tracking_digest(root, SPLITS) != seen[-1]


def test_digest_ignores_hidden_and_stray_files(tree):
    before = verify.tracking_digest(tree, SPLITS)
    (tree / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "train" / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "train" / "cats" / "._cats.1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tree / "val" / "dogs" / ".hidden_folder").mkdir()
    (tree / "val" / "README.txt").write_text("a stray file: verification ignores it\n")
    assert verify.tracking_digest(tree, SPLITS) == before
    report = verify.verify_dataset(tree, SPLITS, COUNTS)
    assert report.ok, report.problems


def test_digest_sees_structure_that_verification_judges(tree):
    digests = [verify.tracking_digest(tree, SPLITS)]
    (tree / "val" / "birds").mkdir()  # an empty class folder: a problem
    digests.append(verify.tracking_digest(tree, SPLITS))
    (tree / "val" / "birds").rmdir()
    (tree / "test" / "cats" / "more").mkdir()  # a folder inside a class folder: a problem
    digests.append(verify.tracking_digest(tree, SPLITS))
    (tree / "test" / "cats" / "more").rmdir()
    shutil.rmtree(tree / "test")
    digests.append(verify.tracking_digest(tree, SPLITS))
    assert len(set(digests)) == 4, digests
    assert verify.tracking_digest(tree / "nowhere", SPLITS) == "missing"


def test_linked_image_file_is_tracked_through_its_target(tree, tmp_path):
    target = tmp_path / "outside.jpg"
    target.write_bytes(jpeg_bytes((1, 120, 240)))
    (tree / "train" / "cats" / "linked.jpg").symlink_to(target)
    before = verify.tracking_digest(tree, SPLITS)
    target.write_bytes(jpeg_bytes((240, 120, 1), size=(48, 48)))
    assert verify.tracking_digest(tree, SPLITS) != before
    report = verify.verify_dataset(tree, SPLITS, None)
    assert report.ok, report.problems
    assert "train/cats/linked.jpg" in {row["path"] for row in report.manifest}
    # A dangling link is a file verification cannot read: a problem naming it.
    (tree / "train" / "dogs" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    report = verify.verify_dataset(tree, SPLITS, None)
    assert "dangling" in _problem_for(report, "train/dogs/gone.jpg")


def test_walk_lists_what_verification_reports(tree):
    (tree / "train" / "stray.jpg").write_bytes(jpeg_bytes())
    (tree / "test" / "cats" / "nested").mkdir()
    (tree / "val" / "cats" / "._x.jpg").write_bytes(b"\x00")
    walked = verify.walk_dataset(tree, SPLITS, stat=True)
    report = verify.verify_dataset(tree, SPLITS, COUNTS)
    assert {path for _, _, path in walked.files()} == {row["path"] for row in report.manifest}
    assert walked.hidden == report.skipped == ["val/cats/._x.jpg"]
    assert walked.warnings == ["train/stray.jpg: file outside any class folder, ignored"]
    assert walked.warnings == report.warnings
    assert walked.problems == [
        "test/cats/nested/: unexpected folder inside class folder test/cats/ "
        "(images must sit directly in it)"
    ]
    assert walked.classes == {split: ["cats", "dogs"] for split in SPLITS}
    for folder in walked.folders:
        for name, size in zip(folder.names, folder.sizes, strict=True):
            assert (tree / folder.split / folder.label / name).stat().st_size == size


def test_verify_does_not_import_pytorch():
    code = (
        "import sys; from transfer_learning import verify; "
        "verify.tracking_digest('.', ['train']); "
        "assert not {'torch', 'torchvision'} & set(sys.modules), 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=SCRIPTS)


# ---- unit: duplicates by decoded pixels and near-duplicates -------------------------------


def _save_decoded_as_png(source, dest):
    """The same picture saved again losslessly: other bytes, identical decoded pixels."""
    load_rgb(source).save(dest, "PNG")


@pytest.mark.parametrize("mode", ["error", "warn", "ignore"])
def test_same_picture_as_png_in_another_split(tree, mode):
    source = _any_image(tree, "train", "cats")
    _save_decoded_as_png(source, tree / "test" / "cats" / "again.png")
    report = verify.verify_dataset(tree, SPLITS, None, duplicates=mode)
    rows = {row["path"]: row for row in report.manifest}
    original, copy = rows[f"train/cats/{source.name}"], rows["test/cats/again.png"]
    assert original["sha256"] != copy["sha256"]
    text = f"identical image content in more than one split: train/cats/{source.name}, "
    text += "test/cats/again.png"
    if mode == "error":
        assert report.problems == [text]
        assert report.warnings == []
    elif mode == "warn":
        assert report.ok and report.warnings == [text]
    else:
        assert report.ok and report.warnings == []


def test_identical_pixels_within_one_split_only_warn(tree):
    source = _any_image(tree, "val", "dogs")
    _save_decoded_as_png(source, tree / "val" / "dogs" / "twin.png")
    report = verify.verify_dataset(tree, SPLITS, None)
    assert report.ok, report.problems
    assert report.warnings == [
        f"identical image content within one split: val/dogs/{source.name}, val/dogs/twin.png"
    ]


def _photo():
    """A real photograph (matplotlib's sample of Grace Hopper, 512 x 600)."""
    from matplotlib import cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def _edited(photo, edit):
    w, h = photo.size
    if edit == "re-saved at quality 40":
        return photo, {"quality": 40}
    if edit == "resized to 80%":
        return photo.resize((w * 4 // 5, h * 4 // 5), Image.Resampling.BICUBIC), {}
    if edit == "cropped by 5% (2.5% each side)":
        dx, dy = w // 40, h // 40
        return photo.crop((dx, dy, w - dx, h - dy)), {}
    raise ValueError(edit)


@pytest.mark.parametrize(
    "edit", ["re-saved at quality 40", "resized to 80%", "cropped by 5% (2.5% each side)"]
)
def test_edited_copy_of_a_photo_in_another_split_is_a_near_duplicate(tree, edit):
    photo = _photo()
    photo.save(tree / "train" / "dogs" / "photo.jpg", quality=90)
    copy, options = _edited(load_rgb(tree / "train" / "dogs" / "photo.jpg"), edit)
    copy.save(tree / "test" / "dogs" / "copy.jpg", **{"quality": 85, **options})
    report = verify.verify_dataset(tree, SPLITS, None)
    assert report.ok, report.problems  # only a warning
    rows = {row["path"]: row for row in report.manifest}
    a, b = rows["train/dogs/photo.jpg"], rows["test/dogs/copy.jpg"]
    distance = (int(a["phash"], 16) ^ int(b["phash"], 16)).bit_count()
    assert distance <= 4, (edit, distance)
    assert report.warnings == [
        f"near-duplicate images in different splits (perceptual hash distance {distance} "
        "<= 4): train/dogs/photo.jpg and test/dogs/copy.jpg"
    ]
    # Off, or duplicates ignored: no warning.
    assert verify.verify_dataset(tree, SPLITS, None, near_duplicate_distance=0).warnings == []
    assert verify.verify_dataset(tree, SPLITS, None, duplicates="ignore").warnings == []


def test_near_duplicates_within_one_split_are_not_reported(tree):
    photo = _photo()
    photo.save(tree / "train" / "dogs" / "photo.jpg", quality=90)
    photo.save(tree / "train" / "dogs" / "photo_low.jpg", quality=40)
    report = verify.verify_dataset(tree, SPLITS, None)
    assert report.ok and report.warnings == []


def test_flat_pictures_are_not_near_duplicates(tree):
    """A flat picture has no structure, so its hash is 0: not evidence of a copy."""
    Image.new("RGB", (40, 40), (200, 0, 0)).save(tree / "train" / "cats" / "red.png")
    Image.new("RGB", (40, 40), (0, 0, 200)).save(tree / "test" / "cats" / "blue.png")
    report = verify.verify_dataset(tree, SPLITS, None)
    assert report.ok and report.warnings == []
    assert {row["phash"] for row in report.manifest if row["path"].endswith(".png")} == {"0" * 16}


def test_many_copies_of_one_picture_are_one_pair(tree):
    source = _any_image(tree, "train", "cats")
    for k in range(5):
        shutil.copy(source, tree / "train" / "cats" / f"copy{k}.jpg")
        shutil.copy(source, tree / "test" / "dogs" / f"copy{k}.jpg")
    load_rgb(source).save(tree / "val" / "cats" / "near.jpg", quality=60)
    report = verify.verify_dataset(tree, SPLITS, None, duplicates="warn")
    assert report.ok
    near = [w for w in report.warnings if w.startswith("near-duplicate")]
    assert len(near) == 2, near  # val/cats/near.jpg with one copy in train, one in test
    assert all("val/cats/near.jpg" in w for w in near)
    identical = [w for w in report.warnings if "more than one split" in w]
    assert len(identical) == 1 and identical[0].count("copy") == 10


def test_demo_images_are_not_near_duplicates(tmp_path):
    """Genuinely different pictures (the demo's shapes) do not come near the default."""
    counts = {s: {"a": n, "b": n} for s, n in (("train", 60), ("val", 30), ("test", 30))}
    root = write_images(tmp_path / "demo", counts, size=64, seed=0)
    report = verify.verify_dataset(root, SPLITS, counts, threads=2)
    assert report.ok and report.warnings == [], report.warnings


def test_near_duplicate_listing_is_capped(tmp_path):
    rng = random.Random(3)
    listed = verify.NEAR_DUPLICATES_LISTED
    for split in ("train", "test"):
        (tmp_path / split / "x").mkdir(parents=True)
        for k in range(listed + 7):
            (tmp_path / split / "x" / f"{k:03d}.jpg").touch()
    tree = verify.walk_dataset(tmp_path, ["train", "test"])
    images = verify._Images(tree)
    bases = [rng.getrandbits(63) for _ in range(listed + 7)]  # unrelated: ~32 bits apart
    for index, (split, _, path) in enumerate(tree.files()):
        k = int(path[-7:-4])
        flip = 0b1001 if split == "test" else 0
        row = {"sha256": hashlib.sha256(path.encode()).hexdigest(), "width": 9, "height": 9}
        images.add(index, {**row, "phash": f"{bases[k] ^ flip:016x}"})
    report = verify.Report()
    verify._find_near_duplicates(report, images, images.first_with_same_pixels(), 4)
    assert len(report.warnings) == listed + 1
    assert all("distance 2 <= 4" in w for w in report.warnings[:listed])
    assert "train/x/000.jpg and test/x/000.jpg" in report.warnings[0]
    assert report.warnings[-1].startswith("7 more near-duplicate pair(s) in different splits")
    assert f"({listed + 7} in all" in report.warnings[-1]


def _brute_force(hashes, max_distance, groups=None):
    pairs = []
    for i, a in enumerate(hashes):
        for j in range(i + 1, len(hashes)):
            d = (a ^ hashes[j]).bit_count()
            if d <= max_distance and (groups is None or groups[i] != groups[j]):
                pairs.append((i, j, d))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


@pytest.mark.parametrize("max_distance", [0, 1, 3, 4, 6, 10, 64])
def test_multi_index_search_matches_brute_force(max_distance):
    rng = random.Random(max_distance)
    hashes = [rng.getrandbits(64) for _ in range(150)]
    # Plant neighbours at every distance from 0 to 12 bits, some of them in clusters.
    for _ in range(250):
        h = rng.choice(hashes)
        for bit in rng.sample(range(64), rng.randint(0, 12)):
            h ^= 1 << bit
        hashes.append(h)
    groups = [rng.choice("abc") for _ in hashes]
    expected = _brute_force(hashes, max_distance)
    assert verify.near_duplicate_pairs(hashes, max_distance) == expected
    assert verify.near_duplicate_pairs(hashes, max_distance, groups) == _brute_force(
        hashes, max_distance, groups
    )
    if max_distance == 6:
        assert len(expected) > 50  # the planted pairs make this a real check


def test_near_duplicate_search_has_no_pairs_for_few_hashes():
    assert verify.near_duplicate_pairs([], 6) == []
    assert verify.near_duplicate_pairs([123], 6) == []


def test_manifest_rows_carry_hashes(tree):
    report = verify.verify_dataset(tree, SPLITS, COUNTS)
    for row in report.manifest:
        assert list(row) == verify.MANIFEST_COLUMNS
        assert row["sha256"] == hashlib.sha256((tree / row["path"]).read_bytes()).hexdigest()
        assert len(row["phash"]) == 16 and int(row["phash"], 16) >> 63 == 0  # DC bit is 0
    assert len({row["phash"] for row in report.manifest}) == 16


def _phash_distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


@pytest.mark.parametrize("size", [(32, 32), (150, 130), (512, 600), (1000, 700)])
def test_scaled_decoding_gives_the_phash_of_the_full_picture(tmp_path, size):
    """A JPEG's phash comes from libjpeg's scaled decoding, a PNG's from its full pixels
    box-averaged: the same picture lands within two bits, as a PNG copy's does."""
    _photo().resize(size).save(tmp_path / "photo.jpg", quality=90)
    full = load_rgb(tmp_path / "photo.jpg")
    full.save(tmp_path / "photo.png")
    scale = verify.phash_scale(size)
    assert scale == {32: 1, 150: 2, 512: 8, 1000: 8}[size[0]]
    rows = {}
    for name in ("photo.jpg", "photo.png"):
        rows[name] = verify._examine(str(tmp_path), "train", "x", name)
        assert (rows[name]["width"], rows[name]["height"]) == size
    assert rows["photo.png"]["phash"] == verify.phash(full)
    assert _phash_distance(rows["photo.jpg"]["phash"], verify.phash(full)) <= 2


def test_phash_against_a_direct_dct():
    image = _photo().resize((300, 260))
    assert verify.phash_scale(image.size) == 4
    small = np.asarray(image, dtype=np.float64).reshape(65, 4, 75, 4, 3).mean(axis=(1, 3))
    boxed = Image.fromarray(np.round(small).astype(np.uint8))
    grey = np.asarray(boxed.convert("L").resize((32, 32), Image.Resampling.LANCZOS), float)
    n = np.arange(32)
    basis = np.cos(np.pi * np.outer(np.arange(8), 2 * n + 1) / 64)
    coefficients = np.array(
        [[(grey * np.outer(basis[u], basis[v])).sum() for v in range(8)] for u in range(8)]
    ).ravel()
    bits = coefficients > np.median(coefficients[1:])
    bits[0] = False
    assert verify.phash(image) == f"{int(''.join('01'[int(b)] for b in bits), 2):016x}"
    assert bits.sum() == 31
    # A flat picture has no structure: no bit is set, however float rounding falls.
    assert verify.phash(Image.new("RGB", (50, 40), (90, 10, 200))) == "0" * 16


def _corruptions(content: bytes, rng: random.Random, count: int):
    """`count` damaged copies: cut short, bytes overwritten, stray markers put in."""
    header = content.index(b"\xff\xda")  # start of scan: the entropy-coded data follow
    for k in range(count):
        damaged = bytearray(content)
        if k % 3 == 0:
            damaged = damaged[: rng.randrange(header, len(content))]
        elif k % 3 == 1:
            for _ in range(rng.randrange(1, 20)):
                damaged[rng.randrange(header, len(damaged))] = rng.randrange(256)
        else:
            at = rng.randrange(header, len(damaged) - 2)
            damaged[at : at + 2] = bytes([0xFF, rng.choice([0xD9, 0xC4, 0xDB, 0xDA, 0xD0])])
        yield bytes(damaged)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "CMYK", "greyscale"])
def test_scaled_decoding_judges_damaged_jpegs_as_full_decoding_does(kind):
    photo = _photo().resize((500, 375))
    image, options = {
        "baseline": (photo, {}),
        "progressive": (photo, {"progressive": True}),
        "CMYK": (photo.convert("CMYK"), {}),
        "greyscale": (photo.convert("L"), {}),
    }[kind]
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    verdicts = {True: 0, False: 0}
    for damaged in _corruptions(buffer.getvalue(), random.Random(kind), 150):
        outcomes = []
        for scaled in (False, True):
            try:
                verify._decode(lambda damaged=damaged: io.BytesIO(damaged), scaled)
                outcomes.append(True)
            except ValueError:
                outcomes.append(False)
        assert outcomes[0] == outcomes[1], (kind, len(damaged))
        verdicts[outcomes[0]] += 1
    assert verdicts[True] > 10 and verdicts[False] > 50, verdicts  # both verdicts are tried


def test_turned_jpeg_and_its_upright_png_in_two_splits_are_identical(tree):
    """Identical pixels through EXIF: the JPEG is stored on its side, the PNG upright."""
    photo = _photo().resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    photo.save(tree / "train" / "cats" / "turned.jpg", quality=90, exif=exif)
    upright = load_rgb(tree / "train" / "cats" / "turned.jpg")
    assert upright.size == (200, 300)
    upright.save(tree / "test" / "cats" / "upright.png")
    report = verify.verify_dataset(tree, SPLITS, None, threads=2)
    assert report.problems == [
        "identical image content in more than one split: train/cats/turned.jpg, "
        "test/cats/upright.png"
    ]


def test_bad_duplicate_settings_are_refused(tree):
    with pytest.raises(UserError, match="duplicates"):
        verify.verify_dataset(tree, SPLITS, duplicates="maybe")
    with pytest.raises(UserError, match="near_duplicate_distance"):
        verify.verify_dataset(tree, SPLITS, near_duplicate_distance=-1)


# ---- at scale: one read and one decode per image, streamed rows, progress ----------------


def test_verification_decodes_the_pixels_training_sees(tree):
    """The decode path without load_rgb's copies gives load_rgb's pixels for every kind."""
    folder = tree / "train" / "cats"
    add_oddities(folder)
    keyed = Image.new("RGB", (20, 10), (1, 2, 3))
    keyed.paste((200, 100, 50), (0, 0, 10, 10))
    keyed.save(folder / "keyed_rgb.png", transparency=(1, 2, 3))
    palette = Image.new("P", (12, 12), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(folder / "palette_trns.png", transparency=1)
    Image.fromarray(np.full((8, 9), 40000, dtype=np.uint16)).save(folder / "grey16.png")
    names = [*ODD_NAMES, "keyed_rgb.png", "palette_trns.png", "grey16.png"]
    for name in names:
        decoded, size = verify.decode_image(folder / name)
        expected = load_rgb(folder / name)
        assert (decoded.mode, decoded.size) == ("RGB", expected.size), name
        assert decoded.tobytes() == expected.tobytes(), name
        with Image.open(folder / name) as stored:
            assert size == stored.size, name


def test_streamed_manifest_is_the_table_of_the_rows(tree, tmp_path):
    kept = verify.verify_dataset(tree, SPLITS, COUNTS, threads=2)
    streamed = verify.verify_dataset(tree, SPLITS, COUNTS, threads=3, manifest=tmp_path / "m.tsv")
    assert streamed.ok and streamed.manifest == [] and streamed.images == kept.images == 16
    assert streamed.counts == kept.counts and streamed.warnings == kept.warnings
    write_tsv(tmp_path / "expected.tsv", kept.manifest, verify.MANIFEST_COLUMNS)
    assert (tmp_path / "m.tsv").read_bytes() == (tmp_path / "expected.tsv").read_bytes()


def test_rows_come_in_walk_order_whatever_the_threads(tmp_path):
    # Several tasks of the thread pool per class, so tasks finish out of order.
    n = 3 * verify.FILES_PER_TASK
    root = write_images(tmp_path / "many", {"train": {"cats": n, "dogs": n}}, size=8, seed=9)
    walked = [path for _, _, path in verify.walk_dataset(root, ["train"]).files()]
    for threads in (1, 4):
        report = verify.verify_dataset(root, ["train"], None, threads=threads)
        assert [row["path"] for row in report.manifest] == walked


def test_progress_lines_give_the_rate_and_the_time_left(tree, caplog):
    with caplog.at_level("INFO", logger="transfer_learning"):
        verify.verify_dataset(tree, SPLITS, COUNTS, progress_seconds=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "transfer_learning"]
    assert lines[0].startswith("verify_dataset: 16 files in 6 class folders under ")
    progress = [line for line in lines if "left" in line]
    assert len(progress) == 15  # after each image but the last
    rate_and_time_left = r"\d+ images/s, about \d+ (s|min \d+ s) left"
    assert re.fullmatch(
        rf"verify_dataset: 1 of 16 images checked \(6%\), {rate_and_time_left}", progress[0]
    )
    assert re.fullmatch(r"verify_dataset: 16 images checked in \d+ s, \d+ images/s", lines[-1])
