"""Dataset-level clustering of crop features (paper 000 Sec. 3.3; COMUS, paper 002, Sec. 3).

Pure functions on in-memory arrays:

- ``kmeans_faiss``: what paper 000 uses ("k-means clustering on all the crops in D with k = |C|").
  faiss over *all* points (faiss otherwise trains on a 256·k subsample), initialised with our own
  seeded k-means++ centres (faiss' default random init lands in worse minima), best of
  ``n_redo`` restarts by inertia. Same input + seed + thread count -> identical labels.
- ``spectral_clustering``: COMUS's alternative, sklearn's SpectralClustering spelled out
  (kNN affinity -> spectral embedding -> k-means in the embedding) so that the distance of each
  point to its cluster centre *in the embedding* is available for filtering; with the same
  n_neighbors, k and seed it gives SpectralClustering's labels. Unlike COMUS's code, n_neighbors
  really reaches the affinity.
- ``filter_closest``: COMUS's filtering, keep the given fraction of each cluster closest to its
  centre.

Inputs are taken as given: callers L2-normalise first (``l2_normalise``) when they want cosine
geometry, as for DINO CLS features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import faiss
import numpy as np
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.manifold import spectral_embedding
from sklearn.neighbors import kneighbors_graph

from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

# How many offending ids an error message lists before it says "...".
_MAX_NAMED = 10
# COMUS's k-means in the spectral embedding: sklearn SpectralClustering's n_init (paper 002, Table 9
# leaves it at its default; Table 10 shows 10-60 make no difference).
SPECTRAL_KMEANS_INIT = 10


def check_features(x: np.ndarray, k: int, row_names: Sequence[str] | None = None) -> None:
    """Raise a PipelineError a user can act on when ``x`` (n×d) cannot be cut into ``k`` clusters.

    ``row_names`` (one per row, e.g. the image id of each crop) makes a NaN/inf error name the
    images whose features are broken.
    """
    if x.ndim != 2:
        raise PipelineError(f"crop features must be a 2-D array (crops × dims), got shape {x.shape}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"num_clusters: {k!r} must be an integer >= 1")
    bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad_rows.size:
        where = ""
        if row_names is not None:
            names = sorted({str(row_names[i]) for i in bad_rows})
            listed = ", ".join(names[:_MAX_NAMED]) + (", ..." if len(names) > _MAX_NAMED else "")
            where = f" (images: {listed})"
        raise PipelineError(
            f"{bad_rows.size} of {len(x)} crop feature rows contain NaN or inf{where}; "
            "re-extract the features of those images (a float16 overflow or a corrupt shard)"
        )
    if len(x) < k:
        raise PipelineError(
            f"only {len(x)} crops to cluster into num_clusters={k}: use more images or lower "
            f"num_clusters to at most {len(x)}"
        )


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny))


def _squared_distances(x: np.ndarray, x_sq_norms: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """c×n squared Euclidean distances from each centre to each point (clipped at 0)."""
    cross = centres @ x.T
    sq = x_sq_norms[None, :] - 2.0 * cross + np.einsum("ij,ij->i", centres, centres)[:, None]
    return np.maximum(sq, 0.0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ centres (k×d, rows of ``x``), greedy variant as in scikit-learn: each step draws
    2 + log(k) D²-weighted candidates and keeps the one that lowers the potential most."""
    n = len(x)
    x_sq_norms = np.einsum("ij,ij->i", x, x)
    n_trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(n))]
    closest = _squared_distances(x, x_sq_norms, x[chosen])[0]
    for _ in range(1, k):
        potential = float(closest.sum(dtype=np.float64))
        if potential > 0.0:
            cumulative = np.cumsum(closest, dtype=np.float64)
            candidates = np.searchsorted(cumulative, rng.random(n_trials) * potential, side="right")
            candidates = np.minimum(candidates, n - 1)
        else:
            # Every point coincides with a chosen centre (duplicates): any point will do.
            candidates = rng.integers(n, size=n_trials)
        candidate_closest = np.minimum(closest[None, :], _squared_distances(x, x_sq_norms, x[candidates]))
        best = int(np.argmin(candidate_closest.sum(axis=1, dtype=np.float64)))
        chosen.append(int(candidates[best]))
        closest = candidate_closest[best]
    return np.ascontiguousarray(x[chosen])


def _use_gpu(use_gpu: bool | None) -> bool:
    """None: a GPU when faiss sees one. True: insist on one. False: CPU."""
    available = faiss.get_num_gpus()
    if use_gpu and not available:
        raise ConfigError("k-means on GPU requested but faiss sees no GPU (install faiss-gpu)")
    return bool(available) if use_gpu is None else bool(use_gpu)


