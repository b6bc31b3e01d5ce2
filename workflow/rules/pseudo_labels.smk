# Unsupervised front half (paper 000 Sec. 3.3): spectral segments and crop features per shard,
# then one clustering job for the dataset, and its report against GT where GT exists.


rule spectral_segments:
    input:
        features=results("features/shard-{shard}.safetensors"),
        manifest=shard_list,
        settings=settings_file(
            "spectral_segments",
            {"spectral": section("spectral"), "seed": config["seed"]},
            runtime_keys("spectral"),
        ),
    output:
        results("spectral/shard-{shard}.safetensors"),
    log:
        results("logs/spectral_segments/shard-{shard}.log"),
    benchmark:
        results("benchmarks/spectral_segments/shard-{shard}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("spectral_segments"),
    shell:
        "python -m pipeline spectral-segments --features {input.features:q} --manifest {input.manifest:q}"
        " --out {output:q} --params {input.settings:q} --params {params.runtime:q} --threads {threads} > {log:q} 2>&1"


rule segment_features:
    input:
        spectral=results("spectral/shard-{shard}.safetensors"),
        features=results("features/shard-{shard}.safetensors"),
        manifest=shard_list,
        weights=weights_input(),
        settings=settings_file(
            "segment_features",
            {
                "backbone": config["backbone"],
                "features": section("features"),
                "segment_features": section("segment_features"),
                "seed": config["seed"],
            },
            runtime_keys("features", "segment_features"),
        ),
    output:
        results("segment_features/shard-{shard}.safetensors"),
    log:
        results("logs/segment_features/shard-{shard}.log"),
    benchmark:
        results("benchmarks/segment_features/shard-{shard}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("segment_features"),
    shell:
        "python -m pipeline segment-features --spectral {input.spectral:q} --features {input.features:q}"
        " --manifest {input.manifest:q} --out {output:q} --params {input.settings:q} --params {params.runtime:q}"
        " --threads {threads} > {log:q} 2>&1"


rule pseudo_labels:
    input:
        segment_features=lambda w: sharded("segment_features"),
        spectral=lambda w: sharded("spectral"),
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        settings=settings_file("pseudo_labels", {"pseudo_labels": config["pseudo_labels"], "seed": config["seed"]}),
    output:
        labels=results("pseudo_labels/image_labels.csv"),
        crops=results("pseudo_labels/crops.csv"),
        maps=results("pseudo_labels/maps.safetensors"),
        summary=results("pseudo_labels/summary.json"),
    log:
        results("logs/pseudo_labels.log"),
    benchmark:
        results("benchmarks/pseudo_labels.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        out_dir=lambda w, output: str(Path(output.labels).parent),
    shell:
        "python -m pipeline pseudo-labels --segment-features {input.segment_features:q}"
        " --spectral {input.spectral:q} --manifest {input.manifest:q} --classes {input.classes:q}"
        " --out-dir {params.out_dir:q} --params {input.settings:q} --threads {threads} > {log:q} 2>&1"


rule pseudo_label_report:
    input:
        labels=rules.pseudo_labels.output.labels,
        maps=rules.pseudo_labels.output.maps,
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
    output:
        csv=report(
            results("reports/pseudo_labels.csv"),
            caption="../report/pseudo_labels.rst",
            category="Pseudo-labels",
        ),
        md=results("reports/pseudo_labels.md"),
    log:
        results("logs/pseudo_label_report.log"),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        pseudo_dir=lambda w, input: str(Path(input.labels).parent),
    shell:
        "python -m pipeline pseudo-label-report --pseudo-dir {params.pseudo_dir:q} --manifest {input.manifest:q}"
        " --classes {input.classes:q} --csv {output.csv:q} --md {output.md:q} > {log:q} 2>&1"
