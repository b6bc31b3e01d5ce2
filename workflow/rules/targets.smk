# Stage targets: `snakemake --cores all <target>` builds one stage and everything it needs, and
# nothing after it, also from an empty results folder. Their inputs are functions that read the
# dataset_index checkpoint, so Snakemake runs the index first and then plans the shard jobs
# (`--until <rule>` cannot do that: it sees no shard job before the index exists). Each also
# takes the manifest, so that an index out of date (new or changed images) is redone first and
# the shard jobs are planned on the new one.


rule index:
    input:
        rules.dataset_index.output,
    localrule: True


rule features:
    input:
        results("dataset/manifest.csv"),
        lambda w: sharded("features"),
    localrule: True


rule segments:
    input:
        results("dataset/manifest.csv"),
        lambda w: sharded("spectral") + sharded("segment_features"),
    localrule: True


rule train:
    input:
        rules.train_model.output,
    localrule: True


rule masks:
    input:
        results("dataset/manifest.csv"),
        lambda w: sharded("model/probs") + sharded_dirs(MASK_STAGES["model"]),
    localrule: True


rule crf:
    input:
        results("dataset/manifest.csv"),
        lambda w: sharded_dirs(MASK_STAGES["crf"]),
    localrule: True


rule deeplab:
    input:
        results("dataset/manifest.csv"),
        lambda w: all_mask_dirs("deeplab"),
    localrule: True


rule evaluate:
    input:
        results("dataset/manifest.csv"),
        lambda w: eval_targets(),
    localrule: True


# `snakemake --cores all random_walk`: the walked masks of every shard (and what they need).
rule random_walk:
    input:
        results("dataset/manifest.csv"),
        lambda w: sharded("affinity/probs") + sharded_dirs("affinity/masks"),
    localrule: True
