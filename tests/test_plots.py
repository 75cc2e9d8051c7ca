"""transfer_learning.plots and the plot entry points, on small synthetic TSV rows.

Real matplotlib, real PNG and JPEG files; every figure is opened again with PIL.
"""

from __future__ import annotations

import functools
import logging
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import REPO, SCRIPTS, stage_checkpoint, write_images
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font
from matplotlib.text import Text
from PIL import Image
from transfer_learning import checkpoint, metrics, plots
from transfer_learning.demo import make_demo_dataset
from transfer_learning.io import read_tsv, write_tsv

DPI = plots.DPI


def history(epochs, val_losses=None):
    """History rows as read_tsv returns them (strings)."""
    val_losses = val_losses or [1.0 / e for e in range(1, epochs + 1)]
    return [
        {
            "epoch": str(e),
            "train_loss": f"{1.2 / e:.4f}",
            "train_acc": f"{min(1.0, 0.5 + 0.05 * e):.4f}",
            "val_loss": f"{loss:.4f}",
            "val_acc": f"{min(1.0, 0.45 + 0.05 * e):.4f}",
            "lr": "0.001",
            "seconds": "0.1",
        }
        for e, loss in zip(range(1, epochs + 1), val_losses, strict=True)
    ]


def predictions(classes, outcomes, split="test"):
    """predictions.tsv rows; outcomes are (true, predicted, probability of predicted)."""
    rows = []
    for i, (true, predicted, prob) in enumerate(outcomes):
        rest = (1 - prob) / (len(classes) - 1)
        row = {
            "split": split,
            "path": f"{split}/{true}/{true}.{i}.jpg",
            "true": true,
            "predicted": predicted,
            "probability": f"{prob:.4f}",
        }
        row.update({f"p_{c}": f"{prob if c == predicted else rest:.4f}" for c in classes})
        rows.append(row)
    return rows


def assert_png(path, size=None, min_bytes=5_000):
    """A complete PNG of the expected pixel size; no temporary file left beside it."""
    assert path.is_file()
    assert path.stat().st_size > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        if size is not None:
            assert image.size == size
        got = image.size
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    return got


def inches(width, height):
    return round(width * DPI), round(height * DPI)


# ---- learning curves ---------------------------------------------------------------------


def test_join_puts_finetune_epochs_after_the_heads():
    joined = plots.join_histories(history(5), history(3))
    assert [r["global_epoch"] for r in joined] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["stage"] for r in joined] == ["head"] * 5 + ["finetune"] * 3
    assert [r["epoch"] for r in joined] == [1, 2, 3, 4, 5, 1, 2, 3]
    assert joined[5]["val_loss"] == pytest.approx(1.0)  # values became floats


def test_join_without_finetune_and_from_paths(tmp_path):
    path = tmp_path / "history.tsv"
    write_tsv(path, history(4))
    joined = plots.join_histories(path, None)
    assert [r["global_epoch"] for r in joined] == [1, 2, 3, 4]


def test_best_epoch_is_the_lowest_validation_loss():
    assert plots.best_epoch_by_val_loss(history(4, [0.9, 0.5, 0.5, 0.7])) == 2
    assert plots.best_epoch_by_val_loss([]) is None


def test_learning_curves_png(tmp_path):
    out = tmp_path / "plots" / "learning_curves.png"
    got = plots.learning_curves(
        history(15, [0.8 - 0.01 * e for e in range(15)]),
        history(6, [0.9, 0.7, 0.6, 0.65, 0.7, 0.8]),
        out,
        best_epochs={"head": 15, "finetune": 3},
        title="baseline",
    )
    assert got == out
    assert_png(out, inches(12, 4.6), min_bytes=40_000)


def test_learning_curves_head_only_and_default_best(tmp_path):
    out = tmp_path / "lc.png"
    plots.learning_curves(history(3), None, out)
    assert_png(out, inches(12, 4.6))


def test_learning_curves_replace_an_existing_file(tmp_path):
    out = tmp_path / "lc.png"
    out.write_text("stale")
    plots.learning_curves(history(3), history(2), out)
    assert_png(out)


# ---- confusion matrix --------------------------------------------------------------------


CONFUSION = [
    {"split": split, "true": t, "predicted": p, "count": str(n)}
    for split, counts in (("val", [9, 1, 2, 8]), ("test", [17, 3, 5, 15]))
    for (t, p), n in zip(
        [("cats", "cats"), ("cats", "dogs"), ("dogs", "cats"), ("dogs", "dogs")],
        counts,
        strict=True,
    )
]


