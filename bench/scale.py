"""Scale benchmark (issue 17): which stage grows faster than the data, at VOC and COCO sizes.

Two parts, each runnable alone; every size is a flag, so a quick run uses small ones.

    # a. the whole DAG through snakemake on the synthetic demo at 1/16, 1/4 and the full VOC
    #    trainaug+val image count (12,031), 64x48 px images, a 2-block ViT, reduced training.
    #    Per rule: summed wall time and peak memory from the rules' `benchmark:` tsv files, job
    #    count, and the time of `snakemake -n` (DAG building) before and after the run.
    python bench/scale.py dag --sizes 752 3008 12031 --timeout-min 25

    # DAG building alone at COCO size: a folder of N hard-linked tiny JPEGs, the index checkpoint
    # run once (headers only), then `snakemake -n` over the full workflow timed.
    python bench/scale.py dryrun --images 123287

    # b. dataset-level stages at COCO size on synthetic inputs, one child process per measurement
    #    (time of the stage call and the child's peak RSS, ru_maxrss), growth exponent fitted
    #    over the sizes (log-log least squares).
    python bench/scale.py data --fractions 0.0625 0.25 1 --stages index kmeans spectral eval report

Synthetic inputs of part b: indexing: N copies (hard links) of one 64x48 JPEG in a folder
dataset, headers only (`verify_images: false`) and fully decoded; clustering: n crop features
drawn around 80 random centres (COCO's 80 classes) with noise, 384-d (ViT-S) and 768-d (ViT-B),
clustered as the pseudo-label stage does (L2-normalised, k = 80, config.yaml's iterations,
restarts, n_neighbors); evaluation: N predicted/GT 64x48 masks of 81 classes (hard links) scored
by `pipeline.evaluate`; report: N train images with 8x6 pseudo maps scored by
`pipeline.pseudo_label_report`.

The machine is shared: every row carries the 1-minute load average seen when it started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from machine import cpu_model, print_and_append  # noqa: E402

VOC_TRAIN, VOC_VAL = 10582, 1449
COCO_TRAIN, COCO_VAL = 82783, 40504
COCO_CROPS = 250_000
COCO_CLASSES = 80
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]

# Part a: the demo at 64x48 px through a 2-block ViT, training cut to what shows the per-image
# cost (epochs and iterations fixed, so the training rows measure data loading, not convergence).
DAG_CONFIG = {
    "dataset": {"images_per_shard": 256, "verify_images": False},
    "backbone": {"model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}},
    "features": {"batch_size": 32, "num_workers": 0},
    "segment_features": {"crop_size": 32, "batch_size": 64},
    "train": {"epochs": 1, "warmup_epochs": 0, "global_size": 64, "local_size": 32, "batch_size": 16,
              "num_workers": 0, "keep_checkpoints": 1},
    "predict": {"max_size": 64, "num_workers": 0},
    "deeplab": {"iterations": 20, "batch_size": 4, "crop_size": 32, "checkpoint_every": 10,
                "log_every": 10, "num_workers": 0},
}


def load1() -> float:
    return os.getloadavg()[0]


def machine_line() -> str:
    return (f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs (shared with other agents), "
            f"Python {platform.python_version()}.")


def exponent(sizes: list[float], values: list[float]) -> float | None:
    """Slope of log(value) against log(size), least squares: value ~ size^slope."""
    pairs = [(s, v) for s, v in zip(sizes, values) if v and v > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2f} s"


def fmt_exp(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def run_group(cmd: list[str], cwd: Path, timeout: float | None) -> tuple[int | None, float, str]:
    """Run ``cmd`` in its own process group; on timeout kill the group. (rc or None, s, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.perf_counter() - start, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return None, time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------
# Part a: the whole DAG


def dag_config(size: int, results: Path) -> dict:
    n_val = max(1, round(size * VOC_VAL / (VOC_TRAIN + VOC_VAL)))
    config = json.loads(json.dumps(DAG_CONFIG))
    config["results"] = str(results)
    config["dataset"]["demo"] = {"n_train": size - n_val, "n_val": n_val, "width": 64, "height": 48}
    return config


def benchmark_rows(results: Path) -> dict[str, dict]:
    """Per rule: jobs, summed seconds, peak max_rss (MB) from results/benchmarks/<rule>/*.tsv."""
    per_rule: dict[str, dict] = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        lines = tsv.read_text().splitlines()
        if len(lines) < 2:
            continue
        head, values = lines[0].split("\t"), lines[1].split("\t")
        row = dict(zip(head, values))
        entry = per_rule.setdefault(rule, {"jobs": 0, "s": 0.0, "max_rss": 0.0})
        entry["jobs"] += 1
        entry["s"] += float(row["s"])
        rss = row.get("max_rss", "NA")
        if rss not in ("NA", "-", ""):
            entry["max_rss"] = max(entry["max_rss"], float(rss))
    return per_rule


def dry_run(work: Path, configfile: Path, target: list[str] | None = None) -> tuple[float, int | None]:
    """Seconds of `snakemake -n` and the job count it prints (None when it prints none)."""
    cmd = SNAKEMAKE + ["-n", "--quiet", "rules", *(target or []), "--configfile", str(configfile)]
    rc, seconds, out = run_group(cmd, work, timeout=1800)
    if rc != 0:
        sys.stderr.write(out[-3000:])
        raise SystemExit(f"snakemake -n failed in {work}")
    jobs = None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            jobs = int(parts[1])
    return seconds, jobs


def run_dag(size: int, work: Path, timeout_min: float) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(dag_config(size, work / "results")))
    load = load1()
    dag_before, _ = dry_run(work, configfile)
    cmd = SNAKEMAKE + ["--cores", "2", "--configfile", str(configfile)]
    rc, seconds, out = run_group(cmd, work, timeout=timeout_min * 60)
    if rc not in (0, None):
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"the pipeline failed at {size} images (work folder {work})")
    finished = rc == 0
    dag_after, jobs = dry_run(work, configfile) if finished else (None, None)
    return {"size": size, "finished": finished, "seconds": seconds, "load1": load,
            "dag_before": dag_before, "dag_after": dag_after, "rules": benchmark_rows(work / "results")}


