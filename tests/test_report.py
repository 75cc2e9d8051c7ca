"""The plots of a real demo run and `snakemake --report` (HTML and zip) built from it."""

from __future__ import annotations

import base64
import json
import re
import zipfile

import pytest
from helpers import REPO, assert_ok, snakemake
from PIL import Image

DEMO_CONFIG = REPO / "config" / "demo.yaml"
EXPERIMENT = "baseline"
EXPERIMENT_FILES = ["learning_curves.png", "metrics.html"]
STAGE_FILES = ["confusion_matrix.png", "roc_curve.png", "mistakes.png"]
SUMMARY_FILES = ["results/plots/experiments.png", "results/plots/summary.html"]
# category -> subcategory -> files, as the report groups them.
EXPECTED_CATEGORIES = {
    EXPERIMENT: {
        "both stages": [f"results/{EXPERIMENT}/plots/{name}" for name in EXPERIMENT_FILES],
        **{
            stage: [f"results/{EXPERIMENT}/plots/{stage}_{name}" for name in STAGE_FILES]
            for stage in ("head", "finetune")
        },
    },
    "All experiments": {"comparison": SUMMARY_FILES},
}
ALL_FILES = [f for subs in EXPECTED_CATEGORIES.values() for fs in subs.values() for f in fs]


def build_report(workdir, out):
    """`snakemake --report out` for a finished workdir; the workdir itself stays unchanged."""
    proc = snakemake(
        workdir, "--configfile", DEMO_CONFIG, "--report", out, cores=None, cwd=out.parent
    )
    assert_ok(proc, f"snakemake --report {out.name}")
    assert out.is_file()
    # Captions and workflow.rst render without docutils complaints.
    assert "(WARNING/" not in proc.stdout and "(ERROR/" not in proc.stdout, proc.stdout
    return proc


def js_object(html, name):
    match = re.search(rf"var {name} = (\{{.*?\}});\n", html)
    assert match, f"no `var {name}` in the report"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def report_html(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    build_report(demo_run, out)
    return out.read_text(encoding="utf-8")


def test_demo_run_made_every_plot(demo_run):
    for path in ALL_FILES:
        file = demo_run / path
        assert file.is_file(), path
        if file.suffix == ".png":
            with Image.open(file) as image:
                image.load()
                assert image.format == "PNG"
                assert min(image.size) >= 280, (path, image.size)
            assert file.stat().st_size > 10_000, path
    summary = (demo_run / "results/plots/summary.html").read_text()
    assert '<tr class="best">' in summary and EXPERIMENT in summary
    metrics = (demo_run / f"results/{EXPERIMENT}/plots/metrics.html").read_text()
    for column in ("head, val", "head, test", "fine-tune, val", "fine-tune, test"):
        assert f"<th>{column}</th>" in metrics


def test_report_groups_plots_by_experiment_and_stage(report_html):
    categories = js_object(report_html, "categories")
    # Other rules may mark more files (raw TSVs, say): every plot must be where expected.
    for category, subcategories in EXPECTED_CATEGORIES.items():
        assert category in categories
        for subcategory, files in subcategories.items():
            assert set(files) <= set(categories[category].get(subcategory, [])), subcategory


def test_report_html_embeds_every_plot_and_the_summary(report_html, demo_run):
    results = js_object(report_html, "results")
    assert set(ALL_FILES) <= set(results)
    for path in ALL_FILES:
        entry = results[path]
        mime = "image/png" if path.endswith(".png") else "text/html"
        assert entry["mime_type"] == mime
        prefix = f"data:{mime};charset=utf8;filename={path.rsplit('/', 1)[1]};base64,"
        assert entry["data_uri"].startswith(prefix), path
        embedded = base64.b64decode(entry["data_uri"][len(prefix) :])
        assert embedded == (demo_run / path).read_bytes(), path
        assert entry["caption"].strip(), f"{path} has no caption"
    # Captions render their wildcards.
    assert "experiment <strong>baseline</strong>" in results[ALL_FILES[0]]["caption"]
    assert (
        "<strong>finetune</strong> stage"
        in results[f"results/{EXPERIMENT}/plots/finetune_confusion_matrix.png"]["caption"]
    )
    summary = base64.b64decode(results["results/plots/summary.html"]["data_uri"].split(",")[1])
    assert b"test_accuracy" in summary and EXPERIMENT.encode() in summary


def test_report_describes_the_workflow_and_its_config(report_html):
    match = re.search(r"var workflow_desc = (.*?);\n", report_html)
    assert match, "no workflow description in the report"
    description = json.loads(match.group(1))
    for text in ("data/demo", "mobilenet_v2", "none (random initialisation)", "64 x 64"):
        assert text in description, text
    assert "<strong>baseline</strong>" in description


def test_report_zip_holds_every_plot(demo_run, tmp_path):
    out = tmp_path / "report.zip"
    build_report(demo_run, out)
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        assert "report/report.html" in names
        for path in ALL_FILES:
            name = path.rsplit("/", 1)[1]
            (member,) = [
                n for n in names if n.startswith("report/data/raw/") and n.endswith(f"/{name}")
            ]
            assert archive.read(member) == (demo_run / path).read_bytes(), path
        summary = next(n for n in names if n.endswith("/summary.html"))
        assert EXPERIMENT.encode() in archive.read(summary)