def kmeans_faiss(
    x: np.ndarray,
    k: int,
    seed: int,
    n_iter: int = 100,
    n_redo: int = 1,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means of all rows of ``x`` (n×d) into ``k`` clusters.

    Returns (labels n int64 in 0..k-1, centroids k×d float32, inertia = sum of squared distances
    to the assigned centroid). Each of the ``n_redo`` restarts starts from its own k-means++ centres
    drawn from ``np.random.default_rng(seed)``; the lowest inertia wins.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_features(x, k)
    if n_iter < 1 or n_redo < 1:
        raise ConfigError(f"k-means iterations ({n_iter}) and restarts ({n_redo}) must be >= 1")
    n, d = x.shape
    gpu = _use_gpu(use_gpu)
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for restart in range(n_redo):
        init = kmeans_plus_plus(x, k, rng)
        kmeans = faiss.Kmeans(
            d, k, niter=n_iter, nredo=1, seed=seed + restart, verbose=False, gpu=gpu,
            # Train on every point: faiss would otherwise subsample to 256·k points.
            max_points_per_centroid=max(n, 256),
            # Few points per centroid is fine here (small datasets); skip faiss' warning.
            min_points_per_centroid=1,
        )
        kmeans.train(x, init_centroids=init)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        sq_distances, labels = kmeans.index.search(x, 1)
        inertia = float(sq_distances.sum(dtype=np.float64))
        log.debug("k-means restart %d/%d: inertia %.6g", restart + 1, n_redo, inertia)
        if best is None or inertia < best[2]:
            best = (labels[:, 0].astype(np.int64), centroids, inertia)
    assert best is not None
    return best


def distances_to_centroids(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Euclidean distance (float64) of each row to the centroid of its cluster."""
    diff = x.astype(np.float64) - centroids.astype(np.float64)[labels]
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def knn_affinity(x: np.ndarray, n_neighbors: int) -> sparse.csr_matrix:
    """Symmetrised kNN connectivity, exactly what SpectralClustering(affinity='nearest_neighbors')
    builds: each point links itself and its n_neighbors-1 nearest others, then 0.5·(A + Aᵀ)."""
    connectivity = kneighbors_graph(x, n_neighbors=n_neighbors, include_self=True)
    return sparse.csr_matrix(0.5 * (connectivity + connectivity.T))


def spectral_clustering(
    x: np.ndarray, k: int, seed: int, n_neighbors: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """COMUS's clustering (paper 002, Table 9: kNN affinity with n_neighbors, n_components =
    n_clusters = k, k-means with n_init 10 on the embedding).

    Returns (labels n int64 in 0..k-1, distances n float64): the distance of each point to its
    cluster's centre in the spectral embedding, which is where COMUS measures uncertainty.
    n_neighbors larger than the number of points is lowered to it (with a warning).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_features(x, k)
    if n_neighbors < 1:
        raise ConfigError(f"n_neighbors: {n_neighbors} must be >= 1")
    if n_neighbors > len(x):
        log.warning("n_neighbors=%d but only %d crops: using %d", n_neighbors, len(x), len(x))
        n_neighbors = len(x)
    affinity = knn_affinity(x, n_neighbors)
    # drop_first=False and the seeded ARPACK start vector: as SpectralClustering does it.
    embedding = spectral_embedding(affinity, n_components=k, random_state=seed, drop_first=False)
    kmeans = KMeans(n_clusters=k, n_init=SPECTRAL_KMEANS_INIT, random_state=seed).fit(embedding)
    labels = kmeans.labels_.astype(np.int64)
    return labels, distances_to_centroids(embedding, labels, kmeans.cluster_centers_)


def filter_closest(labels: np.ndarray, distances: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Boolean mask keeping, in each cluster, the ceil(keep_fraction · size) members closest to its
    centre (COMUS drops the 20% furthest: keep_fraction 0.8). Rounding up keeps at least one member
    of every non-empty cluster; ties go to the earlier row, so the mask is deterministic."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction: {keep_fraction} must be in (0, 1]")
    labels = np.asarray(labels)
    distances = np.asarray(distances)
    if labels.shape != distances.shape:
        raise ValueError(f"labels {labels.shape} and distances {distances.shape} differ in shape")
    keep = np.zeros(labels.shape, dtype=bool)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        # round() first: 0.7 * 10 is 7.000000000000001 in floating point, not 7.
        n_keep = math.ceil(round(keep_fraction * len(members), 9))
        closest_first = members[np.argsort(distances[members], kind="stable")]
        keep[closest_first[:n_keep]] = True
    return keep
