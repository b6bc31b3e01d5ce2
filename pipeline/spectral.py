"""Spectral Laplacian decomposition of one image's patch graph (paper 000 Sec. 3.3, eq. 10).

Batched: images of the same patch grid are stacked and solved together — LAPACK's partial dense
solver per matrix on the CPU, a batched float64 filtered subspace iteration (matrix products on
the whole stack, only the K pairs needed) on a GPU — instead of one sparse shift-invert ``eigsh``
per image as Deep Spectral Methods does (slower, and it sometimes returns a wrong subspace on
these singular Laplacians).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

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


# Batched filtered subspace iteration (the GPU solver, see `_subspace_top`). Work precision is
# float64 throughout: float32 eigensolves of these Laplacians were wrong on every demo image
# (eigenvalue errors 2.5e-4 inside the clusters of near-equal eigenvalues at the K boundary,
# bench/spectral.py), while float64 matrix products cost about as much as float32 ones on the
# data-centre GPUs this path is for.
SUBSPACE_RESIDUAL_TOL = 1e-7  # per pair ||M x - θ x||; Davis-Kahan: sin ≤ 4.5e-4 at a 1e-3 gap, K = 20
SUBSPACE_MAX_DEGREE = 16  # Chebyshev degree between two Rayleigh-Ritz steps, at most
# ln of the largest growth of the top wanted eigenvalue over the k-th one in one filter: the
# filter multiplies the top pair's error components too, and they must stay well above float64
# rounding relative to the k-th pair's (see `_filter_degree`).
SUBSPACE_GROWTH = float(np.log(1e8))
SUBSPACE_MAX_ROUNDS = 40  # then the images not certified are solved densely
LANCZOS_STEPS = 12  # for the lower end of the spectrum the filter damps
SUBSPACE_SEED = 0  # start block: reproducible results for reproducible inputs
# Vectors in the iterated block; None: `_block_size`'s choice (bench/spectral.py --subspace-block).
SUBSPACE_BLOCK: int | None = None
SOLVERS = ("auto", "lapack", "subspace")


def _normalized_affinity(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(M = D^{-1/2} W D^{-1/2} in ``dtype``, d^{-1/2}); L = I - M."""
    inv_sqrt = w.sum(-1).clamp_min(MIN_DEGREE).rsqrt()
    scale = inv_sqrt.to(dtype)
    return scale.unsqueeze(-1) * w.to(dtype) * scale.unsqueeze(-2), inv_sqrt


