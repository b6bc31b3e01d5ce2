"""Dataset-level clustering of crop features (paper 000 Sec. 3.3; COMUS, paper 002, Sec. 3).

Pure functions on in-memory arrays:

- ``kmeans_faiss``: what paper 000 uses ("k-means clustering on all the crops in D with k = |C|").
  faiss over *all* points (faiss otherwise trains on a 256·k subsample), initialised with our own
  seeded k-means++ centres (faiss' default random init lands in worse minima), best of
  ``n_redo`` restarts by inertia. Same input + seed + thread count -> identical labels.
- ``spectral_clustering``: COMUS's alternative, sklearn's SpectralClustering spelled out
  (kNN affinity -> spectral embedding -> k-means in the embedding) so that the distance of each
  point to its cluster centre *in the embedding* is available for filtering; with the same
  n_neighbors, k and seed it gives SpectralClustering's partition (tested). Unlike COMUS's code,
  n_neighbors really reaches the affinity. Kept sparse for COCO's 250k crops: faiss kNN graph,
  block eigensolver (LOBPCG) on the normalised affinity (no LU factorisation), k-means on n × k.
- ``filter_closest``: COMUS's filtering, keep the given fraction of each cluster closest to its
  centre.

Inputs are taken as given: callers L2-normalise first (``l2_normalise``) when they want cosine
geometry, as for DINO CLS features.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import faiss
import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import lobpcg
from sklearn.cluster import KMeans

from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

# Rows per block of distances_to_centroids (bounds its float64 temporaries to ~100 MB at 768-d).
_DISTANCE_BLOCK_ROWS = 8192
# How many offending ids an error message lists before it says "...".
_MAX_NAMED = 10
# COMUS's k-means in the spectral embedding: sklearn SpectralClustering's n_init (paper 002, Table 9
# leaves it at its default; Table 10 shows 10-60 make no difference).
SPECTRAL_KMEANS_INIT = 10
# kNN graph of spectral clustering (our choice, no paper): exact search up to this many points,
# faiss IVF above (exact search grows as n²); IVF lists probed per query.
EXACT_KNN_MAX_POINTS = 20_000
KNN_NPROBE = 32
# LOBPCG residual tolerance and iteration cap of the embedding's eigenvectors (our choice:
# scikit-learn's 'amg' path leaves tol to LOBPCG; k-means on the embedding needs no more).
SPECTRAL_EIGEN_TOL = 1e-5
SPECTRAL_EIGEN_MAXITER = 500


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
    """Euclidean distance (float64) of each row to the centroid of its cluster. Computed in blocks
    of rows: two n×d float64 temporaries would be 3 GB at COCO's 250k × 768."""
    centroids = centroids.astype(np.float64)
    out = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), _DISTANCE_BLOCK_ROWS):
        block = slice(start, start + _DISTANCE_BLOCK_ROWS)
        diff = x[block].astype(np.float64) - centroids[labels[block]]
        out[block] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def knn_indices(x: np.ndarray, n_neighbors: int) -> np.ndarray:
    """n × n_neighbors indices of each row's nearest rows (itself included), squared L2.

    Exact (faiss flat search, the neighbours scikit-learn's brute force finds) up to
    ``EXACT_KNN_MAX_POINTS`` points; above, faiss IVF-Flat: ``4·sqrt(n)`` lists, ``KNN_NPROBE``
    probed. Exact search costs n²·d (≈ 100 TFLOP at 250k × 768, hours on 2 cores); IVF costs about
    n·d·(lists + nprobe·n/lists), and the affinity is a coarse graph anyway. Deterministic:
    faiss trains the coarse quantiser on a seeded sample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n <= EXACT_KNN_MAX_POINTS:
        index = faiss.IndexFlatL2(d)
    else:
        n_lists = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, n_lists)
        index.train(x)
        index.nprobe = KNN_NPROBE
    index.add(x)
    _, neighbours = index.search(x, n_neighbors)
    # IVF can return fewer than n_neighbors (-1) when the probed lists are small: self fills in.
    missing = neighbours < 0
    if missing.any():
        neighbours[missing] = np.broadcast_to(np.arange(n)[:, None], neighbours.shape)[missing]
    return neighbours


def knn_affinity(x: np.ndarray, n_neighbors: int) -> sparse.csr_matrix:
    """Symmetrised kNN connectivity, what SpectralClustering(affinity='nearest_neighbors')
    builds: each point links itself and its n_neighbors-1 nearest others, then 0.5·(A + Aᵀ).
    Sparse (≤ 2·n·n_neighbors entries), from :func:`knn_indices`."""
    n = len(x)
    neighbours = knn_indices(x, n_neighbors)
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    connectivity = sparse.csr_matrix(
        (np.ones(rows.size, dtype=np.float64), (rows, neighbours.ravel())), shape=(n, n)
    )
    # Duplicates (a point listed twice when IVF filled in self) summed: back to 0/1.
    connectivity.data[:] = 1.0
    return sparse.csr_matrix(0.5 * (connectivity + connectivity.T))


def spectral_embedding_sparse(affinity: sparse.csr_matrix, n_components: int, seed: int) -> np.ndarray:
    """n × n_components spectral embedding of a symmetric sparse affinity, as scikit-learn's
    ``spectral_embedding(norm_laplacian=True, drop_first=False)`` defines it: the eigenvectors u of
    the smallest eigenvalues of the normalised Laplacian L = I - D^{-1/2} A D^{-1/2}, returned as
    D^{-1/2} u with scikit-learn's sign convention (largest |entry| positive).

    They are the *largest* eigenvectors of S = D^{-1/2} A D^{-1/2}, found by LOBPCG with sparse
    products only. scikit-learn's ARPACK path factorises L instead (shift-invert, sparse LU),
    whose fill-in on a kNN graph of high-dimensional points grows towards n² memory; and a
    single-vector Lanczos (ARPACK without shift-invert) misses repeated eigenvalues, which a graph
    with several connected components has, while a block method finds them.
    """
    n = affinity.shape[0]
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, np.finfo(np.float64).tiny))
    scaled = (sparse.diags(inv_sqrt) @ affinity @ sparse.diags(inv_sqrt)).tocsr()
    start = np.random.default_rng(seed).standard_normal((n, n_components))
    # D^{1/2}·1 is S's top eigenvector (eigenvalue 1) on a connected graph: start from it.
    start[:, 0] = np.sqrt(degree)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, vectors = lobpcg(scaled, start, largest=True, tol=SPECTRAL_EIGEN_TOL, maxiter=SPECTRAL_EIGEN_MAXITER)
    for warning in caught:
        log.warning("spectral embedding (LOBPCG): %s", warning.message)
    embedding = vectors * inv_sqrt[:, None]
    signs = np.sign(embedding[np.argmax(np.abs(embedding), axis=0), np.arange(embedding.shape[1])])
    return embedding * np.where(signs == 0, 1.0, signs)


def spectral_clustering(
    x: np.ndarray, k: int, seed: int, n_neighbors: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """COMUS's clustering (paper 002, Table 9: kNN affinity with n_neighbors, n_components =
    n_clusters = k, k-means with n_init 10 on the embedding).

    Returns (labels n int64 in 0..k-1, distances n float64): the distance of each point to its
    cluster's centre in the spectral embedding, which is where COMUS measures uncertainty.
    n_neighbors larger than the number of points is lowered to it (with a warning). Memory and
    time stay near-linear in n: sparse kNN graph (:func:`knn_affinity`), sparse block eigensolver
    (:func:`spectral_embedding_sparse`), k-means on n × k.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_features(x, k)
    if n_neighbors < 1:
        raise ConfigError(f"n_neighbors: {n_neighbors} must be >= 1")
    if n_neighbors > len(x):
        log.warning("n_neighbors=%d but only %d crops: using %d", n_neighbors, len(x), len(x))
        n_neighbors = len(x)
    affinity = knn_affinity(x, n_neighbors)
    n_parts, _ = connected_components(affinity, directed=False)
    if n_parts > 1:
        log.warning("the kNN graph has %d connected components: spectral embedding may not work as expected",
                    n_parts)
    embedding = spectral_embedding_sparse(affinity, k, seed)
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
