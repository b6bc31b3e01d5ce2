"""Every training method through the real workflow: the demo DAG with ``train.method`` switched,
in weak and unsupervised mode, ends in the report that names the method."""

from __future__ import annotations

import subprocess

import pytest
from test_rcm_mam import rcm_train_settings

from workflow_runs import SNAKEMAKE, job_counts, tiny_config, write_config


def rcm_config(tmp_path, mode: str) -> dict:
    config = tiny_config(tmp_path / "results", mode=mode)
    rcm = rcm_train_settings()["rcm_mam"]
    config["train"].update(method="rcm_mam", rcm_mam=rcm)
    config["predict"]["rcm_mam"] = {"scales": [0.5, 1.0], "background": 0.2}
    return config


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weak", "unsupervised"])
def test_rcm_mam_runs_end_to_end_and_the_report_names_it(tmp_path, mode):
    configfile = write_config(tmp_path / "config.yaml", rcm_config(tmp_path, mode))
    run = subprocess.run([*SNAKEMAKE, "--configfile", str(configfile)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = job_counts(run.stdout + run.stderr)
    assert counts["train_model"] == 1 and counts["report"] == 1
    assert len(list((tmp_path / "results" / "model" / "masks").glob("shard-*/*.png"))) == 12  # every image
    assert ("pseudo_labels" in counts) == (mode == "unsupervised")
    summary = (tmp_path / "results" / "reports" / "summary.md").read_text()
    assert summary.startswith("# RCM+MAM results") and f"Mode: {mode}" in summary
    assert "RCM+MAM (val)" in summary and "DeepLab (RCM+MAM, val)" in summary
    # the CAMs per inference scale (paper 003 Table 5), where the train images have GT: weak mode
    table = tmp_path / "results" / "reports" / "cam_scales.csv"
    assert table.is_file() == (mode == "weak") and ("CAMs per inference scale" in summary) == (mode == "weak")
    if mode == "weak":
        import pandas as pd

        rows = pd.read_csv(table)
        assert list(rows["scale"].astype(str)) == ["0.5", "1", "msinf"] and rows["images"].eq(8).all()
        assert rows[["miou", "precision", "recall"]].apply(lambda c: c.between(0, 1)).all().all()
