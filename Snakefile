# Segmentation without pixel labels: images -> DINO features -> ... -> semantic masks.
# Run:  snakemake --cores all                 (demo dataset, CPU)
#       snakemake --cores all --configfile presets/voc-unsupervised.yaml
# Every stage is a rule that calls `python -m pipeline <stage>`; see README.md.


configfile: f"{workflow.basedir}/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/pseudo_labels.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/affinity.smk"
include: "workflow/rules/deeplab.smk"
include: "workflow/rules/comus.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/apply.smk"


rule all:
    default_target: True
    input:
        final_targets,


# `snakemake apply --config apply='{images: FOLDER}'`: the run's models applied to a new folder
# (workflow/rules/apply.smk, README.md, "Apply the model to new images").
rule apply:
    input:
        lambda w: [apply_images(w), applied("report.md")],
