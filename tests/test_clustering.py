"""Crop clustering: exact recovery, determinism, parity with scikit-learn, COMUS filtering, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.datasets import make_blobs, make_circles
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import kneighbors_graph
from threadpoolctl import threadpool_limits

import pipeline.clustering as clustering
from pipeline.clustering import (
    check_features,
    filter_closest,
    kmeans_faiss,
    kmeans_plus_plus,
    knn_affinity,
    l2_normalise,
    spectral_clustering,
)
from pipeline.errors import ConfigError, PipelineError

# Well-separated test data gives a disconnected kNN graph on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


@pytest.fixture(autouse=True)
def one_thread():
    """One OpenMP/BLAS thread: on a busy 2-core machine, spinning OpenMP barriers turn these
    millisecond fits into seconds."""
    with threadpool_limits(limits=1):
        yield


def separated_blobs(n: int = 600, k: int = 5, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n, n_features=dim, centers=k, cluster_std=0.5, center_box=(-50, 50), random_state=seed)
    return x.astype(np.float32), y


def test_kmeans_recovers_separated_clusters_identically_twice():
    x, truth = separated_blobs()
    labels, centroids, inertia = kmeans_faiss(x, 5, seed=3)
    again = kmeans_faiss(x, 5, seed=3)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert np.array_equal(labels, again[0])
    assert np.array_equal(centroids, again[1])
    assert inertia == again[2]


def test_kmeans_trains_on_all_points():
    # 3000 points, k=2: faiss' default would fit the centroids on a 512-point sample. Trained on all
    # points, each centroid is the mean of all its members (Lloyd's fixed point).
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (1500, 8)), rng.normal(20, 1, (1500, 8))]).astype(np.float32)
    labels, centroids, inertia = kmeans_faiss(x, 2, seed=0)
    for cluster in range(2):
        np.testing.assert_allclose(centroids[cluster], x[labels == cluster].mean(axis=0), atol=1e-4)
    exact = sum(((x[labels == c] - centroids[c]) ** 2).sum() for c in range(2))
    assert inertia == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("data_seed", [0, 1])
def test_kmeans_inertia_matches_sklearn(data_seed):
    # Overlapping blobs with several local minima: restarts matter.
    x, _ = make_blobs(3000, n_features=16, centers=8, cluster_std=3.0, random_state=data_seed)
    x = x.astype(np.float32)
    _, _, inertia = kmeans_faiss(x, 8, seed=0, n_redo=10)
    reference = KMeans(n_clusters=8, n_init=10, random_state=0).fit(x).inertia_
    assert inertia <= reference * 1.01


def test_kmeans_plus_plus_is_seeded_and_spreads_over_blobs():
    x, truth = separated_blobs()
    first = kmeans_plus_plus(x, 5, np.random.default_rng(7))
    second = kmeans_plus_plus(x, 5, np.random.default_rng(7))
    assert np.array_equal(first, second)
    rows = [int(np.flatnonzero((x == centre).all(axis=1))[0]) for centre in first]
    assert sorted(truth[rows]) == [0, 1, 2, 3, 4]


def test_kmeans_on_cpu_when_asked_for_a_missing_gpu_fails_clearly(monkeypatch):
    monkeypatch.setattr(clustering.faiss, "get_num_gpus", lambda: 0)
    x, _ = separated_blobs(n=50, k=2)
    with pytest.raises(ConfigError, match="GPU"):
        kmeans_faiss(x, 2, seed=0, use_gpu=True)


def test_spectral_clustering_separates_two_rings():
    x, truth = make_circles(400, factor=0.4, noise=0.03, random_state=0)
    labels, distances = spectral_clustering(x, 2, seed=0, n_neighbors=10)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert distances.shape == (400,) and np.all(distances >= 0)
    # plain k-means cannot separate rings: the graph is what does it
    assert adjusted_rand_score(truth, kmeans_faiss(x.astype(np.float32), 2, seed=0)[0]) < 0.5


def test_spectral_clustering_equals_sklearn_spectral_clustering():
    x, truth = separated_blobs(n=300, k=4, dim=16, seed=2)
    x = l2_normalise(x)
    ours, _ = spectral_clustering(x, 4, seed=0, n_neighbors=15)
    theirs = SpectralClustering(
        n_clusters=4, n_components=4, affinity="nearest_neighbors", n_neighbors=15, n_init=10,
        random_state=0, assign_labels="kmeans",
    ).fit_predict(x)
    assert adjusted_rand_score(theirs, ours) == 1.0
    assert adjusted_rand_score(truth, ours) == 1.0


def test_spectral_clustering_matches_sklearn_on_overlapping_blobs():
    # Overlapping clusters (truth ARI ~0.9): one connected graph, the general case of real features.
    x, truth = make_blobs(2000, n_features=32, centers=10, cluster_std=9.0, center_box=(-10, 10), random_state=1)
    x = l2_normalise(x.astype(np.float32))
    ours, _ = spectral_clustering(x, 10, seed=0, n_neighbors=30)
    theirs = SpectralClustering(
        n_clusters=10, affinity="nearest_neighbors", n_neighbors=30, random_state=0,
    ).fit_predict(x)
    assert adjusted_rand_score(truth, theirs) < 0.95  # not a trivial problem
    assert adjusted_rand_score(theirs, ours) >= 0.95


def test_spectral_embedding_is_the_laplacians_bottom_eigenspace():
    # Independent computation: dense eigh of L = I - D^-1/2 A D^-1/2. The embedding D^-1/2 u must
    # span D^-1/2 times the eigenspace of L's k smallest eigenvalues.
    x, _ = make_blobs(400, n_features=8, centers=5, cluster_std=4.0, center_box=(-5, 5), random_state=3)
    affinity = knn_affinity(x.astype(np.float32), 12)
    embedding = clustering.spectral_embedding_sparse(affinity, 5, seed=0)
    dense = affinity.toarray()
    inv_sqrt = 1 / np.sqrt(dense.sum(axis=1))
    laplacian = np.eye(len(dense)) - inv_sqrt[:, None] * dense * inv_sqrt[None, :]
    values, vectors = np.linalg.eigh(laplacian)
    assert values[5] - values[4] > 1e-3  # a gap: the eigenspace is well defined
    u = embedding / inv_sqrt[:, None]  # back to L's eigenvectors
    u /= np.linalg.norm(u, axis=0)
    reference = vectors[:, :5]
    # projection of u onto the reference eigenspace keeps all of it
    assert np.allclose(np.linalg.norm(reference.T @ u, axis=0), 1.0, atol=1e-4)
    # scikit-learn's sign convention: the largest |entry| of each vector is positive
    assert np.all(embedding[np.argmax(np.abs(embedding), axis=0), np.arange(5)] > 0)


def test_spectral_embedding_finds_repeated_eigenvalues_of_separate_components():
    # k disconnected components: eigenvalue 0 of L with multiplicity k, which a single-vector
    # Lanczos misses; each embedding column must then be constant on each component.
    x, truth = separated_blobs(n=500, k=6, dim=16, seed=4)
    affinity = knn_affinity(x, 10)
    embedding = clustering.spectral_embedding_sparse(affinity, 6, seed=0)
    centres = np.stack([embedding[truth == c].mean(axis=0) for c in range(6)])
    assert np.linalg.matrix_rank(centres, tol=1e-6) == 6
    for c in range(6):
        assert np.allclose(embedding[truth == c], centres[c], atol=1e-5)


def test_approximate_knn_graph_keeps_the_partition(monkeypatch):
    # Above EXACT_KNN_MAX_POINTS the graph comes from faiss IVF: nearly the exact neighbours, and
    # the same clusters.
    x, truth = make_blobs(3000, n_features=32, centers=8, cluster_std=6.0, center_box=(-10, 10), random_state=5)
    x = l2_normalise(x.astype(np.float32))
    exact = clustering.knn_indices(x, 30)
    monkeypatch.setattr(clustering, "EXACT_KNN_MAX_POINTS", 1000)
    approximate = clustering.knn_indices(x, 30)
    recall = np.mean([len(set(a) & set(e)) / 30 for a, e in zip(approximate, exact)])
    assert recall > 0.9
    assert np.all(approximate[:, 0] == np.arange(len(x)))  # self is each point's nearest
    labels, _ = spectral_clustering(x, 8, seed=0, n_neighbors=30)
    monkeypatch.setattr(clustering, "EXACT_KNN_MAX_POINTS", 10**9)
    reference, _ = spectral_clustering(x, 8, seed=0, n_neighbors=30)
    assert adjusted_rand_score(reference, labels) >= 0.95


def test_spectral_clustering_passes_n_neighbors_on(monkeypatch):
    # COMUS's code never passed n_neighbors to the affinity; ours must.
    seen = []
    real = clustering.knn_indices

    def spy(x, n_neighbors):
        seen.append(n_neighbors)
        return real(x, n_neighbors)

    monkeypatch.setattr(clustering, "knn_indices", spy)
    x, _ = separated_blobs(n=200, k=3, dim=8)
    spectral_clustering(x, 3, seed=0, n_neighbors=23)
    assert seen == [23]
    # the symmetrised graph links each point to at least its n_neighbors nearest (itself included)
    # and equals scikit-learn's kneighbors_graph construction
    affinity = knn_affinity(x, 23)
    assert np.diff(affinity.indptr).min() >= 23
    connectivity = kneighbors_graph(x, n_neighbors=23, include_self=True)
    assert np.allclose(affinity.toarray(), (0.5 * (connectivity + connectivity.T)).toarray())


def test_filter_keeps_the_closest_fraction_of_each_cluster():
    labels = np.array([0] * 10 + [1] * 5)
    distances = np.concatenate([np.arange(10)[::-1], [0.5, 0.1, 0.3, 0.2, 0.4]]).astype(float)
    keep = filter_closest(labels, distances, 0.8)
    # cluster 0: the 8 smallest distances (9..2 are dropped... i.e. distances 0..7 kept)
    assert keep[:10].tolist() == [False, False] + [True] * 8
    # cluster 1: ceil(0.8 * 5) = 4, the furthest (0.5) dropped
    assert keep[10:].tolist() == [False, True, True, True, True]
    assert filter_closest(labels, distances, 1.0).all()
    # 0.7 * 10 is 7.000000000000001 in floating point: still 7 kept
    assert filter_closest(labels[:10], distances[:10], 0.7).sum() == 7
    with pytest.raises(ConfigError, match="keep_fraction"):
        filter_closest(labels, distances, 0.0)


def test_fewer_crops_than_clusters_is_a_clear_error():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(PipelineError, match=r"only 3 crops .* num_clusters=5.* at most 3"):
        kmeans_faiss(x, 5, seed=0)
    with pytest.raises(PipelineError, match="only 3 crops"):
        spectral_clustering(x, 5, seed=0)


def test_nan_features_name_the_rows_and_images():
    x = np.ones((6, 4), dtype=np.float32)
    x[1, 2] = np.nan
    x[4, 0] = np.inf
    with pytest.raises(PipelineError, match="2 of 6 crop feature rows contain NaN or inf"):
        kmeans_faiss(x, 2, seed=0)
    names = ["a", "b", "b", "c", "d", "d"]
    with pytest.raises(PipelineError, match=r"images: b, d\)"):
        check_features(x, 2, row_names=names)


def test_l2_normalise_keeps_zero_rows_finite():
    unit = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
