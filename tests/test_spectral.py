"""Batched spectral solvers (LAPACK on the CPU, filtered subspace iteration for GPUs): exact on
block-structured graphs, equal to scipy's eigsh, never wrong on the bench's hard set."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from pipeline import spectral
from pipeline.spectral import (
    eigengap_count,
    fix_signs,
    key_affinity,
    kmeans_segments,
    normalized_laplacian,
    order_segments,
    segment_patches,
    smallest_eigenpairs,
)


def block_keys(sizes: list[int], dim: int = 16, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Keys whose blocks are mutually orthogonal: W = max(ffᵀ, 0) is block diagonal."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for block, size in enumerate(sizes):
        base = torch.zeros(dim)
        base[block] = 1.0
        rows.append(base + noise * torch.randn(size, dim, generator=gen).abs() * (torch.arange(dim) == block))
    return torch.cat(rows)


def test_block_affinity_eigenvectors_separate_the_blocks_exactly():
    sizes = [10, 14, 8]
    w = key_affinity(block_keys(sizes).unsqueeze(0))
    values, vectors = smallest_eigenpairs(w, k=5)
    # three connected components: three null eigenvalues, then a gap
    assert torch.allclose(values[0, :3], torch.zeros(3), atol=1e-6)
    assert values[0, 3] > 0.5
    assert eigengap_count(values[0], max_segments=4) == 3
    labels = kmeans_segments(vectors[0, :, :3], n_segments=3, seed=0)
    truth = np.repeat(np.arange(3), sizes)
    # same partition up to renaming
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3


@pytest.mark.parametrize("solver", ["lapack", "subspace"])
def test_batched_solver_matches_scipy_eigsh(solver):
    torch.manual_seed(0)
    keys = torch.randn(3, 60, 24)  # 60 patches > 2 x the subspace block of 20: it iterates
    w = key_affinity(keys)
    values, vectors = smallest_eigenpairs(w, k=6, solver=solver)
    for b in range(3):
        wb = w[b].double().numpy()
        d = wb.sum(1)
        lap = scipy.sparse.csr_matrix(np.diag(d) - wb)
        ref_values, ref_vectors = scipy.sparse.linalg.eigsh(lap, k=6, M=scipy.sparse.diags(d), sigma=-1e-3, which="LM")
        order = np.argsort(ref_values)
        ref_values, ref_vectors = ref_values[order], ref_vectors[:, order]
        np.testing.assert_allclose(values[b].numpy(), ref_values, atol=1e-4)
        # same subspace: projecting ours onto the reference span loses nothing
        q, _ = np.linalg.qr(ref_vectors)
        ours = vectors[b].double().numpy()
        residual = ours - q @ (q.T @ ours)
        assert np.linalg.norm(residual) < 1e-3


def test_laplacian_is_symmetric_and_psd_with_isolated_zero_patches():
    keys = torch.randn(1, 12, 8)
    keys[0, 3] = 0.0  # a zero-degree patch must not produce NaN
    lap, _ = normalized_laplacian(key_affinity(keys))
    assert torch.isfinite(lap).all()
    assert torch.allclose(lap, lap.transpose(-1, -2))
    assert torch.linalg.eigvalsh(lap.double()).min() > -1e-6


def test_signs_are_reproducible_under_negation():
    v = torch.randn(2, 30, 4)
    assert torch.equal(fix_signs(v), fix_signs(-v))


def test_order_segments_puts_the_border_segment_at_zero():
    labels = torch.full((6, 6), 5)
    labels[2:4, 2:4] = 2
    labels[1, 1] = 7
    seg = order_segments(labels.flatten(), (6, 6), background="border")
    assert (seg[labels == 5] == 0).all()
    assert seg[1, 1] == 1 and (seg[2:4, 2:4] == 2).all()


def test_single_segment_image_is_one_foreground_segment():
    keys = torch.ones(1, 16, 8)  # one colour: every patch identical
    values, vectors = smallest_eigenpairs(key_affinity(keys), k=4)
    seg = segment_patches(values[0], vectors[0], (4, 4), n_segments=3, max_segments=8, background="border", seed=0)
    assert (seg == 1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_segments_is_deterministic(seed):
    v = torch.randn(50, 5)
    assert torch.equal(kmeans_segments(v, 4, seed), kmeans_segments(v, 4, seed))


def test_kmeans_segments_runs_on_one_thread(monkeypatch):
    """scikit-learn's k-means sees one OpenMP and one BLAS thread (its default pools spun on a
    shared machine: bench/segments.py); the caller's pools are back afterwards."""
    import sklearn.cluster
    from threadpoolctl import threadpool_info

    seen, real = [], sklearn.cluster.KMeans.fit_predict

    def spy(self, points, *args, **kwargs):
        seen.append({(info["user_api"], info["filepath"]): info["num_threads"] for info in threadpool_info()})
        return real(self, points, *args, **kwargs)

    monkeypatch.setattr(sklearn.cluster.KMeans, "fit_predict", spy)
    before = {(info["user_api"], info["filepath"]): info["num_threads"] for info in threadpool_info()}
    kmeans_segments(torch.randn(50, 5), 4, 0)
    assert seen and set(seen[0].values()) == {1}
    assert max(before.values()) > 1  # the tests' OMP_NUM_THREADS=2: the limit is what made it 1
    assert {(info["user_api"], info["filepath"]): info["num_threads"] for info in threadpool_info()} == before