def test_confusion_counts_of_one_split():
    matrix, classes = plots.confusion_counts(CONFUSION, "test")
    assert classes == ["cats", "dogs"]
    assert matrix.tolist() == [[17, 3], [5, 15]]
    matrix, _ = plots.confusion_counts(CONFUSION, "val", ["dogs", "cats"])
    assert matrix.tolist() == [[8, 2], [1, 9]]


def test_confusion_matrix_png(tmp_path):
    out = tmp_path / "cm.png"
    plots.plot_confusion_matrix(CONFUSION, "test", ["cats", "dogs"], out, title="baseline")
    assert_png(out, inches(5.8, 4.8), min_bytes=15_000)


def test_confusion_matrix_many_classes(tmp_path):
    classes = [f"breed_with_a_long_name_{i}" for i in range(12)]
    rows = [
        {"split": "test", "true": t, "predicted": p, "count": str(5 if t == p else 1)}
        for t in classes
        for p in classes
    ]
    out = tmp_path / "cm.png"
    plots.plot_confusion_matrix(rows, "test", classes, out)
    width, height = assert_png(out)
    assert height > inches(5.8, 4.8)[1]  # grows with the classes


# ---- ROC -----------------------------------------------------------------------------------


def test_roc_two_classes_matches_metrics(tmp_path):
    rows = predictions(
        ["cats", "dogs"],
        [("cats", "cats", 0.9), ("cats", "dogs", 0.6), ("dogs", "dogs", 0.8)]
        + [("dogs", "cats", 0.7), ("dogs", "dogs", 0.95), ("cats", "cats", 0.55)],
    )
    (curve,) = plots.roc_curves(rows)
    assert curve["class"] == "dogs"
    true = np.array([r["true"] == "dogs" for r in rows], dtype=np.int64)
    score = np.array([float(r["p_dogs"]) for r in rows])
    assert curve["auc"] == pytest.approx(metrics.roc_auc(true, score))
    assert curve["decision"] == pytest.approx((1 / 3, 2 / 3))
    out = tmp_path / "roc.png"
    plots.plot_roc_curve(rows, out, title="baseline, fine-tune")
    assert_png(out, inches(6.2, 6.0), min_bytes=20_000)


def test_roc_three_classes_one_vs_rest(tmp_path):
    classes = ["bird", "cat", "dog"]
    outcomes = [(t, p, 0.5 + 0.1 * (i % 5)) for i, (t, p) in enumerate(
        [(t, t) for t in classes] * 3 + [("bird", "cat"), ("dog", "cat"), ("cat", "bird")]
    )]  # fmt: skip
    rows = predictions(classes, outcomes)
    curves = plots.roc_curves(rows)
    assert [c["class"] for c in curves] == classes
    assert all(0.5 < c["auc"] <= 1 for c in curves)
    assert all(c["fpr"][0] == 0 and c["tpr"][-1] == 1 for c in curves)
    out = tmp_path / "roc.png"
    plots.plot_roc_curve(rows, out)
    assert_png(out, inches(6.2, 6.0))


def test_roc_split_with_one_class_has_no_auc(tmp_path):
    rows = predictions(["cats", "dogs"], [("cats", "cats", 0.9), ("cats", "dogs", 0.7)])
    (curve,) = plots.roc_curves(rows)
    assert math.isnan(curve["auc"])
    assert curve["decision"] is None
    plots.plot_roc_curve(rows, tmp_path / "roc.png")
    assert_png(tmp_path / "roc.png")


# ---- mistakes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    counts = {"test": {"cats": 6, "dogs": 6}}
    return write_images(tmp_path_factory.mktemp("images"), counts, size=40, seed=1)


def real_predictions(root, wrong):
    """Predictions for the real test images; `wrong` maps path -> probability of a mistake."""
    rows = []
    for path in sorted(p for p in root.rglob("*.jpg")):
        relative = path.relative_to(root).as_posix()
        true = path.parent.name
        other = "dogs" if true == "cats" else "cats"
        if relative in wrong:
            rows += predictions(["cats", "dogs"], [(true, other, wrong[relative])])
        else:
            rows += predictions(["cats", "dogs"], [(true, true, 0.8)])
        rows[-1]["path"] = relative
    return rows


