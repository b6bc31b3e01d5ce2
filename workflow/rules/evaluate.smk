# Dense-CRF refinement of the PC2M probability maps (BPM+CRF), and the evaluation of every stage's
# masks against GT with a streaming confusion matrix.


rule dense_crf:
    input:
        # the walked probabilities when affinity.enabled (CRF_PROBS, common.smk)
        probs=results(f"{CRF_PROBS}/shard-{{shard}}.safetensors"),
        manifest=shard_list,
        settings=settings_file("dense_crf", config["crf"]),
    output:
        masks=directory(results("crf/masks/shard-{shard}")),
    log:
        results("logs/crf/shard-{shard}.log"),
    benchmark:
        results("benchmarks/crf/shard-{shard}.tsv")
    conda:
        "../../envs/crf.yaml"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    shell:
        "python -m pipeline crf --probs {input.probs:q} --manifest {input.manifest:q} --out-masks {output.masks:q}"
        " --params {input.settings:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_split:
    input:
        masks=lambda w: mask_dirs(w.stage, w.split),
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        pseudo_summary=lambda w: pseudo_summary_input(),
        settings=settings_file("evaluate_split", {"mode": config["mode"], "evaluate": config["evaluate"]}),
    output:
        json=results("eval/{stage}-{split}.json"),
        csv=results("eval/{stage}-{split}.csv"),
    log:
        results("logs/evaluate/{stage}-{split}.log"),
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    params:
        facts=lambda w, input: as_json({"num_predicted_classes": predicted_classes(input)}),
    shell:
        "python -m pipeline evaluate --masks {input.masks:q} --manifest {input.manifest:q} --classes {input.classes:q}"
        " --split {wildcards.split} --out-json {output.json:q} --out-csv {output.csv:q}"
        " --params {input.settings:q} --params {params.facts:q}"
        " > {log:q} 2>&1"


rule report:
    input:
        evals=lambda w: eval_targets(),
        manifest=results("dataset/manifest.csv"),
        classes=results("dataset/classes.json"),
        # COMUS (common.smk): no patch classifier, so no history; its summary names the method and
        # classes, and its last round is the DeepLab whose recipe the report names
        history=[] if COMUS_ENABLED else [results("model/history.csv")],
        done=results("comus/summary.json" if COMUS_ENABLED else "model/done.json"),
        deeplab_done=results(f"comus/round{COMUS_ROUNDS[-1]}/done.json" if COMUS_ENABLED else "deeplab/done.json"),
        masks=lambda w: [d for stage in MASK_STAGES for d in all_mask_dirs(stage)],
        pseudo=lambda w: (
            [results("reports/pseudo_labels.csv")] if config["mode"] == "unsupervised" and not COMUS_ENABLED else []
        ),
        cam_scales=lambda w: cam_scale_inputs(),
        compared=lambda w: compared_inputs(),
        settings=settings_file(
            "report",
            {
                "mode": config["mode"],
                "qualitative_images": 4,
                "gallery_images": 4,
                "compare_with": config["report"]["compare_with"],
            },
        ),
    output:
        summary=report(results("reports/summary.csv"), caption="../report/summary.rst", category="Results"),
        markdown=results("reports/summary.md"),
        per_class=report(
            results("reports/per_class_iou.png"), caption="../report/per_class_iou.rst", category="Results"
        ),
        alpha=report(results("reports/alpha.png"), caption="../report/alpha.rst", category="Training"),
        curves=report(results("reports/training.png"), caption="../report/training.rst", category="Training"),
        qualitative=report(results("reports/qualitative.png"), caption="../report/qualitative.rst", category="Results"),
        clusters=report(results("reports/clusters.csv"), caption="../report/clusters.rst", category="Results"),
        gallery=report(results("reports/gallery.png"), caption="../report/gallery.rst", category="Results"),
    log:
        results("logs/report.log"),
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        facts=lambda w: as_json(
            # pairs, not a mapping: as_json sorts keys, and the figures' columns follow the stages' order
            {"stage_mask_dirs": [[s, {split: mask_dirs(s, split) for split in stage_splits(s)}] for s in MASK_STAGES]}
        ),
        out_dir=lambda w, output: str(Path(output.summary).parent),
        history=lambda w, input: f"--history {shlex.quote(input.history[0])}" if input.history else "",
        pseudo=lambda w, input: f"--pseudo-labels {shlex.quote(input.pseudo[0])}" if input.pseudo else "",
        cam_scales=lambda w, input: f"--cam-scales {shlex.quote(input.cam_scales[0])}" if input.cam_scales else "",
    shell:
        "python -m pipeline report --eval {input.evals:q} --manifest {input.manifest:q} --classes {input.classes:q}"
        " {params.history} --done {input.done:q} --deeplab-done {input.deeplab_done:q}"
        " {params.pseudo} {params.cam_scales}"
        " --out-dir {params.out_dir:q}"
        " --params {input.settings:q} --params {params.facts:q} > {log:q} 2>&1"
