# Each stage's model on the validation and test splits, then one summary table.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics=figure(
            "results/{experiment}/eval/{stage}/metrics.tsv",
            "metrics_tsv",
            "metrics (TSV)",
            stage="{stage}",
        ),
        predictions="results/{experiment}/eval/{stage}/predictions.tsv",
        confusion="results/{experiment}/eval/{stage}/confusion.tsv",
        usage="results/{experiment}/eval/{stage}/usage.tsv",
    log:
        "logs/evaluate/{experiment}/{stage}.log",
    benchmark:
        "benchmarks/evaluate/{experiment}/{stage}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        # One process per GPU (workflow_scripts/launch.py); more than one node needs the
        # job script to run the rule (README, "Several GPUs").
        nodes=1,
        mem_mb=16000,
        runtime=30,
        loader_workers=loader_workers(),
    params:
        root=DATA_ROOT,
        splits=EVAL_SPLITS,
        settings=stage_settings("evaluate"),
        weights_file=lambda w, input: input.get("weights", "none"),
        code=code_version("evaluate.py"),
    shell:
        "launch.py --gpu {resources.gpu} --nodes {resources.nodes} --"
        " evaluate.py --settings {params.settings:q} --checkpoint {input.model:q}"
        " --manifest {input.manifest:q} --data-root {params.root:q}"
        " --splits {params.splits:q} --weights-file {params.weights_file:q}"
        " --threads {threads} --max-workers {resources.loader_workers}"
        " --metrics {output.metrics:q} --predictions {output.predictions:q}"
        " --confusion {output.confusion:q} --usage {output.usage:q} > {log:q} 2>&1"


rule summarize:
    input:
        [run["metrics"] for run in SUMMARY_RUNS],
        [run["checkpoint"] for run in SUMMARY_RUNS],
        [path for run in SUMMARY_RUNS for path in run["usage"]],
    output:
        figure(
            SUMMARY,
            "summary_tsv",
            "summary (TSV)",
            category=REPORT_CATEGORY,
            subcategory="comparison",
        ),
    log:
        "logs/summarize.log",
    benchmark:
        "benchmarks/summarize.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        runs=json.dumps(SUMMARY_RUNS),
        test_split=TEST_SPLIT,
        sort_by=config["summary_metric"],
        code=code_version("summarize.py"),
    shell:
        "summarize.py --runs {params.runs:q} --test-split {params.test_split:q}"
        " --sort-by {params.sort_by} --output {output:q} > {log:q} 2>&1"