def _orthonormalise(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning x's (B×N×b). Columns are scaled to unit norm first — after
    filtering they are nearly orthogonal but of very different lengths — then shifted
    Cholesky-QR (Fukaya et al. 2020): Cholesky-QR of the Gram matrix plus a small shift takes
    a block's condition number κ to about sqrt(κ · shift) whatever κ (a filtered block
    reaches 1e14, far past plain Cholesky-QR's 1/sqrt(u)); two such passes, then two plain ones
    that make the columns orthonormal to rounding. Batched GEMMs and b×b Cholesky factors: no
    per-matrix Householder loop on the GPU. A batch with a Gram matrix that is not positive
    definite even so (an exactly rank-deficient block) takes Householder QR."""
    x = x / x.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    n, b = x.shape[-2:]
    # The paper's shift 11 (N·b + b(b+1)) u ||X||², with ||X||² ≤ b for unit columns.
    shift = 11 * (n * b + b * (b + 1)) * torch.finfo(x.dtype).eps * b
    identity = torch.eye(b, dtype=x.dtype, device=x.device)
    failed = torch.zeros((), dtype=torch.bool, device=x.device)
    original = x
    for extra in (shift, shift, 0.0, 0.0):
        factor, info = torch.linalg.cholesky_ex(x.transpose(-1, -2) @ x + extra * identity, upper=True)
        failed = failed | (info != 0).any()
        x = torch.linalg.solve_triangular(factor, x, upper=True, left=False)
    if bool(failed):  # one host read for the four passes
        return torch.linalg.qr(original).Q
    return x


def _small_eigh(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a stack of small (b×b) symmetric matrices. torch solves a CUDA stack in one batched
    call (cuSOLVER's Jacobi syevjBatched) only up to 32×32 and loops over the matrices above;
    a 64×48×48 stack is a few milliseconds for LAPACK on the host, so larger ones go there."""
    if h.device.type != "cuda" or h.shape[-1] <= 32:
        return torch.linalg.eigh(h)
    values, vectors = torch.linalg.eigh(h.cpu())
    return values.to(h.device), vectors.to(h.device)


def _rayleigh_ritz(m: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz pairs of M on span(x) (orthonormal columns), largest first: (θ B×b, vectors B×N×b,
    residual norms ||M v - θ v|| B×b)."""
    mx = m @ x
    h = x.transpose(-1, -2) @ mx
    theta, y = _small_eigh((h + h.transpose(-1, -2)) / 2)
    theta, y = theta.flip(-1), y.flip(-1)
    vectors = x @ y
    residuals = (mx @ y - vectors * theta.unsqueeze(-2)).norm(dim=-2)
    return theta, vectors, residuals


def _start_vectors(n: int, block: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lanczos start vector (N×1, unit) and the orthonormal start block (N×b) of every image,
    random from a fixed seed. One for the whole batch: drawn, orthonormalised and copied once,
    not per image (per-image draws were most of a batch's time on a GPU: bench/RESULTS.md), and
    an image's start does not depend on the batch it is in."""
    generator = torch.Generator().manual_seed(SUBSPACE_SEED)
    lanczos = torch.randn(n, 1, generator=generator, dtype=dtype)
    block_start = torch.linalg.qr(torch.randn(n, block, generator=generator, dtype=dtype)).Q
    return ((lanczos / lanczos.norm()).to(device, non_blocking=True),
            block_start.to(device, non_blocking=True))


def _spectrum_lower_bound(m: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """A lower bound of M's smallest eigenvalue per matrix (B), from a few Lanczos steps: the
    smallest Ritz value minus its residual |β_k y_k| (Zhou & Saad's bound estimator), never
    below -1, M's true bound. A tight bound matters: the filter's power to separate eigenvalues
    scales with their gap over the width of the damped interval."""
    batch, n, _ = m.shape
    steps = min(LANCZOS_STEPS, n)
    q = start.expand(batch, n, 1)
    previous = torch.zeros_like(q)
    alphas, betas = [], []
    beta = torch.zeros(batch, 1, 1, dtype=m.dtype, device=m.device)
    for _ in range(steps):
        v = m @ q - beta * previous
        alpha = (q * v).sum(-2, keepdim=True)
        v = v - alpha * q
        beta = v.norm(dim=-2, keepdim=True)
        alphas.append(alpha.view(batch))
        betas.append(beta.view(batch))
        previous, q = q, v / beta.clamp_min(torch.finfo(m.dtype).tiny)
    tri = torch.diag_embed(torch.stack(alphas, -1))
    off = torch.diag_embed(torch.stack(betas[:-1], -1), offset=1)
    theta, y = torch.linalg.eigh(tri + off + off.transpose(-1, -2))
    bound = theta[:, 0] - (betas[-1] * y[:, -1, 0]).abs()
    return bound.clamp_min(-1.0)


def _filter_degree(theta: torch.Tensor, first: torch.Tensor, k: int, lower: torch.Tensor,
                   upper: torch.Tensor) -> int:
    """The Chebyshev degree of the next filter, one for the whole batch.

    T_d amplifies an eigenvalue μ above the interval by about exp(d · acosh(x(μ))). The first
    filtered Ritz vector (``first``: the pairs before it are locked) is amplified more than the
    k-th, by exp(d · (acosh x(θ_first) - acosh x(θ_{k-1}))). Past float64's range that swamps
    the k-th pair's column with the first pair's error component and the round is wasted, so d
    is capped to keep this ratio ≤ e^SUBSPACE_GROWTH.
    """
    def growth(mu: torch.Tensor) -> torch.Tensor:
        return torch.acosh(((2 * mu - upper - lower) / (upper - lower)).clamp_min(1.0))

    top = theta.gather(1, first.clamp_max(k - 1).unsqueeze(1)).squeeze(1)
    spread = float((growth(top) - growth(theta[:, k - 1])).max())
    return max(1, min(SUBSPACE_MAX_DEGREE, int(SUBSPACE_GROWTH / max(spread, 1e-12))))


def _chebyshev_filter(m: torch.Tensor, x: torch.Tensor, locked: torch.Tensor, theta: torch.Tensor,
                      lower: torch.Tensor, upper: torch.Tensor, degree: int) -> torch.Tensor:
    """T_d((A - e)/h) x with [lower, upper] mapped onto [-1, 1]: eigenvalues in the interval are
    kept at |T_d| ≤ 1, those above it grow like exp(d · acosh(...)). A is M with the locked
    (converged) Ritz pairs moved to ``lower``, so they are no longer amplified; their columns are
    returned unfiltered. locked: B×b bool; theta: B×b Ritz values of x; lower/upper: B."""
    lower3, upper3 = lower.view(-1, 1, 1), upper.view(-1, 1, 1)
    centre, half = (upper3 + lower3) / 2, (upper3 - lower3) / 2
    q = x * locked.unsqueeze(-2)
    shift = (theta - lower.unsqueeze(-1)).unsqueeze(-1)

    def step(y: torch.Tensor) -> torch.Tensor:
        ay = m @ y - q @ (shift * (q.transpose(-1, -2) @ y))
        return (ay - centre * y) / half

    previous, current = x, step(x)
    for _ in range(degree - 1):
        previous, current = current, 2 * step(current) - previous
    return torch.where(locked.unsqueeze(-2), x, current)


def _dense_top(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M's k largest eigenpairs by a full dense solve in M's dtype: (θ B×k descending, B×N×k)."""
    theta, vectors = torch.linalg.eigh(m)
    return theta[..., -k:].flip(-1), vectors[..., -k:].flip(-1)


def _block_size(n: int, k: int) -> int:
    """Vectors in the iterated block: 2K + 8, cut to 32 while that leaves 12 beyond the K wanted.
    Up to 32, a GPU solves the Rayleigh-Ritz eigenproblems itself (cuSOLVER's batched Jacobi);
    above, they go to LAPACK on the host and back every round. For K = 20 that is 32 instead of
    48: one more round, 3x faster on an H200 (0.3 vs 0.9 ms an image at 784 patches, batches of
    96, 0 wrong on the bench's sets; bench/RESULTS.md). ``SUBSPACE_BLOCK`` overrides it."""
    if SUBSPACE_BLOCK:
        return min(n, max(k + 1, SUBSPACE_BLOCK))
    return min(n, max(k + 12, min(2 * k + 8, 32)))


def _subspace_top(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The k largest eigenpairs of M = D^{-1/2} W D^{-1/2}, batched, on w's device, in float64.

    Chebyshev-filtered subspace iteration (Zhou & Saad 2007) on a block of b vectors (`_block_size`):
    the filter damps [lower bound of the spectrum, b-th Ritz value] and amplifies what lies
    above, a Rayleigh-Ritz step after every filter (degree ≤ SUBSPACE_MAX_DEGREE), converged
    leading pairs locked. Everything is a batched matrix product on the whole stack — no
    per-matrix solver loop — and only O(N²·b) work per product instead of a full O(N³)
    decomposition. An image is done when each of its k Ritz
    pairs has a residual ≤ SUBSPACE_RESIDUAL_TOL: then every Ritz value is within that of an
    eigenvalue, and (Davis-Kahan) the k vectors span, to sin ≤ ||R|| / δ, the eigenvectors whose
    eigenvalues lie within δ of the k found — the correctness criterion of bench/spectral.py.
    Images not certified after SUBSPACE_MAX_ROUNDS (eigenvalue clusters straddling the whole
    block) are solved densely in float64, so the result is never an unconverged one.
    The start block comes from a fixed seed and the filter degree is chosen per batch, so the same
    batch gives the same result; another batching of the same images agrees within the
    certified tolerance (vectors may rotate inside an eigenvalue cluster).
    Returns (L's eigenvalues B×k ascending, eigenvectors B×N×k, d^{-1/2} B×N, images solved
    densely).
    """
    m, inv_sqrt = _normalized_affinity(w, torch.float64)
    batch, n, _ = m.shape
    block = _block_size(n, k)
    if 2 * block >= n:  # small graphs: the dense solve is as cheap, and exact
        theta, vectors = _dense_top(m, k)
        return 1.0 - theta, vectors, inv_sqrt, batch
    lanczos_start, block_start = _start_vectors(n, block, m.dtype, m.device)
    lower = _spectrum_lower_bound(m, lanczos_start)
    theta, x, residuals = _rayleigh_ritz(m, block_start.expand(batch, n, block))
    for _ in range(SUBSPACE_MAX_ROUNDS):
        if bool((residuals[:, :k] <= SUBSPACE_RESIDUAL_TOL).all()):
            break
        # The interval's top is the lowest Ritz value (an estimate of the unwanted part), kept
        # below the k-th so that a cluster at the boundary is still lifted out of the interval.
        upper = torch.minimum(theta[:, -1], theta[:, k - 1] - 1e-6).clamp_min(lower + 1e-6)
        # Locking: the leading pairs already converged keep their vectors and leave the filter.
        converged = (residuals <= SUBSPACE_RESIDUAL_TOL) & (torch.arange(block, device=m.device) < k)
        locked = converged.cumprod(-1).bool()
        degree = _filter_degree(theta, locked.sum(-1), k, lower, upper)
        x = _orthonormalise(_chebyshev_filter(m, x, locked, theta, lower, upper, degree))
        theta, x, residuals = _rayleigh_ritz(m, x)
    theta, vectors = theta[:, :k], x[:, :, :k]
    unconverged = (residuals[:, :k] > SUBSPACE_RESIDUAL_TOL).any(-1).nonzero().flatten()
    if unconverged.numel():
        log.info("spectral: %d of %d images not certified after %d rounds, solved densely in float64",
                 unconverged.numel(), batch, SUBSPACE_MAX_ROUNDS)
        dense_theta, dense_vectors = _dense_top(m[unconverged], k)
        theta = theta.index_copy(0, unconverged, dense_theta)
        vectors = vectors.index_copy(0, unconverged, dense_vectors)
    return 1.0 - theta, vectors, inv_sqrt, int(unconverged.numel())


def smallest_eigenpairs(w: torch.Tensor, k: int, solver: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest eigenpairs of the generalised problem (D - W) v = λ D v, batched.

    Solved through the symmetric normalised Laplacian (paper 000 Sec. 3.3): L u = λ u with
    v = D^{-1/2} u (same eigenvalues). ``solver``: ``lapack`` (:func:`_normalized_affinity_top`,
    CPU tensors only), ``subspace`` (:func:`_subspace_top`, any device), ``auto`` = lapack on the
    CPU, subspace elsewhere. Returns (eigenvalues B×k ascending, eigenvectors B×N×k with unit
    norm and reproducible signs), float32, on w's device.
    """
    if solver not in SOLVERS:
        raise ValueError(f"smallest_eigenpairs: solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if solver == "auto":
        solver = "lapack" if w.device.type == "cpu" else "subspace"
    n = w.shape[-1]
    k = min(k, n)
    w = w.float()
    if solver == "lapack":
        values, vectors, inv_sqrt = _normalized_affinity_top(w, k)
    else:
        values, vectors, inv_sqrt, _ = _subspace_top(w, k)
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
    patches × K ≤ 20 dims), so a robust CPU k-means costs milliseconds — on one thread. With its
    default (an OpenMP thread per core) it spun: 1.3 s an image on this 2-core machine with another
    job on it, 15 ms on one thread (bench/segments.py), the same labels; one thread also
    fixes the order of its float sums, whatever the machine's core count.
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
    with _thread_pools().limit(limits=1):
        labels = KMeans(n_clusters=n_segments, n_init=10, random_state=seed).fit_predict(points)
    return torch.as_tensor(labels, dtype=torch.long)


@functools.cache
def _thread_pools():
    """The BLAS and OpenMP thread pools loaded (scikit-learn's included), found once: looking
    them up costs ~1 ms, as much as a tenth of one image's k-means."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


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
