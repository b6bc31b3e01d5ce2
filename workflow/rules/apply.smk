# Apply the run's trained model(s) to a new folder of images (README.md, "Apply the model to new
# images"):
#   snakemake --cores all apply --config apply='{images: path/to/folder}'
# The `apply` target (Snakefile) needs the run's models as inputs: on a finished run nothing is
# retrained, on a fresh results folder Snakemake trains them first. Every job is one step of
# `python -m pipeline apply`.
include: "apply_inputs.smk"


checkpoint apply_index:
    input:
        images=apply_images,
        settings=settings_file("apply_index", apply_index_settings()),
    output:
        manifest=applied("dataset/manifest.csv"),
        classes=applied("dataset/classes.json"),
        skipped=applied("dataset/skipped.csv"),
        ignored=applied("dataset/ignored.csv"),
    log:
        results(f"logs/apply/{APPLY['name']}/index.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    params:
        out_dir=lambda w, output: str(Path(output.manifest).parents[1]),
    shell:
        "python -m pipeline apply --step index --images {input.images:q} --out {params.out_dir:q}"
        " --params {input.settings:q} --threads {threads} > {log:q} 2>&1"


rule apply_model:
    input:
        unpack(lambda w: run_model_inputs("model")),
        manifest=applied("dataset/manifest.csv"),
        settings=settings_file("apply_model", apply_params(config, ["model"])),
    output:
        probs=applied("model/probs/shard-{shard}.safetensors"),
        masks=directory(applied("model/masks/shard-{shard}")),
        overlays=directory(applied("model/overlays/shard-{shard}")),
    log:
        results(f"logs/apply/{APPLY['name']}/model/shard-{{shard}}.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        facts=lambda w, input: as_json({"num_classes": model_classes(input)}),
        out_dir=lambda w, output: str(Path(output.probs).parents[2]),
    shell:
        "python -m pipeline apply --step predict --shard {wildcards.shard} --model {input.model:q}"
        " --out {params.out_dir:q} --params {input.settings:q} --params {params.facts:q} --threads {threads} > {log:q} 2>&1"


rule apply_deeplab:
    input:
        unpack(lambda w: run_model_inputs("deeplab")),
        manifest=applied("dataset/manifest.csv"),
        settings=settings_file("apply_deeplab", apply_params(config, ["deeplab"])),
    output:
        masks=directory(applied("deeplab/masks/shard-{shard}")),
        overlays=directory(applied("deeplab/overlays/shard-{shard}")),
    log:
        results(f"logs/apply/{APPLY['name']}/deeplab/shard-{{shard}}.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        facts=lambda w, input: as_json({"num_classes": model_classes(input)}),
        out_dir=lambda w, output: str(Path(output.masks).parents[2]),
    shell:
        "python -m pipeline apply --step predict --shard {wildcards.shard} --deeplab-model {input.model:q}"
        " --out {params.out_dir:q} --params {input.settings:q} --params {params.facts:q} --threads {threads} > {log:q} 2>&1"


rule apply_report:
    input:
        # separate from the checkpoint-dependent inputs, which stay unknown until apply_index has run
        unpack(lambda w: run_model_inputs("model")),
        unpack(applied_outputs),
        manifest=applied("dataset/manifest.csv"),
        settings=settings_file("apply_report", apply_params(config, ["report"])),
    output:
        report=applied("report.md"),
        gallery=applied("gallery.png"),
        shares=applied("class_shares.csv"),
    log:
        results(f"logs/apply/{APPLY['name']}/report.log"),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        facts=lambda w, input: as_json(
            {
                "num_classes": model_classes(input),
                "class_names": json.loads(Path(input.classes).read_text())["names"],
            }
        ),
        out_dir=lambda w, output: str(Path(output.report).parent),
        deeplab=lambda w, input: (
            f"--deeplab-model {shlex.quote(input.deeplab_model)}" if "deeplab_model" in input.keys() else ""
        ),
    shell:
        "python -m pipeline apply --step report --model {input.model_model:q} {params.deeplab}"
        " --out {params.out_dir:q} --params {input.settings:q} --params {params.facts:q} > {log:q} 2>&1"
