"""Pseudo multi-labels of the unsupervised mode (paper 000 Sec. 3.3): cluster the CLS features of
every segment crop of the train split; each crop's cluster is a pseudo-class, and an image's
pseudo multi-label is the set of its crops' clusters.

Inputs (written by earlier stages; tensor names are ``{image_id}/{name}``, split on the last "/"):

- spectral shards: ``{id}/segments`` gh×gw int64 patch-level segment map, 0 = background,
  1..S = segments; optionally ``{id}/geometry`` (see ``pipeline.features``), copied to the maps;
- segment-feature shards: ``{id}/cls`` S×D float16, one CLS feature per crop, and
  ``{id}/segment_ids`` S int64, the segment of the map each row belongs to.

Choices (ours unless cited):

- Features are L2-normalised before clustering, for both methods: DINO CLS features are compared
  by cosine. Within one k-means cluster, Euclidean distance to the centre then ranks crops exactly
  as cosine similarity to the centre does (COMUS filters by cosine).
- Pseudo-class ids are cluster + 1, i.e. 1..k, so background 0 never collides with cluster 0
  (Deep Spectral Methods' bug merged cluster 0 into background).
- Filtering (COMUS, paper 002 Sec. 3: drop the 20% of each cluster furthest from its centre): a
  filtered crop adds nothing to its image's label set and its region is 255 (ignore) in the
  pseudo map. An image left with no kept crop has an empty label set and ``has_labels = False``:
  nothing is known about it, so training skips it, as COMUS drops filtered images. Segments of the
  map without a crop feature are 255 as well.
- Only train-split images are read; ground truth never is.
- num_clusters is at most 254 so that pseudo maps are uint8 with 255 free for ignore.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline import shards
from pipeline.atomic import write_csv, write_json
from pipeline.clustering import (
    check_features,
    distances_to_centroids,
    filter_closest,
    kmeans_faiss,
    l2_normalise,
    spectral_clustering,
)
from pipeline.config import require_fields
from pipeline.datasets import read_manifest
from pipeline.datasets.common import BACKGROUND, IGNORE_INDEX
from pipeline.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)

MAPS_FORMAT = "pc2m-pseudo-maps/1"
METHODS = ("kmeans", "spectral")
MAX_CLUSTERS = IGNORE_INDEX - 1
# Config section the parameters come from, for error messages that name the key.
SECTION = "pseudo_labels"
IMAGE_LABEL_COLUMNS = ["image_id", "labels", "has_labels"]
CROP_COLUMNS = ["image_id", "segment_id", "cluster", "distance", "kept"]


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class PseudoLabelSettings:
    method: str
    num_clusters: int
    keep_fraction: float
    n_neighbors: int
    kmeans_iterations: int
    kmeans_restarts: int

    @classmethod
    def from_params(cls, params: dict) -> PseudoLabelSettings:
        """Check the stage's parameters; a ConfigError names the offending key."""
        require_fields(cls, params, SECTION)
        if params["method"] not in METHODS:
            raise ConfigError(f"{SECTION}.method: {params['method']!r} is not one of {', '.join(METHODS)}")
        for key, minimum, maximum in (
            ("num_clusters", 1, MAX_CLUSTERS),
            ("n_neighbors", 1, None),
            ("kmeans_iterations", 1, None),
            ("kmeans_restarts", 1, None),
        ):
            value = params[key]
            if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
                    or (maximum is not None and value > maximum)):
                bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
                raise ConfigError(f"{SECTION}.{key}: {value!r} must be an integer {bound}")
        keep = params["keep_fraction"]
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ConfigError(f"{SECTION}.keep_fraction: {keep!r} must be a number in (0, 1]")
        return cls(**{key: params[key] for key in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Clustering and assembling (pure)


def cluster_crops(
    features: np.ndarray,
    params: dict,
    seed: int,
    row_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster crop features (n×D) as ``params`` say.

    Returns (cluster n int64 in 0..k-1, kept n bool, distance n float64 to the crop's cluster
    centre: in the L2-normalised feature space for k-means, in the spectral embedding for
    spectral clustering). ``row_names`` (the image id of each crop) only improve error messages.
    """
    settings = PseudoLabelSettings.from_params(params)
    features = np.asarray(features, dtype=np.float32)
    check_features(features, settings.num_clusters, row_names)
    unit = l2_normalise(features)
    if settings.method == "kmeans":
        clusters, centroids, inertia = kmeans_faiss(
            unit, settings.num_clusters, seed,
            n_iter=settings.kmeans_iterations, n_redo=settings.kmeans_restarts,
        )
        log.info("k-means: %d crops, k=%d, inertia %.6g", len(unit), settings.num_clusters, inertia)
        distances = distances_to_centroids(unit, clusters, centroids)
    else:
        clusters, distances = spectral_clustering(
            unit, settings.num_clusters, seed, n_neighbors=settings.n_neighbors
        )
    kept = filter_closest(clusters, distances, settings.keep_fraction)
    return clusters, kept, distances


@dataclass(frozen=True)
class ImagePseudoLabels:
    labels: tuple[int, ...]  # sorted pseudo-class ids (1..k) of the image's kept crops
    has_labels: bool  # False when no crop of the image survived filtering
    pseudo_map: np.ndarray  # gh×gw uint8: 0 background, 1..k pseudo-class, 255 ignore


def assemble(
    image_ids: Sequence[str],
    segment_maps: dict[str, np.ndarray],
    crop_image_ids: Sequence[str],
    crop_segment_ids: np.ndarray,
    cluster_of_crop: np.ndarray,
    kept: np.ndarray,
) -> dict[str, ImagePseudoLabels]:
    """Per image: pseudo multi-label set and pseudo semantic map from its crops' clusters (0..k-1).

    Crop i belongs to segment ``crop_segment_ids[i]`` of image ``crop_image_ids[i]``.
    """
    crops_of_image: dict[str, list[int]] = {image_id: [] for image_id in image_ids}
    for crop, image_id in enumerate(crop_image_ids):
        if image_id not in crops_of_image:
            raise BadInputError(f"crop features of image {image_id!r}, which has no segment map")
        crops_of_image[image_id].append(crop)
    result = {}
    for image_id in image_ids:
        segments = np.asarray(segment_maps[image_id], dtype=np.int64)
        crops = crops_of_image[image_id]
        segment_ids = np.asarray(crop_segment_ids)[crops].astype(np.int64)
        _check_crop_segments(image_id, segments, segment_ids)
        # Segment id -> map value; segments without a crop feature stay ignore.
        lookup = np.full(int(segments.max(initial=0)) + 1, IGNORE_INDEX, dtype=np.uint8)
        lookup[BACKGROUND] = BACKGROUND
        labels = set()
        for crop, segment in zip(crops, segment_ids):
            if kept[crop]:
                pseudo_class = int(cluster_of_crop[crop]) + 1
                lookup[segment] = pseudo_class
                labels.add(pseudo_class)
        result[image_id] = ImagePseudoLabels(
            labels=tuple(sorted(labels)), has_labels=bool(labels), pseudo_map=lookup[segments]
        )
    return result


def _check_crop_segments(image_id: str, segments: np.ndarray, segment_ids: np.ndarray) -> None:
    if segments.ndim != 2:
        raise BadInputError(f"image {image_id!r}: segment map has shape {tuple(segments.shape)}, not gh×gw")
    if segments.size and segments.min() < 0:
        raise BadInputError(f"image {image_id!r}: segment map holds negative ids")
    present = set(np.unique(segments).tolist()) - {BACKGROUND}
    stray = sorted(set(segment_ids.tolist()) - present)
    if stray:
        raise BadInputError(
            f"image {image_id!r}: crop features for segment(s) {stray} that are not foreground "
            f"segments of its map (segments: {sorted(present)})"
        )
    if len(set(segment_ids.tolist())) != len(segment_ids):
        raise BadInputError(f"image {image_id!r}: a segment has more than one crop feature")


# ---------------------------------------------------------------------------------------------
# Reading the shards


def read_shards(paths: Sequence[Path], wanted: set[str], what: str) -> dict[str, tuple[Path, dict]]:
    """Images of ``wanted`` found in ``paths``: ``{image_id: (shard, tensors)}``; an image in two
    shards is an error (which one would be right?)."""
    found: dict[str, tuple[Path, dict]] = {}
    for path in tqdm(paths, desc=f"read {what}", unit="shard", file=sys.stderr, disable=len(paths) < 2):
        for image_id, tensors in shards.read_images(path, images=wanted).items():
            if image_id in found:
                raise BadInputError(f"image {image_id!r} is in two {what} shards: {found[image_id][0]} and {path}")
            found[image_id] = (Path(path), tensors)
    return found


def _require(found: dict[str, tuple[Path, dict]], image_ids: Sequence[str], names: Sequence[str],
             what: str, paths: Sequence[Path]) -> None:
    """Every image needs every named tensor; name the first few that lack one."""
    missing = [
        image_id for image_id in image_ids
        if image_id not in found or any(name not in found[image_id][1] for name in names)
    ]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise BadInputError(
            f"{len(missing)} train image(s) lack {'/'.join(names)} in the {len(paths)} {what} "
            f"shard(s) ({', '.join(str(p) for p in paths[:3])}{', ...' if len(paths) > 3 else ''}): "
            f"{shown}; re-run the {what} stage"
        )


@dataclass(frozen=True)
class Crops:
    image_ids: list[str]  # per crop: the image it was cut from
    segment_ids: np.ndarray  # per crop: its segment id in that image's map
    features: np.ndarray  # crops × D float32


def collect_crops(found: dict[str, tuple[Path, dict]], image_ids: Sequence[str]) -> Crops:
    """Stack the crops of ``image_ids`` (in that order), checking shapes and the feature size.

    Two passes: check and count, then copy each image's rows into one preallocated float32 array,
    so the stacked features exist once (not per image and again concatenated: at COCO's 250k
    crops × 768 each copy is 768 MB)."""
    dim = None
    counts = []
    for image_id in image_ids:
        path, tensors = found[image_id]
        cls, ids = tensors["cls"], tensors["segment_ids"]
        if cls.ndim != 2 or ids.ndim != 1 or len(cls) != len(ids):
            raise BadInputError(
                f"{path}: image {image_id!r} has cls {tuple(cls.shape)} and segment_ids "
                f"{tuple(ids.shape)}; expected S×D and S"
            )
        if dim is not None and cls.shape[1] != dim:
            raise BadInputError(f"{path}: image {image_id!r} has {cls.shape[1]}-d features, others {dim}-d")
        dim = cls.shape[1]
        counts.append(len(ids))
    ends = np.cumsum(counts, dtype=np.int64)
    features = np.empty((int(ends[-1]) if counts else 0, dim or 0), dtype=np.float32)
    segment_ids = np.empty(len(features), dtype=np.int64)
    owners: list[str] = []
    for image_id, end, count in zip(image_ids, ends, counts):
        tensors = found[image_id][1]
        rows = slice(int(end) - count, int(end))
        features[rows] = tensors["cls"].numpy()
        segment_ids[rows] = tensors["segment_ids"].numpy()
        owners.extend([image_id] * count)
    return Crops(owners, segment_ids, features)


# ---------------------------------------------------------------------------------------------
# The stage


def run_pseudo_labels(
    segment_feature_shards: Sequence[Path],
    spectral_shards: Sequence[Path],
    manifest_path: Path,
    out_dir: Path,
    params: dict,
    seed: int,
    threads: int,
) -> None:
    """Write image_labels.csv, crops.csv, maps.safetensors and summary.json into ``out_dir``."""
    settings = PseudoLabelSettings.from_params(params)
    manifest = read_manifest(manifest_path)
    train_ids = manifest.loc[manifest["split"] == "train", "image_id"].tolist()
    if not train_ids:
        raise BadInputError(f"{manifest_path}: no image of split 'train' to pseudo-label")
    wanted = set(train_ids)

    spectral = read_shards(list(spectral_shards), wanted, "spectral")
    _require(spectral, train_ids, ["segments"], "spectral", list(spectral_shards))
    crop_tensors = read_shards(list(segment_feature_shards), wanted, "segment-feature")
    _require(crop_tensors, train_ids, ["cls", "segment_ids"], "segment-feature", list(segment_feature_shards))
    crops = collect_crops(crop_tensors, train_ids)
    del crop_tensors  # the float16 copies: the stacked float32 features are what clustering reads
    log.info("%d crops from %d train images", len(crops.image_ids), len(train_ids))

    # threadpoolctl caps BLAS and every OpenMP runtime loaded, faiss' included.
    with threadpool_limits(limits=max(1, threads)):
        clusters, kept, distances = cluster_crops(crops.features, params, seed, row_names=crops.image_ids)

    segment_maps = {image_id: spectral[image_id][1]["segments"].numpy() for image_id in train_ids}
    per_image = assemble(train_ids, segment_maps, crops.image_ids, crops.segment_ids, clusters, kept)

    out_dir = Path(out_dir)
    _write_image_labels(out_dir / "image_labels.csv", train_ids, per_image)
    _write_crops(out_dir / "crops.csv", crops, clusters, distances, kept)
    geometries = {
        image_id: spectral[image_id][1]["geometry"]
        for image_id in train_ids if "geometry" in spectral[image_id][1]
    }
    _write_maps(out_dir / "maps.safetensors", train_ids, per_image, geometries, settings.num_clusters)
    summary = summarise(settings, seed, per_image, clusters, kept)
    write_json(out_dir / "summary.json", summary)
    log.info(
        "pseudo-labels: %d/%d images labelled, %d/%d crops kept, %d clusters (%s)",
        summary["images_with_labels"], summary["images"], summary["crops_kept"], summary["crops"],
        settings.num_clusters, settings.method,
    )


def summarise(settings: PseudoLabelSettings, seed: int, per_image: dict[str, ImagePseudoLabels],
              clusters: np.ndarray, kept: np.ndarray) -> dict:
    k = settings.num_clusters
    sizes = np.bincount(clusters, minlength=k)
    kept_sizes = np.bincount(clusters[kept], minlength=k)
    empty = [int(c) + 1 for c in np.flatnonzero(sizes == 0)]
    if empty:
        log.warning("pseudo-classes %s received no crop", empty)
    return {
        "method": settings.method,
        "num_clusters": k,
        "keep_fraction": settings.keep_fraction,
        "seed": seed,
        "images": len(per_image),
        "images_with_labels": sum(p.has_labels for p in per_image.values()),
        "crops": int(len(clusters)),
        "crops_kept": int(kept.sum()),
        # index i is pseudo-class i + 1
        "cluster_sizes": sizes.tolist(),
        "kept_cluster_sizes": kept_sizes.tolist(),
        "empty_clusters": empty,
    }



def _write_image_labels(path: Path, image_ids: Sequence[str], per_image: dict[str, ImagePseudoLabels]) -> None:
    frame = pd.DataFrame(
        {
            "image_id": list(image_ids),
            "labels": [" ".join(map(str, per_image[i].labels)) for i in image_ids],
            "has_labels": [per_image[i].has_labels for i in image_ids],
        },
        columns=IMAGE_LABEL_COLUMNS,
    )
    write_csv(path, frame)


def _write_crops(path: Path, crops: Crops, clusters: np.ndarray, distances: np.ndarray, kept: np.ndarray) -> None:
    frame = pd.DataFrame(
        {
            "image_id": crops.image_ids,
            "segment_id": crops.segment_ids,
            "cluster": clusters + 1,  # pseudo-class id, as in image_labels.csv and the maps
            "distance": distances,
            "kept": kept,
        },
        columns=CROP_COLUMNS,
    )
    write_csv(path, frame)


def _write_maps(path: Path, image_ids: Sequence[str], per_image: dict[str, ImagePseudoLabels],
                geometries: dict[str, torch.Tensor], num_clusters: int) -> None:
    tensors = {}
    for image_id in image_ids:
        tensors[f"{image_id}/pseudo_map"] = torch.from_numpy(np.ascontiguousarray(per_image[image_id].pseudo_map))
        if image_id in geometries:
            tensors[f"{image_id}/geometry"] = geometries[image_id].contiguous()
    metadata = {
        "format": MAPS_FORMAT,
        "image_ids": list(image_ids),
        "num_clusters": num_clusters,
        "background": BACKGROUND,
        "ignore_index": IGNORE_INDEX,
    }
    shards.write_shard(path, tensors, metadata)