def test_worst_mistakes_most_confident_first(image_root):
    paths = sorted(p.relative_to(image_root).as_posix() for p in image_root.rglob("*.jpg"))
    wrong = {paths[0]: 0.6, paths[3]: 0.95, paths[7]: 0.75}
    rows = real_predictions(image_root, wrong)
    rows += predictions(["cats", "dogs"], [("cats", "dogs", 0.99)], split="val")
    worst = plots.worst_mistakes(rows, "test")
    assert [r["path"] for r in worst] == [paths[3], paths[7], paths[0]]
    assert [r["path"] for r in plots.worst_mistakes(rows, "test", n=1)] == [paths[3]]


def test_mistakes_gallery_png(image_root, tmp_path):
    paths = sorted(p.relative_to(image_root).as_posix() for p in image_root.rglob("*.jpg"))
    wrong = {p: 0.55 + 0.04 * i for i, p in enumerate(paths[:6])}
    out = tmp_path / "mistakes.png"
    plots.mistakes_gallery(real_predictions(image_root, wrong), image_root, out, n=5)
    # 5 shown: 4 columns, 2 rows of 3.0 x 3.3 inches plus room for the titles.
    assert_png(out, inches(3.0 * 4 + 0.4, 3.3 * 2 + 0.7), min_bytes=30_000)


def test_mistakes_gallery_missing_image(tmp_path):
    rows = predictions(["cats", "dogs"], [("cats", "dogs", 0.9)])
    out = tmp_path / "mistakes.png"
    plots.mistakes_gallery(rows, tmp_path / "no_such_root", out)
    assert_png(out, inches(3.0 + 0.4, 3.3 + 0.7))


def test_mistakes_gallery_without_mistakes(image_root, tmp_path):
    rows = real_predictions(image_root, {})
    assert plots.worst_mistakes(rows) == []
    out = tmp_path / "mistakes.png"
    plots.mistakes_gallery(rows, image_root, out)
    assert_png(out, inches(7, 2.4), min_bytes=3_000)


# ---- legibility: no text overlaps, every letter has a glyph ---------------------------------

LONG_TRUE = "Staffordshire_bull_terrier_with_a_very_long_class_name"
LONG_PREDICTED = "American_pit_bull_terrier_also_with_a_long_name"
CJK = ("猫", "犬")


def text_boxes(fig):
    """(text, window extent) of every visible, non-empty text of the drawn figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [
        (t, t.get_window_extent(renderer))
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip()
    ]


def assert_legible(fig):
    """No two texts overlap, no text overlaps another axes' image or leaves the figure."""
    boxes = text_boxes(fig)
    assert boxes
    for text, box in boxes:
        inside = fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 0.5
        assert inside and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1 + 0.5, (
            f"{text.get_text()!r} leaves the figure: {box} not in {fig.bbox}"
        )
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), f"{a.get_text()!r} overlaps {b.get_text()!r}"
    for text, box in boxes:
        for ax in fig.axes:
            if text.axes is not ax:
                assert not box.overlaps(ax.get_window_extent()), (
                    f"{text.get_text()!r} overlaps an image"
                )


def gallery_rows(root, n, true, predicted, long_files=False):
    """`n` mistakes of the test split: real images of `root`, every third one missing."""
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    rows = []
    for i in range(n):
        path = paths[i % len(paths)] if i % 3 else f"test/missing_{i}.jpg"
        if long_files:
            path = f"test/{'a_very_long_file_name_from_a_camera_' * 3}{i}.jpeg"
        (row,) = predictions([true, predicted], [(true, predicted, 0.99 - 0.01 * i)])
        rows.append({**row, "path": path})
    return rows


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 40])
def test_mistakes_gallery_texts_never_overlap(image_root, n):
    rows = gallery_rows(image_root, n, LONG_TRUE, LONG_PREDICTED, long_files=n % 2 == 1)
    title = "an_experiment_with_a_long_name, fine-tune"
    fig = plots.mistakes_figure(rows, image_root, n=n, title=title)
    assert len([ax for ax in fig.axes if ax.images or ax.texts]) == n
    assert_legible(fig)
    texts = [t.get_text() for t, _ in text_boxes(fig)]
    assert sum(t.startswith("true: Staffordshire_bull") and "…" in t for t in texts) == n
    if n % 2:
        assert sum(t.startswith("a_very_long_file_name") and "…" in t for t in texts) == n


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "images"
    make_demo_dataset(root, {"test": {"circles": 8, "squares": 8}})
    return root


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_mistakes_gallery_of_the_demo_never_overlaps(demo_root, n):
    """The demo's images and names: file names used to leave the figure or hit the titles."""
    rows = []
    for i, path in enumerate(sorted(demo_root.rglob("*.jpg"))):
        true = path.parent.name
        wrong = {"circles": "squares", "squares": "circles"}[true] if i < n else true
        (row,) = predictions(["circles", "squares"], [(true, wrong, 0.6 + 0.02 * i)])
        rows.append({**row, "path": path.relative_to(demo_root).as_posix()})
    fig = plots.mistakes_figure(rows, demo_root, title="baseline, fine-tune")
    assert_legible(fig)
    texts = " ".join(t.get_text() for t, _ in text_boxes(fig))
    assert "true: circles" in texts and "predicted: squares (" in texts
    assert "…" not in texts  # short names are not cut


