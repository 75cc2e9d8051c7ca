"""Figures and tables of a run: learning curves, confusion matrix, ROC, mistakes, comparison.

Every function takes rows as `io.read_tsv` returns them (dicts of strings; numbers work
too) or the TSV's path, writes one PNG (or HTML table) atomically and returns its path;
the `*_figure` functions build the figure without saving it. Figures are built on
matplotlib's Agg canvas directly, never through pyplot, so nothing needs a display and no
figure outlives its function.

Class names, experiment names and titles can be in any script: each figure's texts fall
back to an installed font that has their letters (`font_families`); when no installed font
has some, the figure is drawn anyway (those letters as boxes) and one warning says which
letters and which font package to install.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import math
import os
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator, PercentFormatter
from PIL import Image

from . import metrics
from .io import atomic_path, read_tsv

# Class, file and experiment names are text, never formulas: "$5 $10" must not turn into math.
mpl.rcParams["text.parse_math"] = False

_log = logging.getLogger(__name__)

DPI = 120
TRAIN_COLOR, VAL_COLOR = "tab:blue", "tab:orange"
STAGE_COLORS = {"head": "#9ecae1", "finetune": "#2171b5"}
STAGE_NAMES = {"head": "head", "finetune": "fine-tune"}
MISTAKE_COLOR = "#c0392b"
HISTORY_VALUES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
# The font package the missing-letters warning suggests: Chinese, Japanese and Korean.
FONT_PACKAGE = "fonts-noto-cjk"

Rows = Sequence[Mapping] | str | os.PathLike


# ---- helpers -----------------------------------------------------------------------------


def _rows(rows: Rows | None) -> list[Mapping]:
    """Rows as given, or read from a TSV path; None stands for no rows."""
    if rows is None:
        return []
    if isinstance(rows, (str, os.PathLike)):
        return read_tsv(rows)
    return list(rows)


def _float(value) -> float:
    """A cell as a float; empty cells and None become NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | os.PathLike) -> Path:
    """Write the figure as PNG under a temporary name, then rename it onto `out`."""
    with atomic_path(out) as tmp, _quiet_font_warnings():
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(out)


def _short(text, width: int = 24) -> str:
    """`text` cut to `width` characters in the middle, where an ellipsis marks the cut.

    Class names often share a prefix and have no spaces (textwrap.shorten would drop
    them whole), so both ends stay.
    """
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    tail = (width - 1) // 3
    return f"{text[: width - 1 - tail]}…{text[len(text) - tail :]}"


def _split_rows(rows: Iterable[Mapping], split: str) -> list[Mapping]:
    return [r for r in rows if r.get("split") == split]


def probability_classes(rows: Sequence[Mapping]) -> list[str]:
    """Class names in model order, from the p_<class> columns of predictions.tsv."""
    if not rows:
        return []
    return [c[2:] for c in rows[0] if c.startswith("p_")]


def _title(*parts: str | None) -> str:
    return " — ".join(p for p in parts if p)


# ---- fonts -------------------------------------------------------------------------------

# Letters already named in a missing-font warning: one warning per letter and process.
_WARNED: set[str] = set()


