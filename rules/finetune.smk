# Fine tuning: the last backbone blocks and the head, on augmented images, on a GPU.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model=stage_file("{experiment}", "finetune", "model.pt"),
        history=stage_file("{experiment}", "finetune", "history.tsv"),
    log:
        "logs/finetune/{experiment}.log",
    benchmark:
        "benchmarks/finetune/{experiment}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        root=DATA_ROOT,
        splits=[TRAIN_SPLIT, VAL_SPLIT],
        weights_file=lambda w, input: input.get("weights", "none"),
        epochs=lambda w: exp_config(w)["finetune"]["epochs"],
        lr=lambda w: exp_config(w)["finetune"]["lr"],
        batch_size=lambda w: exp_config(w)["finetune"]["batch_size"],
        unfreeze_blocks=lambda w: exp_config(w)["finetune"]["unfreeze_blocks"],
        warmup_epochs=lambda w: exp_config(w)["finetune"]["warmup_epochs"],
        warmup_start_factor=lambda w: exp_config(w)["finetune"]["warmup_start_factor"],
        patience=lambda w: exp_config(w)["finetune"]["patience"],
        min_delta=lambda w: exp_config(w)["finetune"]["min_delta"],
        amp=lambda w: "--amp" if exp_config(w)["finetune"]["amp"] else "--no-amp",
        deterministic=lambda w: (
            "--deterministic"
            if exp_config(w)["finetune"]["deterministic"]
            else "--no-deterministic"
        ),
        seed=lambda w: exp_config(w)["seed"],
        max_workers=workers_cap(),
        resume=lambda w: resume_path(w, "finetune"),
    shell:
        "finetune.py --head {input.head:q} --manifest {input.manifest:q}"
        " --data-root {params.root:q} --splits {params.splits:q}"
        " --weights-file {params.weights_file:q} --epochs {params.epochs} --lr {params.lr}"
        " --batch-size {params.batch_size} --unfreeze-blocks {params.unfreeze_blocks}"
        " --warmup-epochs {params.warmup_epochs}"
        " --warmup-start-factor {params.warmup_start_factor} --patience {params.patience}"
        " --min-delta {params.min_delta} {params.amp} {params.deterministic} --seed {params.seed}"
        " --threads {threads} --max-workers {params.max_workers} --resume {params.resume:q}"
        " --output {output.model:q} --history {output.history:q} > {log:q} 2>&1"
