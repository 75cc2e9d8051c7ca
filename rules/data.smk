# Where the images come from (login node, local rules) and their verification.

if DATA.get("source") == "demo":

    rule make_demo_data:
        output:
            directory(DATA_ROOT),
        log:
            "logs/make_demo_data.log",
        benchmark:
            "benchmarks/make_demo_data.tsv"
        localrule: True
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        params:
            counts=json.dumps(DATA["expected_counts"]),
            image_size=DATA["demo"]["image_size"],
            seed=config["seed"],
            code=code_version("make_demo_data.py"),
        shell:
            "make_demo_data.py --data-root {output:q} --counts {params.counts:q}"
            " --image-size {params.image_size} --seed {params.seed} > {log:q} 2>&1"


if DATA.get("source") == "oxford_pets":

    # Downloads need the internet, which compute nodes may lack: this runs on the login node.
    rule fetch_data:
        output:
            directory(DATA_ROOT),
        log:
            "logs/fetch_data.log",
        benchmark:
            "benchmarks/fetch_data.tsv"
        localrule: True
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        params:
            counts=json.dumps(DATA["expected_counts"]),
            seed=config["seed"],
            download_dir="resources/downloads",
        shell:
            "fetch_data.py --data-root {output:q} --counts {params.counts:q}"
            " --seed {params.seed} --download-dir {params.download_dir:q} > {log:q} 2>&1"


rule verify_dataset:
    input:
        dataset_input,
    output:
        manifest=MANIFEST,
        counts=COUNTS,
    log:
        "logs/verify_dataset.log",
    benchmark:
        "benchmarks/verify_dataset.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        root=DATA_ROOT,
        settings=DATA_SETTINGS,
        listing=data_listing,
        code=code_version("verify_dataset.py"),
    shell:
        "verify_dataset.py --data-root {params.root:q} --settings {params.settings:q}"
        " --threads {threads} --manifest {output.manifest:q} --counts {output.counts:q}"
        " > {log:q} 2>&1"
