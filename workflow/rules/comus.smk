# COMUS (paper 002, Algorithm 1), when comus.enabled (common.smk: its rounds are the mask stages):
# proposals -> CLS features of the crops -> clustering + filtering -> pseudo-masks -> DeepLab
# self-training rounds, each its own cached stage; round r > 1 trains on round r-1's train masks.


# The user's files the proposals read (main process only: a walk of the saliency folder).
COMUS_INPUT_FILES = [
    path for path in (COMUS["saliency_dir"], COMUS["first_round_list"]) if path and workflow.is_main_process
]


# Settings files per round, written while the workflow is read (round r's file reruns round r only).
COMUS_ROUND_SETTINGS = {
    r: settings_file(
        f"comus_train_round{r}",
        {"deeplab": comus_round_section(r), "seed": config["seed"]},
        runtime_keys("deeplab"),
    )
    for r in COMUS_ROUNDS
}


rule comus_proposals:
    input:
        manifest=results("dataset/manifest.csv"),
        # the label-free proposals (no saliency folder) are the foreground of the spectral segments
        spectral=lambda w: [] if COMUS["saliency_dir"] else sharded("spectral"),
        weights=weights_input(),
        settings=settings_file(
            "comus_proposals",
            {
                "comus": without(COMUS, ("rounds", "epochs")),
                "backbone": config["backbone"],
                "seed": config["seed"],
                # an added, removed or edited saliency map (or first-round list) reruns the proposals
                "files": files_fingerprint(COMUS_INPUT_FILES) if COMUS_INPUT_FILES else None,
            },
            runtime_keys("features"),
        ),
    output:
        directory(results("comus/proposals")),
    log:
        results("logs/comus_proposals.log"),
    benchmark:
        results("benchmarks/comus_proposals.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
    params:
        runtime=runtime_file("comus_proposals"),
        spectral=lambda w, input: " ".join(["--spectral", *map(shlex.quote, input.spectral)]) if input.spectral else "",
    shell:
        "python -m pipeline comus-proposals --manifest {input.manifest:q} {params.spectral} --out-dir {output:q}"
        " --params {input.settings:q} --params {params.runtime:q} --threads {threads} > {log:q} 2>&1"


rule comus_pseudo_masks:
    input:
        proposals=results("comus/proposals"),
        classes=results("dataset/classes.json"),
        settings=settings_file("comus_pseudo_masks", {"pseudo_labels": config["pseudo_labels"], "seed": config["seed"]}),
    output:
        masks=directory(results("comus/pseudo_masks")),
        clusters=results("comus/clusters.csv"),
        images=results("comus/training_images.csv"),
        summary=results("comus/summary.json"),
    log:
        results("logs/comus_pseudo_masks.log"),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        out_dir=lambda w, output: str(Path(output.summary).parent),
    shell:
        "python -m pipeline comus-pseudo-masks --proposals {input.proposals:q} --classes {input.classes:q}"
        " --out-masks {output.masks:q} --out-dir {params.out_dir:q} --params {input.settings:q}"
        " --threads {threads} > {log:q} 2>&1"


rule comus_train_round:
    input:
        unpack(comus_round_masks),
        manifest=results("dataset/manifest.csv"),
        pseudo_summary=[results("comus/summary.json")],
        settings=lambda w: COMUS_ROUND_SETTINGS[int(w.round)],
    output:
        # checkpoint.pt beside it is not an output, as in train_deeplab: a killed round resumes
        model=results("comus/round{round}/model.pt"),
        done=results("comus/round{round}/done.json"),
    log:
        results("logs/comus_train_round{round}.log"),
    benchmark:
        results("benchmarks/comus_train_round{round}.tsv")
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 600 * attempt,
    params:
        runtime=lambda w: runtime_file(f"comus_train_round{w.round}"),
        facts=lambda w, input: as_json({"num_classes": predicted_classes(input)}),
        images=lambda w, input: f"--images {shlex.quote(input.images)}" if "images" in input.keys() else "",
        out_dir=lambda w, output: str(Path(output.model).parent),
    shell:
        "python -m pipeline train-deeplab --manifest {input.manifest:q} --masks {input.masks:q} {params.images}"
        " --out-dir {params.out_dir:q} --params {input.settings:q} --params {params.runtime:q} --params {params.facts:q}"
        " --threads {threads} > {log:q} 2>&1"


rule comus_predict_round:
    input:
        manifest=results("dataset/manifest.csv"),
        model=results("comus/round{round}/model.pt"),
        settings=settings_file(
            "comus_predict_round",
            {"deeplab": {key: config["deeplab"][key] for key in DEEPLAB_TEST_KEYS if key != "predict_splits"}},
            runtime_keys("deeplab"),
        ),
    output:
        masks=directory(results("comus/round{round}/masks/{split}")),
    log:
        results("logs/comus_predict_round{round}/{split}.log"),
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPUS_PER_JOB,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        runtime=runtime_file("comus_predict_round"),
    shell:
        "python -m pipeline predict-deeplab --manifest {input.manifest:q} --split {wildcards.split}"
        " --model {input.model:q} --out-masks {output.masks:q} --params {input.settings:q} --params {params.runtime:q}"
        " --threads {threads} > {log:q} 2>&1"
