# Figures and tables of every experiment, and their comparison, marked for the report:
#   snakemake --report report.html   (or report.zip for large runs)
# The report groups them by experiment (category) and stage (subcategory).

HEAD_DIR = stage_dir("{experiment}", "head")
FINETUNE_DIR = stage_dir("{experiment}", "finetune")
EXPERIMENT_PLOTS = {
    "learning_curves": "results/{experiment}/plots/learning_curves.png",
    "metrics_table": "results/{experiment}/plots/metrics.html",
}
STAGE_PLOTS = {
    "confusion_matrix": "results/{experiment}/plots/{stage}_confusion_matrix.png",
    "roc_curve": "results/{experiment}/plots/{stage}_roc_curve.png",
    "mistakes": "results/{experiment}/plots/{stage}_mistakes.png",
}
SUMMARY_PLOT = "results/plots/experiments.png"
SUMMARY_TABLE = "results/plots/summary.html"
REPORT_CATEGORY = "All experiments"
# Everything above for every experiment and stage; all_targets() in common.smk adds these.
REPORT_TARGETS = [
    *expand(list(EXPERIMENT_PLOTS.values()), experiment=EXPERIMENTS),
    *expand(list(STAGE_PLOTS.values()), experiment=EXPERIMENTS, stage=STAGES),
    SUMMARY_PLOT,
    SUMMARY_TABLE,
]


rule plot_experiment:
    input:
        head_history=f"{HEAD_DIR}/history.tsv",
        finetune_history=f"{FINETUNE_DIR}/history.tsv",
        head_model=f"{HEAD_DIR}/model.pt",
        finetune_model=f"{FINETUNE_DIR}/model.pt",
        head_metrics=eval_outputs("{experiment}", "head")[0],
        finetune_metrics=eval_outputs("{experiment}", "finetune")[0],
    output:
        curves=report(
            EXPERIMENT_PLOTS["learning_curves"],
            caption="../report/learning_curves.rst",
            category="{experiment}",
            subcategory="both stages",
            labels={"figure": "learning curves", "stage": "head + fine-tune"},
        ),
        table=report(
            EXPERIMENT_PLOTS["metrics_table"],
            caption="../report/metrics_table.rst",
            category="{experiment}",
            subcategory="both stages",
            labels={"figure": "metrics table", "stage": "head + fine-tune"},
        ),
    log:
        "logs/plot_experiment/{experiment}.log",
    benchmark:
        "benchmarks/plot_experiment/{experiment}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "plot_experiment.py --experiment {wildcards.experiment:q}"
        " --head-history {input.head_history:q}"
        " --finetune-history {input.finetune_history:q}"
        " --head-checkpoint {input.head_model:q}"
        " --finetune-checkpoint {input.finetune_model:q}"
        " --head-metrics {input.head_metrics:q}"
        " --finetune-metrics {input.finetune_metrics:q}"
        " --learning-curves {output.curves:q} --metrics-table {output.table:q}"
        " > {log:q} 2>&1"


rule plot_stage:
    input:
        predictions=eval_outputs("{experiment}", "{stage}")[1],
        confusion=eval_outputs("{experiment}", "{stage}")[2],
    output:
        confusion_matrix=report(
            STAGE_PLOTS["confusion_matrix"],
            caption="../report/confusion_matrix.rst",
            category="{experiment}",
            subcategory="{stage}",
            labels={"figure": "confusion matrix", "stage": "{stage}"},
        ),
        roc_curve=report(
            STAGE_PLOTS["roc_curve"],
            caption="../report/roc_curve.rst",
            category="{experiment}",
            subcategory="{stage}",
            labels={"figure": "ROC curve", "stage": "{stage}"},
        ),
        mistakes=report(
            STAGE_PLOTS["mistakes"],
            caption="../report/mistakes.rst",
            category="{experiment}",
            subcategory="{stage}",
            labels={"figure": "most confident mistakes", "stage": "{stage}"},
        ),
    log:
        "logs/plot_stage/{experiment}/{stage}.log",
    benchmark:
        "benchmarks/plot_stage/{experiment}/{stage}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        # The images live where the data rules put them; the predictions name them.
        root=DATA_ROOT,
        split=TEST_SPLIT,
        shown=16,
    shell:
        "plot_stage.py --experiment {wildcards.experiment:q}"
        " --stage {wildcards.stage} --predictions {input.predictions:q}"
        " --confusion {input.confusion:q} --data-root {params.root:q}"
        " --split {params.split:q} --mistakes-shown {params.shown}"
        " --confusion-matrix {output.confusion_matrix:q}"
        " --roc-curve {output.roc_curve:q} --mistakes {output.mistakes:q}"
        " > {log:q} 2>&1"


rule plot_summary:
    input:
        SUMMARY,
    output:
        chart=report(
            SUMMARY_PLOT,
            caption="../report/experiments.rst",
            category=REPORT_CATEGORY,
            subcategory="comparison",
            labels={"figure": "test metrics per experiment"},
        ),
        table=report(
            SUMMARY_TABLE,
            caption="../report/summary_table.rst",
            category=REPORT_CATEGORY,
            subcategory="comparison",
            labels={"figure": "summary table"},
        ),
    log:
        "logs/plot_summary.log",
    benchmark:
        "benchmarks/plot_summary.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        metrics=["test_accuracy", "test_macro_f1"],
    shell:
        "plot_summary.py --summary {input:q} --metrics {params.metrics}"
        " --chart {output.chart:q} --table {output.table:q} > {log:q} 2>&1"
