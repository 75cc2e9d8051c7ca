# Each stage's model as an ONNX file and a torch.export program, each with a JSON sidecar
# (classes, image size, normalisation, preprocessing). On the CPU: tracing takes seconds.
# Part of rule all unless `export: false`.


rule export:
    input:
        unpack(model_inputs),
    output:
        onnx=export_outputs("{experiment}", "{stage}")[0],
        onnx_sidecar=export_outputs("{experiment}", "{stage}")[1],
        program=export_outputs("{experiment}", "{stage}")[2],
        program_sidecar=export_outputs("{experiment}", "{stage}")[3],
    log:
        "logs/export/{experiment}/{stage}.log",
    benchmark:
        "benchmarks/export/{experiment}/{stage}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        weights_file=lambda w, input: input.get("weights", "none"),
        code=code_version("export_model.py"),
    shell:
        "export_model.py --checkpoint {input.model:q} --weights-file {params.weights_file:q}"
        " --experiment {wildcards.experiment:q} --onnx {output.onnx:q}"
        " --onnx-sidecar {output.onnx_sidecar:q} --program {output.program:q}"
        " --program-sidecar {output.program_sidecar:q} > {log:q} 2>&1"
