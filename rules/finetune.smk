# Fine tuning: the last backbone blocks and the head, on augmented images, on a GPU.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model=stage_file("{experiment}", "finetune", "model.pt"),
        history=stage_file("{experiment}", "finetune", "history.tsv"),
        usage=stage_file("{experiment}", "finetune", "usage.tsv"),
    log:
        "logs/finetune/{experiment}.log",
    benchmark:
        "benchmarks/finetune/{experiment}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        # One process per GPU (workflow_scripts/launch.py); more than one node needs the
        # job script to run the rule (README, "Several GPUs").
        nodes=1,
        mem_mb=16000,
        runtime=lambda wildcards, attempt: 60 * attempt,
        loader_workers=loader_workers(),
    params:
        root=DATA_ROOT,
        splits=[TRAIN_SPLIT, VAL_SPLIT],
        settings=stage_settings("finetune"),
        weights_file=lambda w, input: input.get("weights", "none"),
        resume=lambda w: resume_path(w, "finetune"),
        code=code_version("finetune.py"),
    shell:
        "launch.py --gpu {resources.gpu} --nodes {resources.nodes} --"
        " finetune.py --settings {params.settings:q} --head {input.head:q}"
        " --manifest {input.manifest:q} --data-root {params.root:q}"
        " --splits {params.splits:q} --weights-file {params.weights_file:q}"
        " --threads {threads} --max-workers {resources.loader_workers}"
        " --resume {params.resume:q} --output {output.model:q}"
        " --history {output.history:q} --usage {output.usage:q} > {log:q} 2>&1"