@functools.cache
def _charmap(path: str, face_index: int = 0) -> frozenset[int]:
    """The code points one face of a font file has glyphs for; empty if it cannot be read."""
    try:
        return frozenset(FT2Font(path, face_index=face_index).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _family_charmap(family: str) -> frozenset[int]:
    """The code points of the font matplotlib draws `family` (or a generic family) with."""
    try:
        path = font_manager.findfont(
            font_manager.FontProperties(family=[family]), fallback_to_default=False
        )
    except ValueError:
        return frozenset()
    return _charmap(str(path), getattr(path, "face_index", 0))


@functools.cache
def font_family_for(chars: str) -> str | None:
    """The family of the installed font that has glyphs for the most of `chars`, or None.

    Looks through matplotlib's font list first, then through the system's font files that
    list lacks (a font installed after matplotlib cached its list), registering the one
    it picks with matplotlib. Matplotlib's Last Resort font (boxes) does not count.
    """
    wanted = {ord(c) for c in chars}
    best, best_count, unlisted, seen = None, 0, None, set()
    for entry in font_manager.fontManager.ttflist:
        face = (os.path.realpath(entry.fname), entry.index)
        if face in seen or entry.name.startswith("Last Resort"):
            continue
        seen.add(face)
        count = len(wanted & _charmap(*face))
        if count > best_count:
            best, best_count = entry.name, count
    if best_count < len(wanted):
        listed = {path for path, _ in seen}
        for path in sorted(font_manager.findSystemFonts()):
            if os.path.realpath(path) in listed:
                continue
            count = len(wanted & _charmap(path))
            if count > best_count:
                unlisted, best_count = path, count
    if unlisted is not None:
        font_manager.fontManager.addfont(unlisted)
        best = font_manager.ttfFontProperty(FT2Font(unlisted)).name
    return best


def font_families(texts: Iterable) -> list[str]:
    """rcParams' font families, then installed fonts for the letters of `texts` they lack.

    Matplotlib draws each glyph from the first family in the list that has it. Letters
    that no installed font has get one warning (per process) naming them and the fix;
    they are drawn as boxes.
    """
    families = list(mpl.rcParams["font.family"])
    covered = set().union(*(_family_charmap(f) for f in families))
    letters = {c for t in texts if t is not None for c in str(t)}
    missing = "".join(sorted(c for c in letters if c.isprintable() and not c.isspace()))
    missing = "".join(c for c in missing if ord(c) not in covered)
    while missing:
        family = font_family_for(missing)
        found = _family_charmap(family) if family and family not in families else frozenset()
        if not any(ord(c) in found for c in missing):
            break
        families.append(family)
        missing = "".join(c for c in missing if ord(c) not in found)
    new = [c for c in missing if c not in _WARNED]
    if new:
        _WARNED.update(new)
        named = ", ".join(f"{c} (U+{ord(c):04X})" for c in new[:12])
        more = f" and {len(new) - 12} more" if len(new) > 12 else ""
        _log.warning(
            "no installed font has the letters %s%s: plots draw them as boxes; install a font "
            "that has them, e.g. `apt-get install %s` for Chinese, Japanese and Korean",
            named,
            more,
            FONT_PACKAGE,
        )
    return families


def _not_a_weight_warning(record: logging.LogRecord) -> bool:
    """False for matplotlib's note that a (fallback) font has no bold: it draws it regular."""
    return not str(record.msg).startswith("findfont: Failed to find font weight")


@contextlib.contextmanager
def _quiet_font_warnings() -> Iterator[None]:
    """No warning from matplotlib per missing glyph and draw, nor per font without bold.

    font_families has warned once of the missing letters; a bold text in a fallback font
    without bold is drawn regular.
    """
    font_log = logging.getLogger("matplotlib.font_manager")
    font_log.addFilter(_not_a_weight_warning)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
            yield
    finally:
        font_log.removeFilter(_not_a_weight_warning)


def _flat(texts: Iterable) -> list:
    """Texts, with lists and tuples of texts among them opened up."""
    return [x for t in texts for x in (t if isinstance(t, (list, tuple)) else [t])]


def _use_fonts(fig: Figure, *texts) -> Figure:
    """Every text of `fig` in `font_families(texts)`: fallbacks for the letters of `texts`.

    Tick labels made later copy the fonts of the first tick's label.
    """
    families = font_families(_flat(texts))
    if families != list(mpl.rcParams["font.family"]):
        for text in fig.findobj(Text):
            text.set_fontfamily(families)
    return fig


@contextlib.contextmanager
def _fonts_for(*texts) -> Iterator[list[str]]:
    """Texts made inside use `font_families(texts)`, as the gallery's measured texts must."""
    families = font_families(_flat(texts))
    with mpl.rc_context({"font.family": families}), _quiet_font_warnings():
        yield families


# ---- learning curves ---------------------------------------------------------------------


def best_epoch_by_val_loss(history: Sequence[Mapping]) -> int | None:
    """The epoch with the lowest validation loss (the first one on ties)."""
    best = None
    for row in history:
        loss = _float(row["val_loss"])
        if not math.isnan(loss) and (best is None or loss < best[1]):
            best = (int(row["epoch"]), loss)
    return None if best is None else best[0]


def join_histories(head_history: Rows, finetune_history: Rows | None) -> list[dict]:
    """Both stages on one epoch axis: fine-tune epoch k becomes (last head epoch) + k.

    Each row keeps its stage, its own epoch and gets `global_epoch`; values become floats.
    """
    joined, offset = [], 0
    for stage, history in (("head", head_history), ("finetune", finetune_history)):
        last = offset
        for row in _rows(history):
            epoch = int(row["epoch"])
            joined.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "global_epoch": offset + epoch,
                    **{k: _float(row.get(k)) for k in HISTORY_VALUES},
                }
            )
            last = max(last, offset + epoch)
        offset = last
    return joined


