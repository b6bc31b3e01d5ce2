# Dense-CRF refinement of the PC2M probability maps (BPM+CRF), and the evaluation of every stage's
# masks against GT with a streaming confusion matrix.


rule crf:
    input:
        probs=results("pc2m/probs/shard-{shard}.safetensors"),
        manifest=results("dataset/manifest.csv"),
    output:
        masks=directory(results("crf/masks/shard-{shard}")),
    params:
        cfg=as_json(config["crf"]),
    log:
        results("logs/crf/shard-{shard}.log"),
    benchmark:
        results("benchmarks/crf/shard-{shard}.tsv")
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/crf.yaml"
    shell:
        "python -m pipeline crf --probs {input.probs:q} --manifest {input.manifest:q} --out-masks {output.masks:q}"
        " --params {params.cfg:q} --threads {threads} > {log:q} 2>&1"


rule evaluate:
    input:
        masks=lambda w: sharded_dirs(MASK_STAGES[w.stage]),
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        pseudo_summary=lambda w: [results("pseudo_labels/summary.json")] if config["mode"] == "unsupervised" else [],
    output:
        json=results("eval/{stage}-{split}.json"),
        csv=results("eval/{stage}-{split}.csv"),
    params:
        cfg=lambda w, input: as_json(
            {"mode": config["mode"], "evaluate": config["evaluate"], "num_predicted_classes": predicted_classes(input)}
        ),
    log:
        results("logs/evaluate/{stage}-{split}.log"),
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m pipeline evaluate --masks {input.masks:q} --manifest {input.manifest:q} --classes {input.classes:q}"
        " --split {wildcards.split} --out-json {output.json:q} --out-csv {output.csv:q} --params {params.cfg:q}"
        " > {log:q} 2>&1"
