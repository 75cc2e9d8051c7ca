# Image transfer learning as tracked, re-runnable stages: verify the data, extract features
# with a frozen pretrained CNN, train a head, fine-tune the last blocks, evaluate.
# Site details (partition, account, GPUs) live in profiles/, never here.

from snakemake.utils import min_version

min_version("9.0")


# The defaults travel with the workflow; --configfile overlays deep-merge over them.
configfile: f"{workflow.basedir}/config/config.yaml"


# The description page of `snakemake --report report.html`.
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/features.smk"
include: "rules/head.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/predict.smk"
include: "rules/export.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
