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
        "fetch_weights.py --backbone {params.backbone}"
        " --weights {params.weights} --out {output:q} > {log:q} 2>&1"


rule extract_features:
    input:
        unpack(extraction_inputs),
    output:
        features_path("{key}", "{split}"),
    log:
        "logs/extract_features/{key}/{split}.log",
    benchmark:
        "benchmarks/extract_features/{key}/{split}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=30,
    params:
        root=DATA_ROOT,
        train_split=TRAIN_SPLIT,
        backbone=lambda w: feature_settings(w)["backbone"],
        weights=lambda w: feature_settings(w)["weights"],
        weights_file=lambda w: weights_file_arg(feature_settings(w)),
        image_size=lambda w: feature_settings(w)["image_size"],
        mean=lambda w: feature_settings(w)["mean"],
        std=lambda w: feature_settings(w)["std"],
        views=extraction_views,
        seed=lambda w: feature_settings(w)["seed"],
        batch_size=lambda w: feature_settings(w)["batch_size"],
        max_workers=workers_cap(),
    shell:
        "extract_features.py --manifest {input.manifest:q}"
        " --data-root {params.root:q} --split {wildcards.split:q}"
        " --train-split {params.train_split:q}"
        " --backbone {params.backbone} --weights {params.weights}"
        " --weights-file {params.weights_file:q} --image-size {params.image_size}"
        " --mean {params.mean} --std {params.std} --augmented-views {params.views}"
        " --seed {params.seed} --batch-size {params.batch_size} --threads {threads}"
        " --max-workers {params.max_workers} --output {output:q} > {log:q} 2>&1"