def test_mistakes_gallery_without_mistakes_is_legible(image_root):
    rows = real_predictions(image_root, {})
    fig = plots.mistakes_figure(rows, image_root, title="x" * 80 + " fine-tune")
    assert_legible(fig)


@functools.cache
def system_font_has(letters):
    """Whether any font file of the system has all `letters` (independent of plots)."""
    for path in font_manager.findSystemFonts():
        try:
            charmap = FT2Font(path).get_charmap()
        except (OSError, RuntimeError, ValueError):
            continue
        if all(ord(c) in charmap for c in letters):
            return True
    return False


needs_cjk_font = pytest.mark.skipif(
    not system_font_has("".join(CJK)),
    reason=f"no installed font has {CJK}: apt-get install fonts-wqy-microhei",
)


def cjk_figures(root):
    cat, dog = CJK
    rows = predictions(
        [cat, dog],
        [(cat, dog, 0.9), (dog, cat, 0.8), (cat, cat, 0.7), (dog, dog, 0.6)],
    )
    confusion = [
        {"split": "test", "true": t, "predicted": p, "count": "3"} for t in CJK for p in CJK
    ]
    title = f"{cat}{dog}, fine-tune"
    return [
        plots.confusion_matrix_figure(confusion, "test", list(CJK), title),
        plots.roc_curve_figure(rows, title=title),
        plots.mistakes_figure(rows, root, title=title),
    ]


@needs_cjk_font
def test_cjk_class_names_are_drawn_with_a_font_that_has_them(image_root, caplog):
    caplog.set_level(logging.WARNING)
    figures = cjk_figures(image_root)
    for fig in figures:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            boxes = text_boxes(fig)
        assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]
        cjk_texts = [t for t, _ in boxes if set(t.get_text()) & set(CJK)]
        assert cjk_texts
        for text in cjk_texts:
            fonts = [
                font_manager.findfont(
                    font_manager.FontProperties(family=[family]), fallback_to_default=False
                )
                for family in text.get_fontfamily()
            ]
            charmaps = [FT2Font(f, face_index=f.face_index).get_charmap() for f in fonts]
            for letter in set(text.get_text()) & set(CJK):
                assert any(ord(letter) in charmap for charmap in charmaps), (text, fonts)
    assert_legible(figures[2])
    assert not [r for r in caplog.records if r.name == plots.__name__]


@needs_cjk_font
def test_font_lookup_finds_a_font_matplotlib_did_not_list(monkeypatch):
    """A font installed after matplotlib cached its font list is still found."""
    cjk = {ord(c) for c in CJK}
    listed = [
        e for e in font_manager.fontManager.ttflist if not cjk & plots._charmap(e.fname, e.index)
    ]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", listed)
    plots.font_family_for.cache_clear()
    try:
        family = plots.font_family_for("".join(CJK))
        assert family is not None
        path = font_manager.findfont(
            font_manager.FontProperties(family=[family]), fallback_to_default=False
        )
        assert cjk <= set(FT2Font(path, face_index=path.face_index).get_charmap())
    finally:
        plots.font_family_for.cache_clear()


