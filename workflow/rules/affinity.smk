# AffinityNet random-walk refinement (Ahn & Kwak, CVPR 2018; pipeline/affinity), optional
# (affinity.enabled): AffinityNet learns pixel affinities from the confident regions of the train
# split's predicted probability maps; every shard's maps are then walked. Reads the prediction
# stage's outputs model/probs/shard-*.safetensors (rule predict_model).

# Keys that only change the walk: changing them does not retrain AffinityNet.
AFFINITY_WALK_KEYS = ("alpha_walk", "beta", "log_t", "max_size")


rule train_affinity:
    input:
        manifest=results("dataset/manifest.csv"),
        probs=lambda w: sharded("model/probs"),
        # a weights file is an input: replacing it retrains
        weights=[w for w in [config["affinity"]["backbone_weights"]] if w != "random"],
        settings=settings_file(
            "train_affinity",
            {
                "affinity": without(section("affinity"), ("enabled",) + AFFINITY_WALK_KEYS),
                "seed": config["seed"],
            },
            runtime_keys("affinity"),
        ),
    output:
        model=results("affinity/model.pt"),
        done=results("affinity/done.json"),
        history=results("affinity/history.csv"),
    log:
        results("logs/train_affinity.log"),
    benchmark:
        results("benchmarks/train_affinity.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    params:
        runtime=runtime_file("train_affinity"),
        out_dir=lambda w, output: str(Path(output.model).parent),
    shell:
        "python -m pipeline train-affinity --manifest {input.manifest:q} --probs {input.probs:q}"
        " --out-dir {params.out_dir:q} --params {input.settings:q} --params {params.runtime:q}"
        " --threads {threads} > {log:q} 2>&1"


rule refine_affinity:
    input:
        probs=results("model/probs/shard-{shard}.safetensors"),
        manifest=shard_list,
        model=results("affinity/model.pt"),
        settings=settings_file(
            "refine_affinity",
            {"affinity": without(section("affinity"), ("enabled",))},
            runtime_keys("affinity"),
        ),
    output:
        probs=results("affinity/probs/shard-{shard}.safetensors"),
        masks=directory(results("affinity/masks/shard-{shard}")),
    log:
        results("logs/refine_affinity/shard-{shard}.log"),
    benchmark:
        results("benchmarks/refine_affinity/shard-{shard}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("refine_affinity"),
    shell:
        "python -m pipeline refine-affinity --probs {input.probs:q} --manifest {input.manifest:q}"
        " --model {input.model:q} --out-probs {output.probs:q} --out-masks {output.masks:q}"
        " --params {input.settings:q} --params {params.runtime:q} --threads {threads} > {log:q} 2>&1"
