"""Every training method through the real workflow: the demo DAG with ``train.method`` switched,
in weak and unsupervised mode, ends in the report that names the method. The unsupervised RCM+MAM
run also walks its CAMs with AffinityNet (paper 003 Sec. 4.3; the stage any method can switch on),
switched on from the command line as the README says."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from test_rcm_mam import rcm_train_settings

from workflow_runs import SNAKEMAKE, job_counts, reference_copy, tiny_config, write_config


def rcm_config(results: Path, mode: str) -> dict:
    # the random walk's tiny sizes (it runs when switched on: unsupervised below)
    affinity = {"epochs": 1, "batch_size": 2, "crop_size": 32, "num_workers": 0, "max_size": 64}
    config = tiny_config(results, mode=mode, affinity=affinity)
    rcm = rcm_train_settings()["rcm_mam"]
    config["train"].update(method="rcm_mam", rcm_mam=rcm)
    config["predict"]["rcm_mam"] = {"scales": [0.5, 1.0], "background": 0.2}
    return config


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weak", "unsupervised"])
def test_rcm_mam_runs_end_to_end_and_the_report_names_it(tmp_path, tmp_path_factory, mode):
    """Unsupervised: in a copy of the session's tiny PC2M run, as a user switching the method on
    their results folder: the features, segments and pseudo-labels stay, RCM+MAM trains on them."""
    walk = mode == "unsupervised"
    results = reference_copy(tmp_path_factory, "rcm-unsupervised") if walk else tmp_path / "results"
    work = results.parent
    configfile = write_config(work / "config.yaml", rcm_config(results, mode))
    switch = ["--config", "affinity={enabled: true}"] if walk else []
    run = subprocess.run([*SNAKEMAKE, "--configfile", str(configfile), *switch], cwd=work, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    output = run.stdout + run.stderr
    counts = job_counts(output)
    assert counts["train_model"] == 1 and counts["report"] == 1
    assert len(list((results / "model" / "masks").glob("shard-*/*.png"))) == 12  # every image
    # weak: the dataset's image labels; unsupervised: the clustering's pseudo-labels, kept from the copied run
    assert not {"extract_features", "spectral_segments", "segment_features", "pseudo_labels"} & set(counts)
    assert (f"--labels {results / 'pseudo_labels' / 'image_labels.csv'}" in output) == walk
    summary = (results / "reports" / "summary.md").read_text()
    assert summary.startswith("# RCM+MAM results") and f"Mode: {mode}" in summary
    assert "RCM+MAM (val)" in summary and "DeepLab (RCM+MAM, val)" in summary
    # the random walk: trained once, run per shard, its masks scored, and the CRF refines the walked maps
    # (jobs counted as they finish: the plan's first table holds no shard job, printed before the index exists)
    finished = Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output))
    assert finished["predict_model"] == 2
    assert (finished["train_affinity"], finished["refine_affinity"]) == ((1, 2) if walk else (0, 0))
    assert len(list(results.glob("affinity/masks/shard-*/*.png"))) == (12 if walk else 0)
    assert ("--probs " + str(results / "affinity/probs/shard-00000.safetensors") in output) == walk
    assert all((results / f"eval/affinity-{split}.json").is_file() == walk for split in ("train", "val"))
    assert ("RCM+MAM+RW (train)" in summary and "RCM+MAM+RW (val)" in summary) == walk
    # the CAMs per inference scale (paper 003 Table 5), where the train images have GT: weak mode
    table = results / "reports" / "cam_scales.csv"
    assert table.is_file() == (mode == "weak") and ("CAMs per inference scale" in summary) == (mode == "weak")
    if mode == "weak":
        import pandas as pd

        rows = pd.read_csv(table)
        assert list(rows["scale"].astype(str)) == ["0.5", "1", "msinf"] and rows["images"].eq(8).all()
        assert rows[["miou", "precision", "recall"]].apply(lambda c: c.between(0, 1)).all().all()


def csrm_config(tmp_path) -> dict:
    """CSRM from a CAM baseline the workflow trains first, at toy size (paper 004's DAG, weak mode)."""
    config = tiny_config(tmp_path / "results", mode="weak")
    cam = dict(backbone="resnet10t", weights="random", epochs=1, batch_size=4, lr=0.1, lr_power=0.9, momentum=0.0,
               weight_decay=1e-4, crop_size=32, long_side_range=[32, 64], flip=True, jitter=False, puzzle_alpha=4.0,
               puzzle_ramp=0.5, freeze_batchnorm=False)
    config["train"].update(method="csrm", cam=cam, csrm={"image_size": 32, "queries": 4, "negatives": 8})
    config["predict"].update(cam={"scales": [1.0], "background": 0.35}, csrm={"scales": [0.5, 1.0]})
    return config


@pytest.mark.slow
def test_csrm_runs_from_its_cam_baseline_to_the_report(tmp_path):
    configfile = write_config(tmp_path / "config.yaml", csrm_config(tmp_path))
    run = subprocess.run([*SNAKEMAKE, "--configfile", str(configfile)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = job_counts(run.stdout + run.stderr)
    assert counts["train_cam_baseline"] == 1 and counts["train_model"] == 1 and counts["report"] == 1
    assert counts["train_deeplab"] == 1 and "pseudo_labels" not in counts
    results = tmp_path / "results"
    import json

    done = json.loads((results / "model" / "done.json").read_text())
    assert done["method"] == "csrm" and done["init"] == str(results / "cam_baseline" / "model.pt")
    history = (results / "model" / "history.csv").read_text().splitlines()
    assert history[0].split(",")[:1] and {"c", "s", "s2c", "u", "m", "lambda_u"} <= set(history[0].split(","))
    assert len(list((results / "model" / "masks").glob("shard-*/*.png"))) == 12
    # the CAM baseline's own masks are scored beside CSRM's (paper 004 Table 2: baseline, then CSRM)
    assert len(list((results / "cam_baseline" / "masks").glob("shard-*/*.png"))) == 12
    summary = (results / "reports" / "summary.md").read_text()
    assert summary.startswith("# CSRM results") and "DeepLab (CSRM, val)" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| class_id"))
    assert header.index("CAM baseline (CSRM, train)") < header.index("CSRM (train)") < header.index("CSRM (val)")
