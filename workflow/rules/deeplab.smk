# DeepLab verification (paper 000 App. Table 11): DeepLabV3+ trained on the train split's
# CRF-refined pseudo-masks, then evaluated on val like every other stage.


rule train_deeplab:
    input:
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        masks=lambda w: sharded_dirs(MASK_STAGES["crf"]),
        pseudo_summary=lambda w: [results("pseudo_labels/summary.json")] if config["mode"] == "unsupervised" else [],
    output:
        # checkpoint.pt in the same folder is deliberately not an output: Snakemake deletes declared
        # outputs before rerunning a job, and a killed job resumes from it.
        model=results("deeplab/model.pt"),
        done=results("deeplab/done.json"),
    params:
        cfg=lambda w, input: as_json(
            {"deeplab": config["deeplab"], "num_classes": model_classes(input), "seed": config["seed"]}
        ),
        out_dir=lambda w, output: str(Path(output.model).parent),
    log:
        results("logs/train_deeplab.log"),
    benchmark:
        results("benchmarks/train_deeplab.tsv")
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m pipeline train-deeplab --manifest {input.manifest:q} --masks {input.masks:q}"
        " --out-dir {params.out_dir:q} --params {params.cfg:q} --threads {threads} > {log:q} 2>&1"


rule predict_deeplab:
    input:
        manifest=results("dataset/manifest.csv"),
        model=results("deeplab/model.pt"),
    output:
        masks=directory(results("deeplab/masks/{split}")),
    params:
        cfg=as_json({"deeplab": config["deeplab"]}),
    log:
        results("logs/predict_deeplab/{split}.log"),
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m pipeline predict-deeplab --manifest {input.manifest:q} --split {wildcards.split}"
        " --model {input.model:q} --out-masks {output.masks:q} --params {params.cfg:q} --threads {threads}"
        " > {log:q} 2>&1"