def test_missing_font_is_one_warning_and_the_plots_are_drawn(
    image_root, tmp_path, monkeypatch, caplog
):
    """No installed font has the letters: every plot is drawn, one warning says what to do."""
    monkeypatch.setattr(plots, "font_family_for", lambda letters: None)
    monkeypatch.setattr(plots, "_WARNED", set())
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, fig in enumerate(cjk_figures(image_root)):
            assert_png(plots._save(fig, tmp_path / f"{i}.png"), min_bytes=3_000)
        plots.plot_roc_curve(predictions(list(CJK), [(CJK[0], CJK[1], 0.9)]), tmp_path / "roc.png")
    records = [r for r in caplog.records if r.name == plots.__name__]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "\n" not in message
    assert all(c in message for c in CJK) and plots.FONT_PACKAGE in message
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert_png(tmp_path / "roc.png")


def test_plots_do_not_import_torch():
    code = "import sys, transfer_learning.plots; sys.exit('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stderr or "transfer_learning.plots imported torch"


# ---- experiments compared ----------------------------------------------------------------


def summary(n_experiments=3):
    rows = []
    for i in range(n_experiments):
        for stage in ("finetune", "head"):
            rows.append(
                {
                    "experiment": f"lr{i}",
                    "stage": stage,
                    "finetune.lr": f"1e-0{i + 3}",
                    "test_accuracy": str(0.9 - 0.1 * i - (0.2 if stage == "head" else 0)),
                    "test_macro_f1": str(0.88 - 0.1 * i),
                    "test_roc_auc": "",
                    "test_loss": "0.3",
                    "epochs_run": "5",
                    "best_epoch": "3",
                    "train_seconds": "1.5",
                    "best": "yes" if i == 0 and stage == "finetune" else "",
                }
            )
    return rows


def test_compare_experiments_png(tmp_path):
    out = tmp_path / "experiments.png"
    plots.compare_experiments(summary(3), out)
    width, height = assert_png(out, min_bytes=20_000)
    assert width == round((5.2 * 2 + 2.2) * DPI)
    taller = tmp_path / "more.png"
    plots.compare_experiments(summary(8), taller, "test_accuracy")
    more_width, more_height = assert_png(taller)
    assert more_height > height and more_width < width  # one panel, more rows


def test_compare_experiments_missing_metric_values(tmp_path):
    out = tmp_path / "auc.png"
    plots.compare_experiments(summary(2), out, ["test_roc_auc"])  # all empty: n/a
    assert_png(out)


def test_experiment_label_lists_overrides():
    assert plots._experiment_label(summary(1)[0]) == "lr0\nfinetune.lr=1e-03"


# ---- tables ------------------------------------------------------------------------------


def test_metrics_table(tmp_path):
    head = [{"split": "val", "n": "40", "accuracy": "0.75", "macro_f1": "0.7499999"}]
    finetune = [
        {"split": "val", "n": "40", "accuracy": "0.9", "macro_f1": "0.9"},
        {"split": "test", "n": "40", "accuracy": "0.85", "macro_f1": "0.849"},
    ]
    out = tmp_path / "metrics.html"
    plots.metrics_table({"head": head, "finetune": finetune}, out, "Metrics of <b>x</b>")
    text = out.read_text()
    assert "<th>head, val</th><th>fine-tune, val</th><th>fine-tune, test</th>" in text
    assert "<tr><td>accuracy</td><td>0.75</td><td>0.9</td><td>0.85</td></tr>" in text
    assert "<td>n</td><td>40</td>" in text
    assert "<tr><td>macro_f1</td><td>0.75</td><td>0.9</td><td>0.849</td></tr>" in text
    assert "&lt;b&gt;x&lt;/b&gt;" in text  # escaped


def test_summary_table_highlights_the_best(tmp_path):
    out = tmp_path / "summary.html"
    plots.summary_table(summary(2), out)
    text = out.read_text()
    assert text.count('<tr class="best">') == 1
    assert '<tr class="best"><td>lr0</td><td>finetune</td>' in text
    assert "<th>finetune.lr</th>" in text


