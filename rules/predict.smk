# Each stage's model on a folder of unlabelled images (config key predict.images), on a GPU
# like evaluate. Part of rule all when predict.images is set.


rule predict:
    input:
        unpack(model_inputs),
    output:
        predictions=predict_outputs("{experiment}", "{stage}")[0],
        usage=predict_outputs("{experiment}", "{stage}")[1],
    log:
        "logs/predict/{experiment}/{stage}.log",
    benchmark:
        "benchmarks/predict/{experiment}/{stage}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=lambda wildcards, attempt: 30 * attempt,
        loader_workers=loader_workers(),
    params:
        images=PREDICT_IMAGES or "none",
        # The folder is one tracked value (file count, bytes, digest): an added image
        # re-runs predict without Snakemake stat-ing every file as an input.
        listing=lambda wildcards: predict_listing(),
        settings=stage_settings("evaluate"),
        weights_file=lambda w, input: input.get("weights", "none"),
        code=code_version("predict.py"),
    shell:
        "predict.py --settings {params.settings:q} --checkpoint {input.model:q}"
        " --images {params.images:q} --weights-file {params.weights_file:q}"
        " --threads {threads} --max-workers {resources.loader_workers}"
        " --output {output.predictions:q} --usage {output.usage:q} > {log:q} 2>&1"
