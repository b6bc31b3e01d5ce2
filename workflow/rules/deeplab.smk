# DeepLab verification (paper 000 App. Table 11): the DeepLab of `deeplab.recipe` (v2, v3plus,
# comus) trained on the train split's CRF-refined pseudo-masks, then evaluated on val like every
# other stage. done.json names the recipe and network that ran (`recipe`, `network`).


rule train_deeplab:
    input:
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        masks=lambda w: sharded_dirs(MASK_STAGES["crf"]),
        pseudo_summary=lambda w: [results("pseudo_labels/summary.json")] if config["mode"] == "unsupervised" else [],
        settings=settings_file(
            "train_deeplab",
            # keys that only steer prediction do not retrain
            {"deeplab": deeplab_train_section(), "seed": config["seed"]},
            runtime_keys("deeplab"),
        ),
    output:
        # checkpoint.pt in the same folder is deliberately not an output: Snakemake deletes declared
        # outputs before rerunning a job, and a killed job resumes from it.
        model=results("deeplab/model.pt"),
        done=results("deeplab/done.json"),
    log:
        results("logs/train_deeplab.log"),
    benchmark:
        results("benchmarks/train_deeplab.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    params:
        runtime=runtime_file("train_deeplab"),
        facts=lambda w, input: as_json({"num_classes": model_classes(input)}),
        out_dir=lambda w, output: str(Path(output.model).parent),
    shell:
        "python -m pipeline train-deeplab --manifest {input.manifest:q} --masks {input.masks:q}"
        " --out-dir {params.out_dir:q} --params {input.settings:q} --params {params.runtime:q} --params {params.facts:q}"
        " --threads {threads} > {log:q} 2>&1"


rule predict_deeplab:
    input:
        manifest=results("dataset/manifest.csv"),
        model=results("deeplab/model.pt"),
        settings=settings_file(
            "predict_deeplab",
            {"deeplab": {key: config["deeplab"][key] for key in DEEPLAB_TEST_KEYS if key != "predict_splits"}},
            runtime_keys("deeplab"),
        ),
    output:
        masks=directory(results("deeplab/masks/{split}")),
    log:
        results("logs/predict_deeplab/{split}.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("predict_deeplab"),
    shell:
        "python -m pipeline predict-deeplab --manifest {input.manifest:q} --split {wildcards.split}"
        " --model {input.model:q} --out-masks {output.masks:q} --params {input.settings:q} --params {params.runtime:q}"
        " --threads {threads}"
        " > {log:q} 2>&1"
