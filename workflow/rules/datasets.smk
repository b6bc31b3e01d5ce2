# Dataset stage: demo generation, COCO mask conversion, and the dataset index (manifest).


rule demo_data:
    input:
        settings=settings_file("demo_data", {"seed": config["seed"], "demo": DATASET.get("demo", {})}),
    output:
        directory(results("data/demo")),
    log:
        results("logs/demo_data.log"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m pipeline demo-data --out {output:q} --params {input.settings:q} > {log:q} 2>&1"


rule coco_masks:
    input:
        annotations=lambda w: str(Path(DATASET["coco"]["root"]) / DATASET["coco"][f"{w.split}_annotations"]),
    output:
        directory(f"{DATASET.get('coco', {}).get('masks_cache', 'data/coco/semantic_masks')}/{{split}}"),
    log:
        results("logs/coco_masks_{split}.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 4
    shell:
        "python -m pipeline coco-masks --annotations {input.annotations:q} --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


checkpoint dataset_index:
    input:
        unpack(index_inputs),
        settings=settings_file("dataset_index", index_settings()),
    output:
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        skipped=results("dataset/skipped.csv"),
    log:
        results("logs/dataset_index.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    params:
        facts=index_facts,
        out_dir=lambda w, output: str(Path(output.manifest).parent),
    shell:
        "python -m pipeline index --params {input.settings:q} --params {params.facts:q} --out-dir {params.out_dir:q}"
        " --threads {threads} > {log:q} 2>&1"
