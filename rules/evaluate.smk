# Each stage's model on the validation and test splits, then one summary table.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics=report(
            "results/{experiment}/eval/{stage}/metrics.tsv",
            caption="../report/metrics_tsv.rst",
            category="{experiment}",
            subcategory="{stage}",
            labels={"figure": "metrics (TSV)", "stage": "{stage}"},
        ),
        predictions="results/{experiment}/eval/{stage}/predictions.tsv",
        confusion="results/{experiment}/eval/{stage}/confusion.tsv",
    log:
        "logs/evaluate/{experiment}/{stage}.log",
    benchmark:
        "benchmarks/evaluate/{experiment}/{stage}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=30,
    params:
        root=DATA_ROOT,
        splits=EVAL_SPLITS,
        weights_file=lambda w, input: input.get("weights", "none"),
        batch_size=lambda w: exp_config(w)["evaluate"]["batch_size"],
        max_workers=workers_cap(),
    shell:
        "evaluate.py --checkpoint {input.model:q}"
        " --manifest {input.manifest:q} --data-root {params.root:q}"
        " --splits {params.splits:q} --weights-file {params.weights_file:q}"
        " --batch-size {params.batch_size} --threads {threads}"
        " --max-workers {params.max_workers} --metrics {output.metrics:q}"
        " --predictions {output.predictions:q} --confusion {output.confusion:q}"
        " > {log:q} 2>&1"


rule summarize:
    input:
        [run["metrics"] for run in summary_runs()],
        [run["checkpoint"] for run in summary_runs()],
    output:
        report(
            SUMMARY,
            caption="../report/summary_tsv.rst",
            category="All experiments",
            subcategory="comparison",
            labels={"figure": "summary (TSV)"},
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
        runs=json.dumps(summary_runs()),
        test_split=TEST_SPLIT,
        sort_by=config["summary_metric"],
    shell:
        "summarize.py --runs '{params.runs}' --test-split {params.test_split:q}"
        " --sort-by {params.sort_by} --output {output:q} > {log:q} 2>&1"
