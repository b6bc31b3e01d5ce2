"""Dense CRF refinement of predicted class probabilities (Krähenbühl & Koltun, via pydensecrf).

The papers give no CRF values (DIGEST, cross-paper notes), so three presets from public code are
offered (``shared/notes/PRIOR-ART.md``) and any field can be overridden:

| preset        | Gaussian sxy/compat | bilateral sxy/srgb/compat | iterations | unary                  |
|---------------|---------------------|---------------------------|------------|------------------------|
| deeplab-v2    | 1 / 3               | 67 / 3 / 4                | 10         | softmax probabilities  |
| psa           | 3 / 3               | 50 / 5 / 10               | 10         | labels, gt_prob 0.7    |
| deep-spectral | 3 / 3               | 80 / 13 / 10              | 5          | labels, gt_prob 0.99   |

deep-spectral used SimpleCRF with a one-hot unary that it clips to [0.01, 0.99]: the label keeps
probability 0.99, hence gt_prob 0.99 here (pydensecrf spreads the remaining 0.01 over the other
classes instead of giving each 0.01: a slightly stronger unary).

The stage (``crf_shard``) upsamples each image's grid probabilities to the image with
``pipeline.geometry.grid_to_image``, refines them, and writes a palette PNG per image; the folder
is complete only once its ``.done`` marker exists, which is written last. Images are independent
and run in ``threads`` worker processes (see ``worker_pool``); like spawned ones, these workers
import the parent's ``__main__``, so the stage is meant to run from ``python -m pipeline``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import shards
from pipeline.atomic import atomic_dir, write_text
from pipeline.datasets import read_manifest
from pipeline.errors import BadInputError, ConfigError, PipelineError
from pipeline.geometry import grid_to_image
from pipeline.imageio import load_rgb, safe_child, write_label_png

log = logging.getLogger(__name__)

DONE_MARKER = ".done"
# Label PNGs are uint8 and 255 is the ignore index, so at most 255 classes.
MAX_CLASSES = 255
# Thread counts of the numeric libraries in worker processes: images already run in parallel,
# so nested threads would only oversubscribe the cores.
_SINGLE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@dataclass(frozen=True)
class CrfParams:
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int
    unary: str  # "softmax": -log(probabilities); "labels": argmax labels with gt_prob
    gt_prob: float  # probability of the argmax label (labels unary only)
    # Floor of the probabilities before the log: a class restricted to 0 (e.g. absent from the
    # image's labels) would otherwise get an infinite energy (1e-5: pydensecrf's own clip).
    min_prob: float = 1e-5


PRESETS: dict[str, CrfParams] = {
    "deeplab-v2": CrfParams(1, 3, 67, 3, 4, 10, "softmax", 0.7),
    "psa": CrfParams(3, 3, 50, 5, 10, 10, "labels", 0.7),
    "deep-spectral": CrfParams(3, 3, 80, 13, 10, 5, "labels", 0.99),
}
UNARIES = ("softmax", "labels")


def resolve_params(params: Mapping) -> CrfParams:
    """``{"preset": name, field: value, ...}`` -> CrfParams; a field that is absent or null keeps
    the preset's value."""
    preset = params.get("preset", "deeplab-v2")
    if preset not in PRESETS:
        raise ConfigError(f"crf.preset must be one of {sorted(PRESETS)}, not {preset!r}")
    fields = {field.name for field in dataclasses.fields(CrfParams)}
    unknown = sorted(set(params) - fields - {"preset"})
    if unknown:
        raise ConfigError(f"unknown crf key(s) {unknown}; known: {sorted(fields)}")
    overrides = {key: value for key, value in params.items() if key in fields and value is not None}
    resolved = dataclasses.replace(PRESETS[preset], **overrides)
    if resolved.unary not in UNARIES:
        raise ConfigError(f"crf.unary must be one of {UNARIES}, not {resolved.unary!r}")
    if not 0.0 < resolved.gt_prob < 1.0:
        raise ConfigError(f"crf.gt_prob must lie in (0, 1), not {resolved.gt_prob}")
    if not 0.0 < resolved.min_prob < 1.0:
        raise ConfigError(f"crf.min_prob must lie in (0, 1), not {resolved.min_prob}")
    if resolved.iterations < 1:
        raise ConfigError(f"crf.iterations must be >= 1, not {resolved.iterations}")
    return resolved


