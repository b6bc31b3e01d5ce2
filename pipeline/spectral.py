"""Spectral Laplacian decomposition of one image's patch graph (paper 000 Sec. 3.3, eq. 10).

Dense and batched: images of the same patch grid are stacked and solved together — one
``torch.linalg.eigh`` call on the GPU, LAPACK's partial dense solver per matrix on the CPU —
instead of one sparse shift-invert ``eigsh`` per image as Deep Spectral Methods does (slower, and
it sometimes returns a wrong subspace on these singular Laplacians).
"""

from __future__ import annotations

import numpy as np
import torch

# Floor on a patch's degree: a patch whose keys are all zero has no affinity to anything; the floor
# keeps D^{-1/2} finite and leaves such a patch as an isolated vertex (its own null eigenvector).
MIN_DEGREE = 1e-6


def colour_patch_features(rgb: np.ndarray, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-patch colour mean and spread, centred per image: a network-free stand-in for ViT keys
    (unlike patches get negative, i.e. zero, affinity), used to check the spectral machinery on
    images without a trained backbone (tests, bench/spectral.py). Returns (N×6, grid)."""
    h, w, _ = rgb.shape
    gh, gw = h // patch, w // patch
    patches = rgb[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(gh * gw, patch * patch, 3).astype(np.float32) / 255
    f = np.concatenate([patches.mean(1), patches.std(1)], 1)
    return torch.from_numpy(f - f.mean(0)), (gh, gw)


def key_affinity(keys: torch.Tensor) -> torch.Tensor:
    """W = max(f fᵀ, 0) on L2-normalised keys (paper 000 eq. 10; negative affinities clipped as in
    Deep Spectral Methods). keys: B×N×D -> W: B×N×N float32."""
    f = torch.nn.functional.normalize(keys.float(), dim=-1)
    return (f @ f.transpose(-1, -2)).clamp_min_(0.0)


def colour_knn_affinity(
    pixels: torch.Tensor, grid: tuple[int, int], n_neighbors: int, xy_weight: float
) -> torch.Tensor:
    """Binary kNN affinity on [r, g, b, x, y] per patch (KNN matting, as the colour term of Deep
    Spectral Methods). pixels: B×N×3 in [0, 1] (the image downsampled to the patch grid).
    Symmetrised so the Laplacian stays symmetric. Returns B×N×N float32."""
    batch, n, _ = pixels.shape
    gh, gw = grid
    ys, xs = torch.meshgrid(
        torch.linspace(0, 1, gh, device=pixels.device), torch.linspace(0, 1, gw, device=pixels.device), indexing="ij"
    )
    xy = torch.stack([xs, ys], dim=-1).reshape(1, n, 2).expand(batch, n, 2) * xy_weight
    points = torch.cat([pixels.float(), xy], dim=-1)
    k = min(n_neighbors + 1, n)  # +1: every point is its own nearest neighbour
    nearest = torch.cdist(points, points).topk(k, dim=-1, largest=False).indices
    w = torch.zeros(batch, n, n, device=pixels.device)
    w.scatter_(2, nearest, 1.0)
    return (w + w.transpose(-1, -2)) / 2


def normalized_laplacian(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L = D^{-1/2} (D - W) D^{-1/2} = I - D^{-1/2} W D^{-1/2} (paper 000 Sec. 3.3).
    Returns (L, d^{-1/2}); both batched."""
    degree = w.sum(-1).clamp_min(MIN_DEGREE)
    inv_sqrt = degree.rsqrt()
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    lap = eye - inv_sqrt.unsqueeze(-1) * w * inv_sqrt.unsqueeze(-2)
    return (lap + lap.transpose(-1, -2)) / 2, inv_sqrt


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Make eigenvector signs reproducible: the positive part is the smaller side (as Deep
    Spectral Methods), ties broken by making the largest-magnitude entry positive.
    vectors: B×N×K (columns are eigenvectors)."""
    n = vectors.shape[-2]
    positive = (vectors > 0).sum(-2)
    largest = vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True)).squeeze(-2)
    flip = (positive > n / 2) | ((positive * 2 == n) & (largest < 0))
    return torch.where(flip.unsqueeze(-2), -vectors, vectors)


def _normalized_affinity_top(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU solve: the k LARGEST eigenpairs of M = D^{-1/2} W D^{-1/2}, one matrix per thread.

    L = I - M, so L's k smallest eigenvalues are 1 - M's k largest with the same eigenvectors;
    working on M skips forming I - M and symmetrising (LAPACK reads one triangle). LAPACK's
    relatively-robust-representations driver (``syevr``) computes only the k pairs asked for —
    still a dense solve — with single-threaded BLAS per matrix: multi-threaded BLAS on matrices
    this small was 10-30x slower on a busy 2-core machine, and torch's batched CPU ``eigh`` was
    erratic (0.3-7 s per matrix). bench/spectral.py has the numbers.
    Returns (L's eigenvalues B×k ascending, eigenvectors B×N×k, d^{-1/2} B×N).
    """
    from concurrent.futures import ThreadPoolExecutor

    import scipy.linalg
    from threadpoolctl import threadpool_limits

    n = w.shape[-1]
    inv_sqrt = w.sum(-1).clamp_min(MIN_DEGREE).rsqrt()

    def solve(index: int):
        scale = inv_sqrt[index].numpy()
        m = w[index].numpy() * scale[:, None] * scale[None, :]
        mu, vectors = scipy.linalg.eigh(m, subset_by_index=[n - k, n - 1], driver="evr",
                                        overwrite_a=True, check_finite=False)
        return 1.0 - mu[::-1], vectors[:, ::-1]

    with threadpool_limits(1), ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        pairs = list(pool.map(solve, range(w.shape[0])))
    values = torch.stack([torch.from_numpy(np.ascontiguousarray(lam)) for lam, _ in pairs])
    vectors = torch.stack([torch.from_numpy(np.ascontiguousarray(vec)) for _, vec in pairs])
    return values, vectors, inv_sqrt


def smallest_eigenpairs(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest eigenpairs of the generalised problem (D - W) v = λ D v, batched.

    Solved through the symmetric normalised Laplacian (paper 000 Sec. 3.3): L u = λ u with
    v = D^{-1/2} u (same eigenvalues). GPU: one batched ``torch.linalg.eigh`` of L (fast there);
    CPU: see :func:`_normalized_affinity_top`. Returns (eigenvalues B×k ascending, eigenvectors
    B×N×k with unit norm and reproducible signs), float32.
    """
    n = w.shape[-1]
    k = min(k, n)
    w = w.float()
    if w.device.type == "cpu":
        values, vectors, inv_sqrt = _normalized_affinity_top(w, k)
    else:
        lap, inv_sqrt = normalized_laplacian(w)
        values, vectors = torch.linalg.eigh(lap)
        values, vectors = values[..., :k], vectors[..., :k]
    values = values.float().clamp_min(0.0)
    vectors = torch.nn.functional.normalize(inv_sqrt.unsqueeze(-1) * vectors.float(), dim=-2)
    return values, fix_signs(vectors)


def eigengap_count(eigenvalues: torch.Tensor, max_segments: int) -> int:
    """Number of segments from the largest gap between consecutive non-null eigenvalues
    (paper 000 Sec. 2/3.3 after Deep Spectral Methods): argmax_i (λ_{i+1} - λ_i) over i ≥ 1,
    so the null eigenvalue λ_0 never decides it. Returns a count in [2, max_segments]."""
    values = eigenvalues[: max_segments + 1]
    if values.numel() < 3:
        return max(1, min(2, values.numel()))
    gaps = values[2:] - values[1:-1]
    return int(gaps.argmax()) + 2


def kmeans_segments(eigenvectors: torch.Tensor, n_segments: int, seed: int) -> torch.Tensor:
    """Cluster patches on eigenvectors 1..K (the null eigenvector 0 is constant on a connected
    graph and carries no grouping) into ``n_segments`` groups. Returns N cluster ids.

    scikit-learn KMeans with k-means++ and a fixed seed: the per-image problem is tiny (N ≈ 700
    patches × K ≤ 20 dims), so a robust CPU k-means costs milliseconds.
    """
    from sklearn.cluster import KMeans

    points = eigenvectors[:, 1:].double().cpu().numpy()
    n = points.shape[0]
    n_segments = min(n_segments, n)
    distinct = len({tuple(row) for row in points.round(6).tolist()})
    if n_segments <= 1 or distinct <= 1:
        # Degenerate graph (one colour, isolated patches): the whole image is one segment.
        return torch.zeros(n, dtype=torch.long)
    n_segments = min(n_segments, distinct)
    labels = KMeans(n_clusters=n_segments, n_init=10, random_state=seed).fit_predict(points)
    return torch.as_tensor(labels, dtype=torch.long)


def order_segments(labels: torch.Tensor, grid: tuple[int, int], background: str) -> torch.Tensor:
    """Relabel segments as a gh×gw map: 0 is the background segment (the one with most patches on
    the image border, when ``background == "border"``), the others 1.. in raster order of first
    appearance so that ids are reproducible. With ``background == "none"`` every segment is
    foreground and ids start at 1."""
    gh, gw = grid
    seg = labels.reshape(gh, gw)
    ids = torch.unique(seg)
    border = torch.zeros_like(seg, dtype=torch.bool)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    bg = None
    if background == "border" and len(ids) > 1:
        counts = torch.stack([(seg[border] == i).sum() for i in ids])
        bg = int(ids[counts.argmax()])
    first_seen = {}
    for value in seg.flatten().tolist():
        if value != bg and value not in first_seen:
            first_seen[value] = len(first_seen) + 1
    out = torch.zeros_like(seg)
    for old, new in first_seen.items():
        out[seg == old] = new
    return out


def segment_patches(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    grid: tuple[int, int],
    n_segments: int | None,
    max_segments: int,
    background: str,
    seed: int,
) -> torch.Tensor:
    """One image's patch-level segment map (gh×gw, background 0, segments 1..).

    ``n_segments=None`` picks the count by the eigengap. A graph without spectral structure (all
    non-null eigenvalues equal, as for a one-colour image whose patches are all alike) has no
    preferred partition: documented fallback, the whole image is one foreground segment.
    """
    non_null = eigenvalues[1:]
    if non_null.numel() == 0 or float(non_null.max() - non_null.min()) < 1e-6:
        return torch.ones(grid, dtype=torch.long)
    count = eigengap_count(eigenvalues, max_segments) if n_segments is None else n_segments
    labels = kmeans_segments(eigenvectors, count, seed)
    return order_segments(labels, grid, background)