def shards_of(size: int) -> int:
    return math.ceil(size / DAG_CONFIG["dataset"]["images_per_shard"])


def rule_complete(jobs: int, size: int, runs: list[dict], rule: str) -> bool:
    """Whether a stopped run did all of ``rule``'s jobs: as many as a finished run's, scaled by
    the shard count for per-shard rules (a dataset-level rule has one job at every size)."""
    for run in sorted(runs, key=lambda run: -run["size"]):  # the most shards tells per-shard rules apart
        entry = run["rules"].get(rule)
        if run["finished"] and entry is not None:
            per_shard = entry["jobs"] == shards_of(run["size"]) and entry["jobs"] > 1
            return jobs == (shards_of(size) if per_shard else entry["jobs"])
    return False


def dag_table(runs: list[dict]) -> str:
    rules = sorted({rule for run in runs for rule in run["rules"]})
    head = ["rule"] + [f"{r['size']} img: jobs / s / peak MB" for r in runs] + ["exponent (time)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in rules:
        cells, sizes, times = [rule], [], []
        for run in runs:
            entry = run["rules"].get(rule)
            if entry is None:
                cells.append("not reached")
                continue
            cells.append(f"{entry['jobs']} / {fmt_s(entry['s'])} / {entry['max_rss']:.0f}")
            if run["finished"] or rule_complete(entry["jobs"], run["size"], runs, rule):
                sizes.append(run["size"])
                times.append(entry["s"])
        cells.append(fmt_exp(exponent(sizes, times)))
        lines.append("| " + " | ".join(cells) + " |")
    done = [r for r in runs if r["finished"]]
    total = ["**whole run (wall)**"] + [
        f"{sum(e['jobs'] for e in r['rules'].values())} / {fmt_s(r['seconds'])}"
        + ("" if r["finished"] else " (stopped)") for r in runs
    ] + [fmt_exp(exponent([r["size"] for r in done], [r["seconds"] for r in done]))]
    lines.append("| " + " | ".join(total) + " |")
    dag = ["`snakemake -n` before / after (s)"] + [
        f"{r['dag_before']:.1f} / " + ("—" if r["dag_after"] is None else f"{r['dag_after']:.1f}") for r in runs
    ] + [fmt_exp(exponent([r["size"] for r in done], [r["dag_after"] for r in done]))]
    lines.append("| " + " | ".join(dag) + " |")
    lines.append("| 1-min load at start | " + " | ".join(f"{r['load1']:.2f}" for r in runs) + " | |")
    return "\n".join(lines)


def cmd_dag(args: argparse.Namespace) -> None:
    root = args.keep or Path(tempfile.mkdtemp(prefix="scale-dag-"))
    runs = []
    try:
        for size in sorted(args.sizes):
            run = run_dag(size, root / f"n{size}", args.timeout_min)
            runs.append(run)
            print(f"# {size} images: {run['seconds']:.0f} s, finished={run['finished']}", file=sys.stderr, flush=True)
            (root / "dag-runs.json").write_text(json.dumps(runs, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    runs = sorted(runs + [run for path in args.merge for run in json.loads(path.read_text())],
                  key=lambda run: run["size"])
    text = (f"### Whole DAG (demo 64x48 px, 2-block ViT, reduced training, `--cores 2`)\n\n"
            f"{dag_table(runs)}\n\n{machine_line()}\nConfig over config.yaml: "
            f"`{json.dumps(DAG_CONFIG, separators=(',', ':'))}`\n")
    print_and_append(text, args.out)


# DAG building at COCO size -------------------------------------------------------------------


def tiny_jpeg(path: Path, width: int = 64, height: int = 48) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


# Hard links per copy of the source file (file systems cap links per inode, ext4 at 65,000).
LINKS_PER_COPY = 50_000


def linked_folder(root: Path, n: int, source: Path, pattern: str, subdir: str = "") -> None:
    """``n`` hard links to copies of ``source`` under root/subdir, 1000 per sub-folder (as
    datasets do)."""
    for i in range(n):
        folder = root / subdir / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        target = folder / (pattern % i)
        if not target.exists():
            # Copies beside root (not inside: they would be indexed), one set per folder.
            copy = root.parent / f"{root.name}-{source.stem}-{i // LINKS_PER_COPY}{source.suffix}"
            if not copy.exists():
                shutil.copyfile(source, copy)
            os.link(copy, target)


def cmd_dryrun(args: argparse.Namespace) -> None:
    root = args.keep or Path(tempfile.mkdtemp(prefix="scale-dryrun-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        source = root / "one.jpg"
        tiny_jpeg(source)
        linked_folder(root / "images", args.images, source, "img%07d.jpg", "train")
        config = {
            "results": str(root / "results"),
            "dataset": {"kind": "folder", "images_per_shard": args.images_per_shard, "verify_images": False,
                        "folder": {"images": str(root / "images"), "num_classes": COCO_CLASSES}},
        }
        configfile = root / "config.yaml"
        configfile.write_text(yaml.safe_dump(config))
        load = load1()
        rc, index_s, out = run_group(
            SNAKEMAKE + ["--cores", "2", str(root / "results/dataset/manifest.csv"), "--configfile", str(configfile)],
            root, timeout=3600)
        if rc != 0:
            sys.stderr.write(out[-4000:])
            raise SystemExit("the index job failed")
        dag_s, jobs = dry_run(root, configfile)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    text = (f"### DAG building at {args.images} images (folder dataset, shards of {args.images_per_shard})\n\n"
            "| images | index job via snakemake (headers only) | `snakemake -n` (whole workflow) | jobs "
            "| 1-min load |\n"
            f"|---|---|---|---|---|\n| {args.images} | {fmt_s(index_s)} | {fmt_s(dag_s)} | {jobs} | {load:.2f} |\n\n"
            f"{machine_line()}\n")
    print_and_append(text, args.out)


# ---------------------------------------------------------------------------------------------
# Part b: dataset-level stages, one child process per measurement


def blob_features(n: int, dim: int, k: int, seed: int = 0, noise: float = 3.0) -> np.ndarray:
    """n points around k random N(0, 1) centres plus N(0, noise²) noise, float32. In high dimension
    noise 0.7 or 1.5 still leaves the kNN graph one component per centre; 3 overlaps them (one
    connected graph, as real crop features give)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    labels = rng.integers(k, size=n)
    x = centres[labels]
    x += noise * rng.standard_normal((n, dim), dtype=np.float32)
    return x


def measure_clustering(method: str, n: int, dim: int, noise: float, threads: int) -> float:
    from threadpoolctl import threadpool_limits

    from pipeline.pseudo_labels import cluster_crops

    defaults = yaml.safe_load((REPO / "config.yaml").read_text())["pseudo_labels"]
    params = {**defaults, "method": method, "num_clusters": COCO_CLASSES}
    features = blob_features(n, dim, COCO_CLASSES, noise=noise)
    start = time.perf_counter()
    with threadpool_limits(limits=threads):
        cluster_crops(features, params, seed=0)
    return time.perf_counter() - start


def measure_index(n: int, verify: bool, work: Path) -> float:
    from pipeline.datasets import build_index

    images = work / f"index-images-{n}"  # exactly n images
    source = work / "one.jpg"
    if not source.exists():
        tiny_jpeg(source)
    linked_folder(images, n, source, "img%07d.jpg")
    out = work / f"index-out-{n}-{int(verify)}"
    shutil.rmtree(out, ignore_errors=True)
    params = {"dataset": {"kind": "folder", "images_per_shard": 512, "verify_images": verify,
                          "folder": {"images": str(images), "num_classes": COCO_CLASSES}},
              "on_bad_input": "error"}
    start = time.perf_counter()
    build_index(params, out, threads=2)
    return time.perf_counter() - start


def _masks_dataset(n: int, work: Path, split: str) -> Path:
    """A folder dataset of n 64x48 images with 81-class masks (hard links); its index (untimed)."""
    from PIL import Image

    from pipeline.datasets import build_index

    base = work / f"masks-{split}-{n}"
    out = base / "index"
    if (out / "manifest.csv").exists():
        return out
    rng = np.random.default_rng(1)
    base.mkdir(parents=True, exist_ok=True)
    image, mask = base / "one.jpg", base / "one.png"
    tiny_jpeg(image)
    gt = np.zeros((48, 64), np.uint8)
    gt[8:30, 10:40] = rng.integers(1, COCO_CLASSES + 1)
    gt[30:44, 40:60] = rng.integers(1, COCO_CLASSES + 1)
    Image.fromarray(gt).save(mask)
    linked_folder(base / "images", n, image, "img%07d.jpg", split)
    linked_folder(base / "masks", n, mask, "img%07d.png", split)
    names = ["background"] + [f"c{i}" for i in range(1, COCO_CLASSES + 1)]
    params = {"dataset": {"kind": "folder", "images_per_shard": 512, "verify_images": False,
                          "folder": {"images": str(base / "images"), "masks": str(base / "masks"),
                                     "class_names": names}},
              "on_bad_input": "error"}
    build_index(params, out, threads=2)
    return out


def measure_eval(n: int, work: Path) -> float:
    from pipeline.evaluate import evaluate_masks

    index = _masks_dataset(n, work, "val")
    preds = index.parent / "masks"  # the GT masks as predictions: every id found, all classes hit
    # Predictions are looked up as <dir>/<image_id>.png, image ids being val/NNNN/imgNNNNNNN.
    start = time.perf_counter()
    evaluate_masks([preds], index / "manifest.csv", index / "classes.json", "val", "weak",
                   work / "eval.json", work / "eval.csv")
    return time.perf_counter() - start


def measure_report(n: int, work: Path) -> float:
    import pandas as pd
    import torch

    from pipeline import shards
    from pipeline.datasets import read_manifest
    from pipeline.pseudo_label_report import report_pseudo_labels

    index = _masks_dataset(n, work, "train")
    manifest = read_manifest(index / "manifest.csv")
    ids = manifest["image_id"].tolist()
    pseudo = work / f"pseudo-{n}"
    pseudo.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    clusters = rng.integers(1, COCO_CLASSES + 1, size=(len(ids), 2))
    pd.DataFrame({"image_id": ids, "labels": [" ".join(map(str, sorted(set(c)))) for c in clusters.tolist()],
                  "has_labels": True}).to_csv(pseudo / "image_labels.csv", index=False)
    (pseudo / "summary.json").write_text(json.dumps({
        "method": "kmeans", "num_clusters": COCO_CLASSES, "keep_fraction": 1.0, "images": len(ids),
        "images_with_labels": len(ids), "crops": 2 * len(ids), "crops_kept": 2 * len(ids),
        "cluster_sizes": [], "kept_cluster_sizes": [], "empty_clusters": []}))
    tensors = {}
    for image_id, (a, b) in zip(ids, clusters.tolist()):
        m = torch.zeros((6, 8), dtype=torch.uint8)
        m[1:4, 1:5], m[4:6, 5:8] = a, b
        tensors[f"{image_id}/pseudo_map"] = m
    shards.write_shard(pseudo / "maps.safetensors", tensors, {"format": "pc2m-pseudo-maps/1"})
    del tensors
    start = time.perf_counter()
    report_pseudo_labels(pseudo, index / "manifest.csv", index / "classes.json", work / "r.csv", work / "r.md")
    return time.perf_counter() - start


def cmd_measure(args: argparse.Namespace) -> None:
    """Child process: one measurement, printed as one JSON line (seconds, peak RSS in MB)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(args.work)
    if args.stage in ("kmeans", "spectral"):
        seconds = measure_clustering(args.stage, args.n, args.dim, args.noise, args.threads)
    elif args.stage in ("index-headers", "index-verify"):
        seconds = measure_index(args.n, args.stage == "index-verify", work)
    elif args.stage == "eval":
        seconds = measure_eval(args.n, work)
    elif args.stage == "report":
        seconds = measure_report(args.n, work)
    else:
        raise SystemExit(f"unknown stage {args.stage}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def data_measurements(stages: list[str], dims: list[int]) -> list[tuple[str, str, int, int]]:
    """(row label, stage, full size, dim) for the requested stages."""
    rows = []
    for stage in stages:
        if stage == "index":
            rows += [("index, headers only", "index-headers", COCO_TRAIN + COCO_VAL, 0),
                     ("index, fully decoded", "index-verify", COCO_TRAIN + COCO_VAL, 0)]
        elif stage in ("kmeans", "spectral"):
            rows += [(f"{stage}, {dim}-d", stage, COCO_CROPS, dim) for dim in dims]
        elif stage == "eval":
            rows.append(("streaming evaluation (val masks)", "eval", COCO_VAL, 0))
        elif stage == "report":
            rows.append(("pseudo-label report (train maps + masks)", "report", COCO_TRAIN, 0))
    return rows


def cmd_data(args: argparse.Namespace) -> None:
    root = args.keep or Path(tempfile.mkdtemp(prefix="scale-data-"))
    root.mkdir(parents=True, exist_ok=True)
    fractions = sorted(args.fractions)
    lines = ["| stage | " + " | ".join(f"{f:g} × COCO: n / s / peak MB / load" for f in fractions)
             + " | exponent time | exponent memory |",
             "|" + "---|" * (len(fractions) + 3)]
    try:
        for label, stage, full, dim in data_measurements(args.stages, args.dims):
            cells, sizes, times, mems = [label], [], [], []
            stopped = False
            for fraction in fractions:
                n = max(100, round(full * fraction))
                if stopped:
                    cells.append(f"{n} / not run")
                    continue
                load = load1()
                cmd = [sys.executable, __file__, "_measure", stage, str(n), "--dim", str(dim), "--work", str(root),
                       "--noise", str(args.noise), "--threads", str(args.threads)]
                rc, wall, out = run_group(cmd, REPO, timeout=args.timeout_min * 60)
                if rc != 0:
                    why = "timed out" if rc is None else f"failed (rc {rc})"
                    if rc is not None:
                        sys.stderr.write(out[-3000:])
                    cells.append(f"{n} / {why} after {fmt_s(wall)} / — / {load:.2f}")
                    stopped = True
                    continue
                result = json.loads(out.strip().splitlines()[-1])
                sizes.append(n)
                times.append(result["seconds"])
                mems.append(result["peak_mb"])
                cells.append(f"{n} / {fmt_s(result['seconds'])} / {result['peak_mb']:.0f} / {load:.2f}")
                print(f"# {label} n={n}: {result}", file=sys.stderr, flush=True)
            cells += [fmt_exp(exponent(sizes, times)), fmt_exp(exponent(sizes, mems))]
            lines.append("| " + " | ".join(cells) + " |")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    text = ("### Dataset-level stages at COCO size (synthetic inputs, one child process each)\n\n"
            f"Clustering data noise {args.noise}, {args.threads} thread(s).\n\n"
            + "\n".join(lines) + f"\n\n{machine_line()} Peak MB: the child's ru_maxrss (inputs included).\n")
    print_and_append(text, args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("dag", help="part a: the whole DAG through snakemake")
    p.add_argument("--sizes", type=int, nargs="+", default=[752, 3008, VOC_TRAIN + VOC_VAL])
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="dag-runs.json files of earlier runs to put in the same table")
    p.add_argument("--timeout-min", type=float, default=25.0, help="stop a size after this long")
    p.add_argument("--keep", type=Path, default=None)
    p.add_argument("--out", default=None, help="append the Markdown to this file")
    p.set_defaults(func=cmd_dag)
    p = sub.add_parser("dryrun", help="DAG building (`snakemake -n`) on a large folder dataset")
    p.add_argument("--images", type=int, default=COCO_TRAIN + COCO_VAL)
    p.add_argument("--images-per-shard", type=int, default=512)
    p.add_argument("--keep", type=Path, default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_dryrun)
    p = sub.add_parser("data", help="part b: dataset-level stages at COCO size")
    p.add_argument("--fractions", type=float, nargs="+", default=[1 / 16, 1 / 4, 1.0])
    p.add_argument("--stages", nargs="+", default=["index", "kmeans", "spectral", "eval", "report"],
                   choices=["index", "kmeans", "spectral", "eval", "report"])
    p.add_argument("--timeout-min", type=float, default=30.0, help="per measurement; larger sizes are then skipped")
    p.add_argument("--noise", type=float, default=3.0, help="clustering data: noise / centre spread")
    p.add_argument("--dims", type=int, nargs="+", default=[384, 768], help="clustering feature sizes")
    p.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads of the clustering (the rule's)")
    p.add_argument("--keep", type=Path, default=None, help="work folder (generated files are reused)")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("_measure", help=argparse.SUPPRESS)
    p.add_argument("stage")
    p.add_argument("n", type=int)
    p.add_argument("--dim", type=int, default=0)
    p.add_argument("--work", required=True)
    p.add_argument("--noise", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_measure)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
