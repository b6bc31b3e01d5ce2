# Feature stage: one job per shard of the manifest (a cluster runs shards in parallel and a rerun
# redoes only the shards that are missing).


rule extract_features:
    input:
        manifest=shard_list,
        weights=weights_input(),
        settings=settings_file(
            "extract_features",
            {"backbone": config["backbone"], "features": section("features"), "seed": config["seed"]},
            runtime_keys("features"),
        ),
    output:
        results("features/shard-{shard}.safetensors"),
    log:
        results("logs/extract_features/shard-{shard}.log"),
    benchmark:
        results("benchmarks/extract_features/shard-{shard}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("extract_features"),
    shell:
        "python -m pipeline extract-features --manifest {input.manifest:q} --shard {wildcards.shard}"
        " --out {output:q} --params {input.settings:q} --params {params.runtime:q} --threads {threads} > {log:q} 2>&1"