def learning_curves(
    head_history: Rows,
    finetune_history: Rows | None,
    out: str | os.PathLike,
    best_epochs: Mapping[str, int | None] | None = None,
    title: str | None = None,
) -> Path:
    """Loss and accuracy, train vs val, head then fine-tune on one epoch axis.

    `best_epochs` maps stage -> the epoch whose weights the stage kept (the checkpoint's
    best_epoch); a stage missing from it gets the epoch with the lowest validation loss.
    """
    rows = join_histories(head_history, finetune_history)
    best_epochs = dict(best_epochs or {})
    stages = [s for s in ("head", "finetune") if any(r["stage"] == s for r in rows)]
    fig = _figure(12, 4.6)
    loss_ax, acc_ax = fig.subplots(1, 2)
    head_end = max((r["global_epoch"] for r in rows if r["stage"] == "head"), default=0)

    panels = ((loss_ax, "loss", "loss (cross-entropy)"), (acc_ax, "acc", "accuracy"))
    for ax, key, label in panels:
        for stage in stages:
            part = [r for r in rows if r["stage"] == stage]
            x = [r["global_epoch"] for r in part]
            # Each stage is its own line: fine-tuning starts from the head's best weights,
            # not its last ones, so joining the stages with a segment would mislead.
            ax.plot(x, [r[f"train_{key}"] for r in part], "-o", ms=3, color=TRAIN_COLOR)
            ax.plot(x, [r[f"val_{key}"] for r in part], "--o", ms=3, color=VAL_COLOR)
            best = best_epochs.get(stage) or best_epoch_by_val_loss(part)
            marked = [r for r in part if r["epoch"] == best]
            if marked:
                ax.plot(
                    marked[0]["global_epoch"],
                    marked[0][f"val_{key}"],
                    "*",
                    ms=16,
                    color=VAL_COLOR,
                    markeredgecolor="black",
                    zorder=5,
                )
        if "finetune" in stages and head_end:
            last = max(r["global_epoch"] for r in rows)
            ax.axvspan(head_end + 0.5, last + 0.5, color="0.92", zorder=0)
            ax.axvline(head_end + 0.5, color="0.4", ls=":", lw=1.2)
            # Stage names on either side of the boundary, where they never collide.
            for x, text, align in (
                (head_end + 0.3, "head ", "right"),
                (head_end + 0.7, " fine-tune", "left"),
            ):
                ax.text(
                    x, 0.985, text, transform=ax.get_xaxis_transform(), ha=align, va="top",
                    fontsize=9, color="0.3",
                )  # fmt: skip
        ax.set_xlabel("epoch (fine-tune epochs continue after the head's)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if rows:
            ax.set_xlim(0.5, max(r["global_epoch"] for r in rows) + 0.5)
    loss_ax.set_title("Loss (lower is better)")
    acc_ax.set_title("Accuracy (higher is better)")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    acc_ax.set_ylim(0, 1.12)
    top = max((max(r["train_loss"], r["val_loss"]) for r in rows), default=1.0)
    loss_ax.set_ylim(0, top * 1.15 if math.isfinite(top) and top > 0 else 1.0)
    handles = [
        Line2D([], [], color=TRAIN_COLOR, marker="o", ms=3, label="train"),
        Line2D([], [], color=VAL_COLOR, ls="--", marker="o", ms=3, label="validation"),
        Line2D(
            [],
            [],
            color=VAL_COLOR,
            marker="*",
            ms=12,
            ls="",
            markeredgecolor="black",
            label="best epoch of the stage (weights kept)",
        ),
    ]
    if "finetune" in stages:
        handles.append(Patch(color="0.92", label="fine-tune stage"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(_title("Learning curves", title), fontsize=13)
    if not rows:
        loss_ax.text(0.5, 0.5, "no epochs recorded", ha="center", transform=loss_ax.transAxes)
    return _save(_use_fonts(fig, title), out)


# ---- confusion matrix --------------------------------------------------------------------


def confusion_counts(
    rows: Rows, split: str, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Counts (rows true, columns predicted) of one split from confusion.tsv rows."""
    rows = _split_rows(_rows(rows), split)
    if classes is None:
        classes = list(dict.fromkeys(c for r in rows for c in (r["true"], r["predicted"])))
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r in rows:
        matrix[index[r["true"]], index[r["predicted"]]] += int(float(r["count"]))
    return matrix, list(classes)


def plot_confusion_matrix(
    confusion_rows: Rows,
    split: str,
    classes: Sequence[str] | None,
    out: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Heatmap of counts, true class down, predicted class across, each cell annotated."""
    return _save(confusion_matrix_figure(confusion_rows, split, classes, title), out)


def confusion_matrix_figure(
    confusion_rows: Rows, split: str, classes: Sequence[str] | None, title: str | None = None
) -> Figure:
    """The figure plot_confusion_matrix saves."""
    matrix, classes = confusion_counts(confusion_rows, split, classes)
    k = len(classes)
    side = min(max(4.8, 0.55 * k + 2.8), 22)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    fontsize = 12 if k <= 4 else 9 if k <= 10 else 8 if k <= 20 else 6
    for i in range(k):
        for j in range(k):
            text = f"{matrix[i, j]}"
            if k <= 10:
                text += f"\n({share[i, j]:.0%})"
            dark = matrix[i, j] > 0.55 * matrix.max()
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
                fontweight="bold" if i == j else "normal",
            )
    names = [_short(c, 20) for c in classes]
    # Upright while the names fit side by side (CJK letters count twice: they are wide).
    widths = [sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in n) for n in names]
    upright = k <= 4 and max(widths, default=0) * k <= 24
    ax.set_xticks(
        range(k),
        names,
        rotation=0 if upright else 45,
        ha="center" if upright else "right",
    )
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    n, correct = int(matrix.sum()), int(np.trace(matrix))
    accuracy = f"accuracy {correct / n:.1%} ({correct}/{n})" if n else "no images"
    ax.set_title(f"{_title('Confusion matrix', title)}\n{split} split: {accuracy}", fontsize=11)
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    return _use_fonts(fig, title, classes)


# ---- ROC ---------------------------------------------------------------------------------


def roc_curves(prediction_rows: Rows, split: str = "test") -> list[dict]:
    """One ROC curve per positive class of a split's predictions.

    Two classes: one curve, the second class (the model's class 1, as metrics.tsv's
    roc_auc) positive. Three or more: one curve per class against the rest. Each curve
    has the class, fpr, tpr, auc (NaN when the split lacks positives or negatives) and
    `decision`, the (fpr, tpr) of the model's own choice (the most probable class).
    """
    rows = _split_rows(_rows(prediction_rows), split)
    classes = probability_classes(rows)
    true = np.array([r["true"] for r in rows])
    predicted = np.array([r["predicted"] for r in rows])
    curves = []
    for name in classes[1:] if len(classes) == 2 else classes:
        positive = (true == name).astype(np.int64)
        score = np.array([_float(r[f"p_{name}"]) for r in rows])
        fpr, tpr = metrics.roc_curve(positive, score)
        decision = None
        if positive.any() and not positive.all():
            chosen = predicted == name
            decision = (chosen[positive == 0].mean(), chosen[positive == 1].mean())
        curves.append(
            {
                "class": name,
                "fpr": fpr,
                "tpr": tpr,
                "auc": metrics.roc_auc(positive, score),
                "decision": decision,
            }
        )
    return curves


def plot_roc_curve(
    prediction_rows: Rows,
    out: str | os.PathLike,
    split: str = "test",
    title: str | None = None,
) -> Path:
    """ROC curve of a split's predicted probabilities; one-vs-rest for 3+ classes."""
    return _save(roc_curve_figure(prediction_rows, split, title), out)


def roc_curve_figure(
    prediction_rows: Rows, split: str = "test", title: str | None = None
) -> Figure:
    """The figure plot_roc_curve saves."""
    rows = _split_rows(_rows(prediction_rows), split)
    curves = roc_curves(rows, split)
    binary = len(probability_classes(rows)) == 2
    fig = _figure(6.2, 6.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", label="chance (AUC = 0.5)")
    many = len(curves) > 10
    for i, curve in enumerate(curves):
        color = f"C{i % 10}"
        auc = "n/a" if math.isnan(curve["auc"]) else f"{curve['auc']:.3f}"
        name = _short(curve["class"])
        label = f"positive class {name}" if binary else f"{name} vs rest"
        ax.plot(
            curve["fpr"],
            curve["tpr"],
            color=color,
            lw=1 if many else 2,
            label=f"{label} (AUC = {auc})",
        )
        if curve["decision"] is not None:
            ax.plot(*curve["decision"], "o", color=color, ms=7, markeredgecolor="black")
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="model's decision")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity, recall)")
    aucs = [c["auc"] for c in curves if not math.isnan(c["auc"])]
    if not aucs:
        summary = "AUC n/a"
    elif binary:
        summary = f"AUC {aucs[0]:.3f}"
    else:
        summary = f"one-vs-rest, mean AUC {np.mean(aucs):.3f}"
    heading = _title("ROC curve", title)
    ax.set_title(f"{heading}\n{split} split, n = {len(rows)}: {summary}")
    ax.legend(loc="lower right", fontsize=6 if many else 9)
    return _use_fonts(fig, title, [c["class"] for c in curves])


# ---- mistakes ----------------------------------------------------------------------------


def worst_mistakes(prediction_rows: Rows, split: str = "test", n: int = 16) -> list[Mapping]:
    """Wrong predictions of a split, the most confident first."""
    rows = _split_rows(_rows(prediction_rows), split)
    wrong = [r for r in rows if r["true"] != r["predicted"]]
    return sorted(wrong, key=lambda r: -_float(r["probability"]))[:n]


def _thumbnail(path: Path, size: int = 256) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return np.asarray(image)
    except (OSError, ValueError):
        return None


GALLERY_COLUMNS = 4
GALLERY_CELL = (3.0, 3.3)  # inches per mistake: the image, two title lines, the file name
GALLERY_MARGIN = 0.2  # inches left and right of the images
GALLERY_GAP = 0.06  # inches between a text and what it labels


def _text_width(text: Text, renderer, value: str) -> float:
    """The width in pixels of `value` drawn as `text` (which is left showing `value`)."""
    text.set_text(value)
    return text.get_window_extent(renderer).width


def _fit(text: Text, renderer, value, render: Callable[[str], str], width: float) -> str:
    """render(value), `value` shortened in the middle until it fits `width` pixels as `text`.

    `text` is left showing the result; the font is the text's own, fallbacks included,
    so wide letters (CJK) are shortened more than narrow ones.
    """
    value = " ".join(str(value).split())
    if _text_width(text, renderer, render(value)) <= width:
        return render(value)
    low, high = 1, len(value) - 1  # the longest _short(value, n) that fits, n in low..high
    while low < high:
        middle = (low + high + 1) // 2
        if _text_width(text, renderer, render(_short(value, middle))) <= width:
            low = middle
        else:
            high = middle - 1
    result = render(_short(value, low))
    text.set_text(result)
    return result


def _wrap(text: Text, renderer, paragraphs: Iterable[str], width: float) -> None:
    """Set `text` to the paragraphs broken at spaces into lines of at most `width` pixels.

    A word wider than a line on its own is shortened in the middle.
    """
    lines = []
    for paragraph in paragraphs:
        line = ""
        for word in paragraph.split():
            joined = f"{line} {word}" if line else word
            if _text_width(text, renderer, joined) <= width:
                line = joined
                continue
            if line:
                lines.append(line)
            line = _fit(text, renderer, word, str, width)
        lines.append(line)
    text.set_text("\n".join(lines))


def mistakes_gallery(
    prediction_rows: Rows,
    data_root: str | os.PathLike,
    out: str | os.PathLike,
    n: int = 16,
    split: str = "test",
    title: str | None = None,
) -> Path:
    """The `n` most confident wrong predictions, each image with its true and predicted class."""
    return _save(mistakes_figure(prediction_rows, data_root, n, split, title), out)


def mistakes_figure(
    prediction_rows: Rows,
    data_root: str | os.PathLike,
    n: int = 16,
    split: str = "test",
    title: str | None = None,
) -> Figure:
    """The figure mistakes_gallery saves: up to 4 images a row, 3.0 x 3.3 inches each.

    Laid out by hand from the measured size of each text: every image has its title (true
    and predicted class) above it and its file name below it, all inside the image's cell,
    each line shortened with an ellipsis to the cell's width; the heading wraps to the
    figure's width. So no text overlaps another or an image, or leaves the figure,
    whatever the names and the number of mistakes.
    """
    rows = _split_rows(_rows(prediction_rows), split)
    total_wrong = sum(r["true"] != r["predicted"] for r in rows)
    shown = worst_mistakes(rows, split, n)
    heading = _title(f"Most confident mistakes on {split}", title)
    names = [r[k] for r in shown for k in ("true", "predicted")]
    files = [Path(r["path"]).name for r in shown]
    with _fonts_for(heading, names, files):
        if not shown:
            fig = Figure(figsize=(7, 2.4), dpi=DPI)
        else:
            cols = min(GALLERY_COLUMNS, len(shown))
            grid_rows = math.ceil(len(shown) / cols)
            cell_width, cell_height = GALLERY_CELL
            fig = Figure(
                figsize=(cell_width * cols + 2 * GALLERY_MARGIN, cell_height * grid_rows + 0.7),
                dpi=DPI,
            )
        FigureCanvasAgg(fig)
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height  # pixels, like the texts' extents
        margin, gap = GALLERY_MARGIN * fig.dpi, GALLERY_GAP * fig.dpi
        header = fig.text(0.5, 1 - gap / height, "", ha="center", va="top", fontsize=12)
        _wrap(header, renderer, [heading], width - 2 * margin)
        if not shown:
            message = (
                f"No mistakes: all {len(rows)} {split} images were classified correctly."
                if rows
                else f"No predictions for the {split} split."
            )
            below = header.get_window_extent(renderer).y0 / height
            body = fig.text(0.5, below / 2, "", ha="center", va="center", fontsize=13)
            _wrap(body, renderer, [message], width - 2 * margin)
            return fig
        detail = fig.text(
            0.5,
            (header.get_window_extent(renderer).y0 - gap / 2) / height,
            "",
            ha="center",
            va="top",
        )
        _wrap(
            detail,
            renderer,
            [
                f"{total_wrong} of {len(rows)} images wrong, the {len(shown)} with the highest "
                "predicted probability shown"
            ],
            width - 2 * margin,
        )
        grid_top = detail.get_window_extent(renderer).y0 - 2 * gap
        column = (width - 2 * margin) / cols
        row_height = (grid_top - gap) / grid_rows
        line = column - 3 * gap  # the widest a title or file name may be
        cells = []
        for i, row in enumerate(shown):
            x = (margin + (i % cols + 0.5) * column) / width
            top = grid_top - (i // cols) * row_height
            probability = _float(row["probability"])
            heading_text = fig.text(
                x, top / height, "", ha="center", va="top", fontsize=10, color=MISTAKE_COLOR
            )
            lines = [
                _fit(heading_text, renderer, row["true"], "true: {}".format, line),
                _fit(
                    heading_text,
                    renderer,
                    row["predicted"],
                    lambda name, p=probability: f"predicted: {name} ({p:.0%})",
                    line,
                ),
            ]
            heading_text.set_text("\n".join(lines))
            caption = fig.text(x, 0, "", ha="center", va="top", fontsize=8, color="0.35")
            _fit(caption, renderer, Path(row["path"]).name, str, line)
            cells.append((row, x, top, heading_text, caption))
        title_height = max(c[3].get_window_extent(renderer).height for c in cells)
        caption_height = max(c[4].get_window_extent(renderer).height for c in cells)
        side = max(gap, min(line, row_height - title_height - caption_height - 4 * gap))
        # Each title, image and file name as one block in the middle of its cell.
        spare = (row_height - title_height - caption_height - 4 * gap - side) / 2
        for row, x, top, heading_text, caption in cells:
            heading_text.set_y((top - spare) / height)
            image_top = top - spare - title_height - gap
            caption.set_y((image_top - side - gap) / height)
            ax = fig.add_axes(
                (x - side / 2 / width, (image_top - side) / height, side / width, side / height)
            )
            pixels = _thumbnail(Path(data_root) / row["path"])
            if pixels is None:
                ax.text(0.5, 0.5, "image not found", ha="center", va="center", color="0.4")
            else:
                ax.imshow(pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(MISTAKE_COLOR)
                spine.set_linewidth(2)
    return fig


# ---- experiments compared ----------------------------------------------------------------

# Columns of summary.tsv that are not an experiment's overrides.
SUMMARY_FIXED = (
    {"experiment", "stage", "epochs_run", "best_epoch", "kept", "train_seconds", "best"}
    | {f"test_{m}" for m in ("accuracy", "macro_f1", "roc_auc", "loss")}
    # The GPU figures of usage.summary.
    | {"device", "images_per_s", "loader_wait_fraction", "peak_gpu_mb", "gpu_stage_seconds"}
)


def _metric_label(metric: str) -> str:
    text = metric.removeprefix("test_").replace("_", " ")
    text = text.replace("macro f1", "macro F1").replace("roc auc", "ROC AUC")
    return f"test {text}" if metric.startswith("test_") else text


def _experiment_label(row: Mapping) -> str:
    """The experiment's name, with its overrides (summary columns like finetune.lr) below."""
    overrides = [
        f"{k}={row[k]}" for k in row if k not in SUMMARY_FIXED and row[k] not in (None, "")
    ]
    label = str(row["experiment"])
    if overrides:
        label += "\n" + _short(", ".join(overrides), 40)
    return label


def compare_experiments(
    summary_rows: Rows,
    out: str | os.PathLike,
    metric: str | Sequence[str] = ("test_accuracy", "test_macro_f1"),
    title: str | None = None,
) -> Path:
    """Horizontal bars per experiment, head and fine-tune side by side, one panel per metric.

    The row summary.tsv marks best gets a black outline and a star.
    """
    rows = _rows(summary_rows)
    metric_list = [metric] if isinstance(metric, str) else list(metric)
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    by_key = {(r["experiment"], r["stage"]): r for r in rows}
    stages = [s for s in ("head", "finetune") if any(r["stage"] == s for r in rows)]
    stages += sorted({r["stage"] for r in rows} - set(stages))
    height = 1.9 + max(1, len(experiments)) * (0.35 + 0.3 * len(stages))
    fig = _figure(5.2 * len(metric_list) + 2.2, height)
    axes = np.atleast_1d(fig.subplots(1, len(metric_list), sharey=True, squeeze=False)).ravel()
    bar = 0.8 / max(1, len(stages))
    y = np.arange(len(experiments))
    for ax, name in zip(axes, metric_list, strict=True):
        values = [_float(r.get(name)) for r in rows]
        top = max([v for v in values if not math.isnan(v)] + [1.0])
        share = name != "test_loss" and top <= 1.0  # accuracy, F1, AUC: shown as percent
        for s, stage in enumerate(stages):
            offset = (s - (len(stages) - 1) / 2) * bar
            for e, experiment in enumerate(experiments):
                row = by_key.get((experiment, stage))
                if row is None:
                    continue
                value = _float(row.get(name))
                best = str(row.get("best", "")).lower() in ("yes", "true", "1")
                ypos = e + offset
                if math.isnan(value):
                    ax.text(0.01 * top, ypos, "n/a", va="center", fontsize=8, color="0.4")
                    continue
                ax.barh(
                    ypos,
                    value,
                    height=bar * 0.92,
                    color=STAGE_COLORS.get(stage, f"C{s + 2}"),
                    edgecolor="black" if best else "none",
                    linewidth=2 if best else 0,
                )
                ax.text(
                    value + 0.01 * top,
                    ypos,
                    (f"{value:.1%}" if share else f"{value:.3f}") + ("  ★ best" if best else ""),
                    va="center",
                    fontsize=9,
                    fontweight="bold" if best else "normal",
                )
        ax.set_xlim(0, top * 1.3)
        ax.set_title(_metric_label(name))
        ax.grid(axis="x", alpha=0.3)
        if share:
            ax.set_xticks(np.linspace(0, 1, 6))
            ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    labels = [_experiment_label(next(r for r in rows if r["experiment"] == e)) for e in experiments]
    axes[0].set_yticks(y, labels, fontsize=9)
    axes[0].set_ylim(len(experiments) - 0.5, -0.5)  # first experiment (the best) on top
    handles = [
        Patch(color=STAGE_COLORS.get(s, f"C{i + 2}"), label=STAGE_NAMES.get(s, s))
        for i, s in enumerate(stages)
    ]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2, label="★ best run"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(_title("Experiments on the test split", title), fontsize=13)
    if not rows:
        axes[0].text(0.5, 0.5, "no runs in the summary", ha="center", transform=axes[0].transAxes)
    return _save(_use_fonts(fig, title, labels), out)


# ---- tables for the report -----------------------------------------------------------------

_TABLE_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr.best td { font-weight: bold; background: #fff6d5; }
caption { text-align: left; font-weight: bold; margin-bottom: 0.5em; }
"""


def _cell(value) -> str:
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if value.strip().lstrip("-").isdigit():
            return value
        value = number
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def html_table(
    header: Sequence[str],
    body: Sequence[Sequence],
    out: str | os.PathLike,
    title: str,
    highlight: Sequence[bool] | None = None,
    note: str = "",
) -> Path:
    """A standalone HTML page with one table; highlighted rows are bold on yellow."""
    highlight = list(highlight or [False] * len(body))
    lines = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_TABLE_STYLE}</style></head><body>",
        f"<table><caption>{html.escape(title)}</caption>",
        "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>",
    ]
    for row, marked in zip(body, highlight, strict=True):
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        lines.append(f'<tr class="best">{cells}</tr>' if marked else f"<tr>{cells}</tr>")
    lines.append("</table>")
    if note:
        lines.append(f"<p>{html.escape(note)}</p>")
    lines.append("</body></html>")
    with atomic_path(out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(out)


def metrics_table(
    stage_metrics: Mapping[str, Rows], out: str | os.PathLike, title: str = "Metrics"
) -> Path:
    """Metrics of each stage and split side by side: one row per metric, one column per run."""
    columns, values = [], {}
    for stage, rows in stage_metrics.items():
        for row in _rows(rows):
            column = f"{STAGE_NAMES.get(stage, stage)}, {row['split']}"
            columns.append(column)
            for key, value in row.items():
                if key != "split":
                    values.setdefault(key, {})[column] = value
    body = [[key, *(cells.get(c, "") for c in columns)] for key, cells in values.items()]
    return html_table(["metric", *columns], body, out, title)


def summary_table(summary_rows: Rows, out: str | os.PathLike, title: str = "Summary") -> Path:
    """results/summary.tsv as a table, its best run highlighted."""
    rows = _rows(summary_rows)
    header = list(dict.fromkeys(c for r in rows for c in r))
    body = [[r.get(c, "") for c in header] for r in rows]
    best = [str(r.get("best", "")).lower() in ("yes", "true", "1") for r in rows]
    return html_table(header, body, out, title, best)