# ---------------------------------------------------------------------------------------------
# One image (pure)


def unary_energy(probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """C × H × W probabilities -> C-contiguous float32 (C, H·W) energies, as pydensecrf wants."""
    num_classes = probs.shape[0]
    flat = probs.reshape(num_classes, -1)
    if params.unary == "softmax":
        energy = -np.log(np.maximum(flat, params.min_prob, dtype=np.float32))
    else:
        # pydensecrf's unary_from_labels(zero_unsure=False): the label gets -log(gt_prob), every
        # other class -log((1 - gt_prob) / (C - 1)).
        labels = flat.argmax(axis=0)
        other = (1.0 - params.gt_prob) / max(num_classes - 1, 1)
        energy = np.full(flat.shape, -np.log(other), dtype=np.float32)
        energy[labels, np.arange(flat.shape[1])] = -np.log(params.gt_prob)
    return np.ascontiguousarray(energy, dtype=np.float32)


def crf_refine(image: np.ndarray, probs: np.ndarray, params: Mapping | CrfParams) -> np.ndarray:
    """Dense CRF on ``image`` (H × W × 3 uint8) and ``probs`` (C × H × W) -> H × W uint8 labels."""
    import pydensecrf.densecrf as dcrf  # C extension: imported where it is used

    params = params if isinstance(params, CrfParams) else resolve_params(params)
    num_classes, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image is {image.shape}, probabilities {probs.shape}")
    if num_classes > MAX_CLASSES:
        raise ValueError(f"{num_classes} classes do not fit a uint8 label mask (max {MAX_CLASSES})")
    crf = dcrf.DenseCRF2D(width, height, num_classes)  # width first
    crf.setUnaryEnergy(unary_energy(probs, params))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
        # pydensecrf takes a writable C-contiguous buffer (decoded images may be read-only views)
        rgbim=np.require(image, np.uint8, ["C", "W"]), compat=params.bilateral_compat,
    )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.argmax(axis=0).reshape(height, width).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class ImageTask:
    """Everything one worker needs for one image (small: the probabilities are on the grid)."""

    image_id: str
    image_path: str
    height: int
    width: int
    grid_probs: np.ndarray  # C × gh × gw float16
    geometry: np.ndarray  # [scale, resized_h, resized_w, final_h, final_w]
    out_path: str


def refine_task(task: ImageTask, params: CrfParams) -> str | None:
    """Upsample, refine and write one image. Returns an error message instead of raising:
    a pipeline exception does not always survive pickling back from a worker process."""
    try:
        image = load_rgb(task.image_path)
        if image.shape[:2] != (task.height, task.width):
            raise BadInputError(
                f"{task.image_path}: image {task.image_id!r} is {image.shape[1]}x{image.shape[0]}, "
                f"the manifest says {task.width}x{task.height}"
            )
        probs = grid_to_image(
            torch.from_numpy(task.grid_probs).float(), torch.from_numpy(task.geometry),
            (task.height, task.width),
        ).numpy()
        write_label_png(task.out_path, crf_refine(image, probs, params))
    except PipelineError as exc:
        return str(exc)
    return None


def _run_task(args: tuple[ImageTask, CrfParams]) -> tuple[str, str | None]:
    task, params = args
    return task.image_id, refine_task(task, params)


