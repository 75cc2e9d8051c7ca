# The classifier head, trained on cached features. On CPU by design: it takes seconds,
# gives the same numbers everywhere, and never waits in a GPU queue.


rule train_head:
    input:
        unpack(head_inputs),
    output:
        model=stage_file("{experiment}", "head", "model.pt"),
        history=stage_file("{experiment}", "head", "history.tsv"),
    log:
        "logs/train_head/{experiment}.log",
    benchmark:
        "benchmarks/train_head/{experiment}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=15,
    params:
        settings=stage_settings("head"),
        resume=lambda w: resume_path(w, "head"),
        code=code_version("train_head.py"),
    shell:
        "train_head.py --settings {params.settings:q} --train-features {input.train:q}"
        " --val-features {input.val:q} --resume {params.resume:q} --device cpu"
        " --output {output.model:q} --history {output.history:q} > {log:q} 2>&1"