# ---- entry points ------------------------------------------------------------------------


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_plot_stage_script(image_root, tmp_path):
    paths = sorted(p.relative_to(image_root).as_posix() for p in image_root.rglob("*.jpg"))
    predictions_tsv = tmp_path / "predictions.tsv"
    write_tsv(predictions_tsv, real_predictions(image_root, {paths[1]: 0.8}))
    confusion_tsv = tmp_path / "confusion.tsv"
    write_tsv(confusion_tsv, CONFUSION)
    out = tmp_path / "plots"
    proc = run_script(
        "plot_stage.py",
        "--experiment", "baseline", "--stage", "finetune",
        "--predictions", predictions_tsv, "--confusion", confusion_tsv,
        "--data-root", image_root, "--split", "test",
        "--confusion-matrix", out / "cm.png", "--roc-curve", out / "roc.png",
        "--mistakes", out / "mistakes.png",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("cm.png", "roc.png", "mistakes.png"):
        assert_png(out / name)


@needs_cjk_font
def test_plot_stage_script_cjk_class_names(demo_root, tmp_path):
    """A fresh process finds the CJK font (even one newer than matplotlib's font cache)."""
    cat, dog = CJK
    rows = []
    for i, path in enumerate(sorted(demo_root.rglob("*.jpg"))):
        true = cat if path.parent.name == "circles" else dog
        wrong = (dog if true == cat else cat) if i % 4 == 0 else true
        (row,) = predictions([cat, dog], [(true, wrong, 0.55 + 0.02 * i)])
        rows.append({**row, "path": path.relative_to(demo_root).as_posix()})
    write_tsv(tmp_path / "predictions.tsv", rows)
    confusion = [
        {"split": "test", "true": t, "predicted": p, "count": "4"} for t in CJK for p in CJK
    ]
    write_tsv(tmp_path / "confusion.tsv", confusion)
    proc = run_script(
        "plot_stage.py",
        "--experiment", f"{cat}{dog}", "--stage", "finetune",
        "--predictions", tmp_path / "predictions.tsv",
        "--confusion", tmp_path / "confusion.tsv",
        "--data-root", demo_root, "--split", "test",
        "--confusion-matrix", tmp_path / "cm.png", "--roc-curve", tmp_path / "roc.png",
        "--mistakes", tmp_path / "mistakes.png",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr and "missing from font" not in proc.stderr, proc.stderr
    for name in ("cm.png", "roc.png", "mistakes.png"):
        assert_png(tmp_path / name)


def test_plot_stage_script_unknown_split(image_root, tmp_path):
    predictions_tsv = tmp_path / "predictions.tsv"
    write_tsv(predictions_tsv, real_predictions(image_root, {}))
    proc = run_script(
        "plot_stage.py",
        "--experiment", "baseline", "--stage", "head",
        "--predictions", predictions_tsv, "--confusion", predictions_tsv,
        "--data-root", image_root, "--split", "holdout",
        "--confusion-matrix", tmp_path / "cm.png", "--roc-curve", tmp_path / "roc.png",
        "--mistakes", tmp_path / "mistakes.png",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "no predictions for split 'holdout'" in proc.stderr
    assert not list(tmp_path.glob("*.png"))


def test_plot_summary_script(tmp_path):
    summary_tsv = tmp_path / "summary.tsv"
    write_tsv(summary_tsv, summary(2))
    proc = run_script(
        "plot_summary.py", "--summary", summary_tsv,
        "--chart", tmp_path / "experiments.png", "--table", tmp_path / "summary.html",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "experiments.png")
    assert "lr1" in (tmp_path / "summary.html").read_text()
    proc = run_script(
        "plot_summary.py", "--summary", summary_tsv, "--metrics", "test_f2",
        "--chart", tmp_path / "x.png", "--table", tmp_path / "x.html",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "has no column test_f2" in proc.stderr


def test_plot_experiment_script(tmp_path):
    for stage, epochs in (("head", 4), ("finetune", 3)):
        write_tsv(tmp_path / f"{stage}_history.tsv", history(epochs))
        write_tsv(tmp_path / f"{stage}_metrics.tsv", [{"split": "test", "accuracy": "0.8"}])
    checkpoint.save(stage_checkpoint(best_epoch=2, epochs_run=4), tmp_path / "head.pt")
    proc = run_script(
        "plot_experiment.py", "--experiment", "baseline",
        "--head-checkpoint", tmp_path / "head.pt",
        "--head-history", tmp_path / "head_history.tsv",
        "--finetune-history", tmp_path / "finetune_history.tsv",
        "--head-metrics", tmp_path / "head_metrics.tsv",
        "--finetune-metrics", tmp_path / "finetune_metrics.tsv",
        "--learning-curves", tmp_path / "lc.png", "--metrics-table", tmp_path / "m.html",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "lc.png", inches(12, 4.6))
    assert read_tsv(tmp_path / "head_metrics.tsv")  # inputs untouched
    assert "Metrics of baseline" in (tmp_path / "m.html").read_text()
