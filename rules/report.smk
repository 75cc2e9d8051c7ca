# Figures and tables of every experiment, and their comparison, marked for the report:
#   snakemake --report report.html   (or report.zip for large runs)
# The report groups them by experiment (category) and stage (subcategory); the paths and
# the `figure` helper live in rules/common.smk.


rule plot_experiment:
    input:
        head_history=stage_file("{experiment}", "head", "history.tsv"),
        finetune_history=stage_file("{experiment}", "finetune", "history.tsv"),
        head_model=stage_file("{experiment}", "head", "model.pt"),
        finetune_model=stage_file("{experiment}", "finetune", "model.pt"),
        head_metrics=eval_outputs("{experiment}", "head")[0],
        finetune_metrics=eval_outputs("{experiment}", "finetune")[0],
    output:
        curves=figure(
            EXPERIMENT_PLOTS["learning_curves"],
            "learning_curves",
            "learning curves",
            subcategory="both stages",
            stage="head + fine-tune",
        ),
        table=figure(
            EXPERIMENT_PLOTS["metrics_table"],
            "metrics_table",
            "metrics table",
            subcategory="both stages",
            stage="head + fine-tune",
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
    params:
        code=code_version("plot_experiment.py"),
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
        confusion_matrix=figure(
            STAGE_PLOTS["confusion_matrix"],
            "confusion_matrix",
            "confusion matrix",
            stage="{stage}",
        ),
        roc_curve=figure(
            STAGE_PLOTS["roc_curve"], "roc_curve", "ROC curve", stage="{stage}"
        ),
        mistakes=figure(
            STAGE_PLOTS["mistakes"],
            "mistakes",
            "most confident mistakes",
            stage="{stage}",
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
        code=code_version("plot_stage.py"),
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
        chart=figure(
            SUMMARY_PLOT,
            "experiments",
            "test metrics per experiment",
            category=REPORT_CATEGORY,
            subcategory="comparison",
        ),
        table=figure(
            SUMMARY_TABLE,
            "summary_table",
            "summary table",
            category=REPORT_CATEGORY,
            subcategory="comparison",
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
        code=code_version("plot_summary.py"),
    shell:
        "plot_summary.py --summary {input:q} --metrics {params.metrics}"
        " --chart {output.chart:q} --table {output.table:q} > {log:q} 2>&1"
