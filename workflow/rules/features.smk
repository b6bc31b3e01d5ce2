# Feature stage: one job per shard of the manifest (a cluster runs shards in parallel and a rerun
# redoes only the shards that are missing).


rule extract_features:
    input:
        manifest=results("dataset/manifest.csv"),
    output:
        results("features/shard-{shard}.safetensors"),
    params:
        cfg=as_json(
            {"backbone": config["backbone"], "features": config["features"], "seed": config["seed"]}
        ),
    log:
        results("logs/extract_features/shard-{shard}.log"),
    benchmark:
        results("benchmarks/extract_features/shard-{shard}.tsv")
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m pipeline extract-features --manifest {input.manifest:q} --shard {wildcards.shard}"
        " --out {output:q} --params {params.cfg:q} --threads {threads} > {log:q} 2>&1"