def crf_shard(probs_shard: Path, manifest_path: Path, out_masks_dir: Path, params: Mapping,
              threads: int = 1) -> None:
    """CRF-refine every image of ``probs_shard`` into ``out_masks_dir/{image_id}.png`` with
    ``threads`` worker processes; ``out_masks_dir/.done`` is written last."""
    crf_params = resolve_params(params)
    out_masks_dir = Path(out_masks_dir)
    # Everything goes to a temporary folder renamed to out_masks_dir at the end: a killed job
    # never leaves a folder of some masks that a rerun could take as finished.
    with atomic_dir(out_masks_dir) as tmp_dir:
        _crf_into(Path(probs_shard), Path(manifest_path), tmp_dir, crf_params, threads)
    log.info("CRF (%s unary, %d iterations): masks -> %s", crf_params.unary, crf_params.iterations, out_masks_dir)


def _crf_into(probs_shard: Path, manifest_path: Path, out_masks_dir: Path, crf_params: CrfParams,
              threads: int) -> None:
    done = out_masks_dir / DONE_MARKER
    tasks = build_tasks(probs_shard, manifest_path, out_masks_dir)
    jobs = [(task, crf_params) for task in tasks]
    workers = max(1, min(int(threads), len(jobs)))
    with _progress(len(jobs)) as progress:
        if workers == 1:
            _collect(map(_run_task, jobs), progress)
        else:
            with _environment(_SINGLE_THREAD_ENV):
                executor = worker_pool(workers)
                try:
                    futures = [executor.submit(_run_task, job) for job in jobs]
                    _collect((future.result() for future in as_completed(futures)), progress)
                finally:
                    # On an error, drop the images not started yet instead of finishing them.
                    executor.shutdown(cancel_futures=True)
    write_text(done, json.dumps({"images": len(tasks), "params": dataclasses.asdict(crf_params)},
                                sort_keys=True) + "\n")


def build_tasks(probs_shard: Path, manifest_path: Path, out_masks_dir: Path) -> list[ImageTask]:
    per_image = shards.read_images(probs_shard, names={"probs", "geometry"})
    manifest = read_manifest(manifest_path).set_index("image_id")
    tasks = []
    for image_id in sorted(per_image):
        tensors = per_image[image_id]
        for name in ("probs", "geometry"):
            if name not in tensors:
                raise BadInputError(f"{probs_shard}: no {name!r} for image {image_id!r}")
        if image_id not in manifest.index:
            raise BadInputError(f"{probs_shard}: image {image_id!r} is not in {manifest_path}")
        row = manifest.loc[image_id]
        tasks.append(ImageTask(
            image_id=image_id, image_path=str(row["image_path"]),
            height=int(row["height"]), width=int(row["width"]),
            grid_probs=tensors["probs"].to(torch.float16).numpy(),
            geometry=tensors["geometry"].to(torch.float32).numpy(),
            out_path=str(safe_child(out_masks_dir, image_id)),
        ))
    return tasks


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes forked from a forkserver, not from this process: a plain fork would copy
    whatever locks torch's/OpenMP's thread pools hold here (they can hang the child), while spawn
    makes every worker import torch again (seconds each). The forkserver is a fresh process that
    imports this module once (preload); forking from it is cheap and inherits no busy threads.
    ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (e.g. a crash in the
    C extension) raises BrokenProcessPool instead of hanging the stage."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded_worker)


def _single_threaded_worker() -> None:
    # The forkserver may predate this stage's environment (started by an earlier call in the
    # same process), so the thread limits are also set here.
    os.environ.update(_SINGLE_THREAD_ENV)
    torch.set_num_threads(1)


def _collect(results: Iterator[tuple[str, str | None]], progress: tqdm) -> None:
    for image_id, error in results:
        if error is not None:
            raise BadInputError(f"CRF of image {image_id!r}: {error}")
        progress.update()


def _progress(total: int) -> tqdm:
    return tqdm(total=total, desc="crf", unit="img", file=sys.stderr)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for processes started inside the block (the forkserver and its
    workers read them at start-up, before numpy/torch create their thread pools), then restore
    them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
