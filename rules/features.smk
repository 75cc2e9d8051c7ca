# Pretrained weights (login node) and the frozen backbone's features, once per split.


rule fetch_weights:
    output:
        "resources/weights/{file}",
    log:
        "logs/fetch_weights/{file}.log",
    benchmark:
        "benchmarks/fetch_weights/{file}.tsv"
    # Compute nodes may have no internet: download on the login node, check the hash there.
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=20,
    params:
        backbone=lambda w: WEIGHTS_TO_FETCH[f"resources/weights/{w.file}"]["backbone"],
        weights=lambda w: WEIGHTS_TO_FETCH[f"resources/weights/{w.file}"]["weights"],
    shell:
        "fetch_weights.py --backbone {params.backbone:q}"
        " --weights {params.weights:q} --output {output:q} > {log:q} 2>&1"


rule extract_features:
    input:
        unpack(extraction_inputs),
    output:
        features=features_path("{key}", "{split}"),
        usage=features_usage_path("{key}", "{split}"),
    log:
        "logs/extract_features/{key}/{split}.log",
    benchmark:
        "benchmarks/extract_features/{key}/{split}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        nodes=1,
        mem_mb=16000,
        runtime=30,
        loader_workers=loader_workers(),
    params:
        root=DATA_ROOT,
        train_split=TRAIN_SPLIT,
        settings=feature_settings,
        weights_file=lambda w, input: input.get("weights", "none"),
        code=code_version("extract_features.py"),
    shell:
        "launch.py --gpu {resources.gpu} --nodes {resources.nodes} --"
        " extract_features.py --settings {params.settings:q} --manifest {input.manifest:q}"
        " --data-root {params.root:q} --split {wildcards.split:q}"
        " --train-split {params.train_split:q} --weights-file {params.weights_file:q}"
        " --threads {threads} --max-workers {resources.loader_workers}"
        " --output {output.features:q} --usage {output.usage:q} > {log:q} 2>&1"
