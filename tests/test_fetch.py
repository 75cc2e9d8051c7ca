"""Tests for transfer_learning.fetch and its two scripts, on local files only.

The network download itself is the only thing not exercised here (no internet
in CI): weights come from file:// urls and the Oxford-IIIT Pet data from a fake
tree laid out exactly as torchvision's OxfordIIITPet expects it once extracted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

SCRIPTS = Path(__file__).parents[1] / "workflow_scripts"
sys.path.insert(0, str(SCRIPTS))

from transfer_learning import cli, fetch, models  # noqa: E402
from transfer_learning.errors import UserError  # noqa: E402

# ------------------------------------------------------------------ weights


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def served_weights(tmp_path):
    """A tiny real state dict served as <name>-<sha256[:8]>.pth."""
    src = tmp_path / "src.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), src)
    digest = _sha256(src)
    served = tmp_path / "served" / f"tiny-{digest[:8]}.pth"
    served.parent.mkdir()
    served.write_bytes(src.read_bytes())
    return served, digest


def test_fetch_weights_file_url(served_weights, tmp_path):
    served, _ = served_weights
    dest = tmp_path / "out" / served.name
    got = fetch.fetch_weights("mobilenet_v2", "DEFAULT", dest, url=served.as_uri())
    assert got == dest
    assert dest.read_bytes() == served.read_bytes()
    assert torch.load(dest, weights_only=True)["weight"].shape == (2, 4)
    assert os.listdir(dest.parent) == [dest.name]  # no temp files left


def test_fetch_weights_skips_when_present(served_weights, tmp_path):
    served, _ = served_weights
    dest = tmp_path / served.name
    dest.write_bytes(served.read_bytes())
    missing = (tmp_path / "nowhere" / served.name).as_uri()
    # Would fail if it tried to download from the missing url.
    assert fetch.fetch_weights("mobilenet_v2", "DEFAULT", dest, url=missing) == dest


def test_fetch_weights_rejects_wrong_hash(served_weights, tmp_path):
    served, digest = served_weights
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = served.with_name(f"tiny-{wrong}.pth")
    bad.write_bytes(served.read_bytes())
    dest_dir = tmp_path / "out"
    dest_dir.mkdir()
    with pytest.raises(fetch.FetchError, match="sha256 check failed"):
        fetch.fetch_weights("mobilenet_v2", "DEFAULT", dest_dir / bad.name, url=bad.as_uri())
    assert os.listdir(dest_dir) == []


def test_fetch_weights_needs_hash_in_name(tmp_path):
    plain = tmp_path / "weights.pth"
    plain.write_bytes(b"x")
    with pytest.raises(fetch.FetchError, match="no '-<sha256 prefix>.'"):
        fetch.fetch_weights("mobilenet_v2", "DEFAULT", tmp_path / "o.pth", url=plain.as_uri())


def test_fetch_error_is_a_user_error():
    # cli.run prints exactly these as one line; anything else keeps its traceback.
    assert issubclass(fetch.FetchError, UserError)


def test_resolve_weights_and_filename():
    weights = models.resolve_weights("mobilenet_v2", "DEFAULT")
    assert weights.name == "IMAGENET1K_V2"
    assert models.weights_filename(weights) == "mobilenet_v2-7ebf99e0.pth"
    v1 = models.resolve_weights("mobilenet_v2", "IMAGENET1K_V1")
    assert models.weights_filename(v1) == "mobilenet_v2-b0353104.pth"


def test_resolve_weights_unknown_names():
    with pytest.raises(UserError, match="unknown backbone 'nonet'.*mobilenet_v2"):
        models.resolve_weights("nonet", "DEFAULT")
    with pytest.raises(UserError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        models.resolve_weights("mobilenet_v2", "IMAGENET9K")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _load_script(script: str):
    spec = importlib.util.spec_from_file_location(script, SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main_fails(caplog, script: str, *args: str) -> str:
    """Run a script as its __main__ does, in-process (a subprocess costs a torch import).

    Returns the one error line cli.run logs; the run must end with a non-zero status.
    """
    module = _load_script(script)
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exc:
        cli.run(script, lambda: module.main(list(args)))
    assert exc.value.code not in (0, None)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_fetch_weights_script(served_weights, tmp_path):
    served, _ = served_weights
    out = tmp_path / "w" / served.name
    args = ["--backbone", "mobilenet_v2", "--weights", "DEFAULT", "--output", str(out)]
    proc = _run("fetch_weights.py", *args, "--url", served.as_uri())
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == served.read_bytes()
    assert "fetch_weights: ok" in proc.stderr


def test_fetch_weights_script_errors(tmp_path, caplog):
    out = str(tmp_path / "w.pth")
    msg = _main_fails(
        caplog, "fetch_weights", "--backbone", "mobilenet_v2", "--weights", "NOPE", "--output", out
    )
    assert msg.startswith("fetch_weights: unknown weights 'NOPE'")
    missing = (tmp_path / "gone-12345678.pth").as_uri()
    args = [
        "--backbone",
        "mobilenet_v2",
        "--weights",
        "DEFAULT",
        "--output",
        out,
        "--url",
        missing,
    ]
    msg = _main_fails(caplog, "fetch_weights", *args)
    assert msg.startswith(f"fetch_weights: cannot download {missing}: ")
    assert not Path(out).exists()


# --------------------------------------------------------------------- data

# (breed, species) with species 1 = cat, 2 = dog, as in the annotation files.
BREEDS = [("Abyssinian", 1), ("Bengal", 1), ("beagle", 2), ("pug", 2)]
PER_BREED = 6  # 12 cats + 12 dogs, 2 of the cats broken


def _jpeg_bytes(seed: int, mode: str = "RGB") -> bytes:
    rng = random.Random(seed)
    color = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (32, 32), color).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def pet_dir(tmp_path):
    """Fake extracted Oxford-IIIT Pet: images/*.jpg and annotations/{trainval,test}.txt."""
    base = tmp_path / "dl" / "oxford-iiit-pet"
    images = base / "images"
    anns = base / "annotations"
    images.mkdir(parents=True)
    anns.mkdir()
    lines = {"trainval": [], "test": []}
    for class_id, (breed, species) in enumerate(BREEDS, start=1):
        for i in range(1, PER_BREED + 1):
            name = f"{breed}_{i}"
            # One grayscale JPEG, to check it is converted to RGB.
            mode = "L" if name == "beagle_1" else "RGB"
            (images / f"{name}.jpg").write_bytes(_jpeg_bytes(class_id * 100 + i, mode))
            split = "trainval" if i % 2 else "test"
            lines[split].append(f"{name} {class_id} {species} {i}")
    # Sources contain some broken files; these must be skipped and reported.
    (images / "Abyssinian_1.jpg").write_bytes(random.Random(0).randbytes(500))
    good = (images / "Bengal_2.jpg").read_bytes()
    (images / "Bengal_2.jpg").write_bytes(good[: len(good) // 2])
    for split, rows in lines.items():
        (anns / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return tmp_path / "dl"


COUNTS = {
    "train": {"cats": 6, "dogs": 6},
    "val": {"cats": 2, "dogs": 2},
    "test": {"cats": 2, "dogs": 2},
}


def _tree(root: Path) -> dict[str, dict[str, list[str]]]:
    return {
        split.name: {cls.name: sorted(p.name for p in cls.iterdir()) for cls in split.iterdir()}
        for split in root.iterdir()
    }


@pytest.fixture()
def no_network(monkeypatch):
    """Fail loudly if anything tries to download or open a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr("torchvision.datasets.oxford_iiit_pet.download_and_extract_archive", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_fetch_oxford_pets_layout(pet_dir, tmp_path, no_network):
    root = tmp_path / "data"
    report = fetch.fetch_oxford_pets(root, COUNTS, 1, pet_dir, download=True)
    tree = _tree(root)
    assert set(tree) == {"train", "val", "test"}
    for split, per_class in COUNTS.items():
        assert set(tree[split]) == {"cats", "dogs"}
        for cls, n in per_class.items():
            assert len(tree[split][cls]) == n
            for name in tree[split][cls]:
                with Image.open(root / split / cls / name) as img:
                    assert (img.format, img.mode) == ("JPEG", "RGB")
                breed = name.rsplit("_", 1)[0]
                assert (cls == "cats") == (breed in {"Abyssinian", "Bengal"})
    all_files = [f for per_class in tree.values() for names in per_class.values() for f in names]
    assert len(all_files) == len(set(all_files))  # no image in two splits
    assert report["counts"] == COUNTS
    assert report["available"] == {"cats": 10, "dogs": 12}
    assert sorted(s["file"] for s in report["skipped"]) == [
        "Abyssinian_1.jpg",
        "Bengal_2.jpg",
    ]
    assert "Abyssinian_1.jpg" not in all_files and "Bengal_2.jpg" not in all_files
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_fetch_oxford_pets_copies_rgb_jpeg_as_is(pet_dir, tmp_path):
    root = tmp_path / "data"
    everything = {"train": {"cats": 10, "dogs": 12}}
    fetch.fetch_oxford_pets(root, everything, 0, pet_dir, download=False)
    src = pet_dir / "oxford-iiit-pet" / "images"
    assert (root / "train/cats/Bengal_1.jpg").read_bytes() == (src / "Bengal_1.jpg").read_bytes()
    with Image.open(root / "train/dogs/beagle_1.jpg") as img:
        assert img.mode == "RGB"  # the grayscale source was re-encoded


def test_fetch_oxford_pets_deterministic(pet_dir, tmp_path):
    def tree(seed: int, name: str):
        fetch.fetch_oxford_pets(tmp_path / name, COUNTS, seed, pet_dir, download=False)
        return _tree(tmp_path / name)

    first = tree(7, "a")
    assert tree(7, "b") == first
    assert tree(8, "c") != first


def test_fetch_oxford_pets_too_few_images(pet_dir, tmp_path):
    counts = {"train": {"cats": 9, "dogs": 6}, "val": {"cats": 2, "dogs": 2}}
    with pytest.raises(fetch.FetchError, match="class 'cats' needs 11 valid images, only 10"):
        fetch.fetch_oxford_pets(tmp_path / "data", counts, 0, pet_dir, download=False)
    assert not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_fetch_oxford_pets_unknown_class(pet_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown classes \['birds'\]"):
        fetch.fetch_oxford_pets(tmp_path / "d", {"train": {"birds": 1}}, 0, pet_dir, False)


def test_fetch_oxford_pets_refuses_existing_root(pet_dir, tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "keep.txt").write_text("mine")
    with pytest.raises(fetch.FetchError, match="already exists and is not empty"):
        fetch.fetch_oxford_pets(root, COUNTS, 0, pet_dir, download=False)
    assert (root / "train" / "keep.txt").read_text() == "mine"


def test_fetch_oxford_pets_empty_root_is_fine(pet_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    fetch.fetch_oxford_pets(root, COUNTS, 0, pet_dir, download=False)
    assert len(list(root.glob("*/*/*.jpg"))) == 20


def test_fetch_oxford_pets_missing_without_download(tmp_path):
    with pytest.raises(fetch.FetchError, match="Dataset not found.*downloading was turned off"):
        fetch.fetch_oxford_pets(tmp_path / "d", COUNTS, 0, tmp_path / "empty", download=False)


def test_fetch_data_script(pet_dir, tmp_path, caplog):
    root = tmp_path / "data"
    args = [
        "--data-root",
        str(root),
        "--seed",
        "3",
        "--download-dir",
        str(pet_dir),
        "--no-download",
    ]
    proc = _run("fetch_data.py", *args, "--counts", '{"train": {"cats": 4, "dogs": 4}}')
    assert proc.returncode == 0, proc.stderr
    assert len(list((root / "train" / "cats").glob("*.jpg"))) == 4
    assert "skipped 2 undecodable images" in proc.stderr

    msg = _main_fails(caplog, "fetch_data", *args, "--counts", '{"train": {"cats": 4, "dogs": 4}}')
    assert msg.startswith("fetch_data: ") and "refusing to overwrite" in msg


def test_fetch_data_script_errors(pet_dir, tmp_path, caplog, capsys):
    args = [
        "--data-root",
        str(tmp_path / "d"),
        "--seed",
        "0",
        "--download-dir",
        str(pet_dir),
        "--no-download",
    ]
    # Bad JSON is an argument error: argparse names the option and exits with status 2.
    with pytest.raises(SystemExit) as exc:
        _load_script("fetch_data").main([*args, "--counts", "{train"])
    assert exc.value.code == 2
    assert "fetch_data: error: argument --counts: not valid JSON" in capsys.readouterr().err
    msg = _main_fails(caplog, "fetch_data", *args, "--counts", '{"train": {"cats": 99}}')
    assert "class 'cats' needs 99 valid images, only 10 available" in msg
    msg = _main_fails(caplog, "fetch_data", *args, "--counts", '{"train": 5}')
    assert msg.startswith("fetch_data: counts['train'] must map class -> number")