def _bench_spectral():
    """bench/spectral.py as a module: the hard set and the definition of a wrong result live there."""
    path = Path(__file__).resolve().parents[1] / "bench" / "spectral.py"
    spec = importlib.util.spec_from_file_location("bench_spectral", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hard_set():
    """The bench's demo colour-key graphs: λ_19 sits in a bulk of eigenvalues ~3e-4 apart, one
    image has 393 eigenvalues within 1e-3 past λ_19 — where the float32 GPU eigh was wrong."""
    bench = _bench_spectral()
    w, _ = bench.demo_affinities(4, seed=0)
    return bench, w


@pytest.mark.parametrize("solver", ["lapack", "subspace"])
def test_no_wrong_eigenpairs_on_the_benchs_hard_set(hard_set, solver):
    bench, w = hard_set
    args = Namespace(k=20, eig_tol=1e-4, subspace_tol=1e-3, gap_tol=1e-3)  # the bench's defaults
    values, vectors = smallest_eigenpairs(w, 20, solver=solver)
    checks = [bench.check(values[i].numpy(), vectors[i].numpy(), bench.ground_truth(w[i].numpy()), args)
              for i in range(w.shape[0])]
    assert max(c.m for c in checks) > 100  # the set still has its boundary cluster
    assert [c for c in checks if c.wrong] == []


def test_subspace_solver_certifies_its_pairs_or_solves_densely(hard_set, monkeypatch):
    _, w = hard_set
    values, vectors, _, dense = spectral._subspace_top(w, 20)
    assert dense == 0  # the hard set converges by iteration alone
    m, _ = spectral._normalized_affinity(w, torch.float64)
    residual = m @ vectors - vectors * (1.0 - values).unsqueeze(-2)
    assert residual.norm(dim=-2).max() <= spectral.SUBSPACE_RESIDUAL_TOL
    # No round allowed: every image falls back to the dense float64 solve, with the same values.
    monkeypatch.setattr(spectral, "SUBSPACE_MAX_ROUNDS", 0)
    dense_values, _, _, dense = spectral._subspace_top(w, 20)
    assert dense == w.shape[0]
    torch.testing.assert_close(dense_values, values, atol=1e-9, rtol=0)


def test_subspace_solver_is_reproducible():
    w = key_affinity(torch.randn(2, 90, 16, generator=torch.Generator().manual_seed(3)))
    first, second = smallest_eigenpairs(w, 8, solver="subspace"), smallest_eigenpairs(w, 8, solver="subspace")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver 'magma'"):
        smallest_eigenpairs(torch.ones(1, 4, 4), 2, solver="magma")


def test_orthonormalise_takes_a_filtered_blocks_conditioning_without_householder(monkeypatch):
    """A filtered block reaches κ ≈ 1e14 (past plain Cholesky-QR's 1/sqrt(u) ≈ 7e7): shifted
    Cholesky-QR must still return orthonormal columns that span the block, with no per-matrix
    Householder QR (its GPU loop was most of a batch's solve time)."""
    generator = torch.Generator().manual_seed(0)
    n, b = 300, 24
    u = torch.linalg.qr(torch.randn(2, n, b, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(2, b, b, generator=generator, dtype=torch.float64)).Q
    sigma = torch.logspace(0, -14, b, dtype=torch.float64)
    x = u @ torch.diag(sigma) @ v.transpose(-1, -2)
    assert torch.linalg.cond(x).min() > 1e13

    def no_householder(*args, **kwargs):
        raise AssertionError("Householder QR fallback")

    monkeypatch.setattr(torch.linalg, "qr", no_householder)
    q = spectral._orthonormalise(x)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, torch.eye(b, dtype=torch.float64).expand(2, b, b),
                               atol=1e-13, rtol=0)
    unit = x / x.norm(dim=-2, keepdim=True)
    assert (unit - q @ (q.transpose(-1, -2) @ unit)).norm(dim=-2).max() < 1e-12  # span(q) holds x's columns
