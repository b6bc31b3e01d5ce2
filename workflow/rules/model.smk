# Training of every method (train.method; paper 000 Sec. 3.1-3.2, 4.2 for PC2M) and its sharded
# inference: class-probability maps and masks of every image (train split: the baseline
# pseudo-masks, BPM; val split: the method on val). results/{trained}: model, or cam_baseline (the
# CAM classifier CSRM starts from, whose masks the report scores too).


rule train_model:
    input:
        unpack(train_inputs),
        settings=settings_file(
            "train_model",
            {
                "backbone": config["backbone"],
                "train": train_section(),
                "mode": config["mode"],
                "seed": config["seed"],
            },
            runtime_keys("train"),
        ),
    output:
        model=results("model/model.pt"),
        done=results("model/done.json"),
        history=report(results("model/history.csv"), caption="../report/training.rst", category="Training"),
    log:
        results("logs/train_model.log"),
    benchmark:
        results("benchmarks/train_model.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=TRAIN_GPUS,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    params:
        runtime=runtime_file("train_model"),
        out_dir=lambda w, output: str(Path(output.model).parent),
        labels=lambda w, input: f"--labels {shlex.quote(input.labels)}" if "labels" in input.keys() else "",
    shell:
        # more than one GPU: torchrun, one data-parallel process per GPU (pipeline/devices.py)
        "python -m pipeline.devices launch --gpus {resources.gpu} --"
        " train --manifest {input.manifest:q} --classes {input.classes:q} {params.labels}"
        " --out-dir {params.out_dir:q} --params {input.settings:q} --params {params.runtime:q} --threads {threads}"
        " > {log:q} 2>&1"


rule train_cam_baseline:
    # The CAM classifier CSRM starts from (paper 004 Sec. 3.2.6; Puzzle-CAM, train.cam).
    input:
        unpack(training_data_inputs),
        settings=settings_file(
            "train_cam_baseline",
            {
                "backbone": config["backbone"],
                "train": cam_baseline_section(),
                "mode": config["mode"],
                "seed": config["seed"],
            },
            runtime_keys("train"),
        ),
    output:
        model=results(CAM_BASELINE),
        done=results("cam_baseline/done.json"),
        history=results("cam_baseline/history.csv"),
    log:
        results("logs/train_cam_baseline.log"),
    benchmark:
        results("benchmarks/train_cam_baseline.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=TRAIN_GPUS,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    params:
        runtime=runtime_file("train_cam_baseline"),
        out_dir=lambda w, output: str(Path(output.model).parent),
        labels=lambda w, input: f"--labels {shlex.quote(input.labels)}" if "labels" in input.keys() else "",
    shell:
        "python -m pipeline.devices launch --gpus {resources.gpu} --"
        " train --manifest {input.manifest:q} --classes {input.classes:q} {params.labels}"
        " --out-dir {params.out_dir:q} --params {input.settings:q} --params {params.runtime:q} --threads {threads}"
        " > {log:q} 2>&1"


rule predict_model:
    input:
        unpack(predict_inputs),
        settings=settings_file(
            "predict_model",
            {"backbone": config["backbone"], "predict": section("predict"), "mode": config["mode"]},
            runtime_keys("predict"),
        ),
    output:
        probs=results("{trained}/probs/shard-{shard}.safetensors"),
        masks=directory(results("{trained}/masks/shard-{shard}")),
    log:
        results("logs/predict_{trained}/shard-{shard}.log"),
    benchmark:
        results("benchmarks/predict_{trained}/shard-{shard}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("predict_model"),
        labels=lambda w, input: f"--labels {shlex.quote(input.labels)}" if "labels" in input.keys() else "",
    shell:
        "python -m pipeline predict --manifest {input.manifest:q} --shard {wildcards.shard} --model {input.model:q}"
        " {params.labels} --out-probs {output.probs:q} --out-masks {output.masks:q}"
        " --params {input.settings:q} --params {params.runtime:q}"
        " --threads {threads} > {log:q} 2>&1"


rule cam_scales:
    # RCM+MAM's CAMs per inference scale on the train images with GT (paper 003 Tables 2 and 5).
    input:
        manifest=results("dataset/manifest.csv"),
        model=results("model/model.pt"),
        settings=settings_file(
            "cam_scales",
            {"backbone": config["backbone"], "predict": section("predict")},
            runtime_keys("predict"),
        ),
    output:
        table=results("reports/cam_scales.csv"),
    log:
        results("logs/cam_scales.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("cam_scales"),
    shell:
        "python -m pipeline cam-scales --manifest {input.manifest:q} --model {input.model:q} --split train"
        " --out-csv {output.table:q} --params {input.settings:q} --params {params.runtime:q}"
        " --threads {threads} > {log:q} 2>&1"
