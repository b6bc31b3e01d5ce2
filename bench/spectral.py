"""Our batched dense spectral solver against Deep Spectral Methods' per-image shift-invert eigsh.

Both solve the K smallest eigenpairs of (D - W) v = λ D v on the SAME affinity matrices
W = key_affinity(keys) (float32, built once and shared; affinity construction is NOT timed on
either side). Inputs:

  demo  — demo images (pipeline.datasets.demo) at 384x288, keys from the per-patch colour
          stand-in of tests/test_segments.py (patch 16 -> 18x24 = 432 patches);
  voc   — VOC-sized synthetic key grids, 23x31 = 713 patches: a few random prototype vectors
          painted into random rectangles / ellipses on a background prototype, plus a spatially
          smooth random field and i.i.d. noise.

Timed:
  ours      — ``smallest_eigenpairs(W, K, solver=--solver)`` per batch of ``--batch-size``
              same-grid images (Laplacian, solve, D^{-1/2} back-transform, normalisation, sign
              fix); ``--solver subspace --device cpu`` runs the GPU algorithm on the CPU;
  eigh      — on a GPU only: the solver it replaces, one batched float32 ``torch.linalg.eigh`` of
              L_sym on the same device, then the same back-transform (``--no-eigh`` to skip);
  reference — per image, exactly like Deep Spectral Methods:
              ``eigsh(csr(D - W), k=K, sigma=0, which="LM", M=diags(D))`` (float64 by default,
              ``--ref-dtype float32`` for DSM's dtype), sorted ascending, columns normalised,
              signs fixed like ours. An exception counts as a failure (DSM would then retry
              with which="SM"; we do not).

Correctness against ground truth: dense float64 ``scipy.linalg.eigh`` of
L_sym = I - D^{-1/2} W D^{-1/2} (full spectrum) per image, from the same float32 W. Each method's
vectors v are mapped to L_sym's space, u = D^{1/2} v with unit columns (the generalised problem's
eigenvectors are v = D^{-1/2} u). A result is WRONG if any of
  * eigenvalue: some |λ_i - λ_i(true)| > ``--eig-tol`` (1e-4), i < K;
  * orthogonality: max |UᵀU - I| > ``--subspace-tol`` (1e-3) — K independent eigenvectors, so a
    duplicated or missing vector is caught;
  * subspace: sin of the largest principal angle between span(U) and the span of the true first
    m eigenvectors > ``--subspace-tol`` (1e-3), i.e. ||U - Q Qᵀ U||₂ with Q = true u_0..u_{m-1}.
    Rule for degenerate clusters at the K boundary: m = the number of true eigenvalues
    ≤ λ_{K-1} + ``--gap-tol`` (1e-3); m = K when the boundary gap exceeds gap-tol, otherwise the
    eigenvalues just past the boundary within gap-tol are admitted too, so any K orthonormal
    vectors of a cluster straddling the boundary count as correct, while a vector from further up
    the spectrum (≥ gap-tol beyond λ_{K-1}) does not. Only span(U) is checked, so vectors may
    rotate freely inside clusters. By Davis-Kahan the span of K correct pairs then lies within
    sin ≤ residual / gap-tol of the compared span: float32 rounding of W and L (≈1e-7) gives
    ≈1e-4, under the 1e-3 threshold.

Segment agreement: ``segment_patches(values, vectors, grid, None, 8, "border", seed=0)`` on both
methods' eigenpairs; mean adjusted Rand index and the fraction of identical maps, over images
where the reference did not fail. The untimed checks run with one BLAS/OpenMP thread.

    python bench/spectral.py                                  # defaults: CPU, 2 threads, K=20
    python bench/spectral.py --threads 1 --voc-images 32
    python bench/spectral.py --device cuda --out /tmp/spectral.md
    python bench/spectral.py --solver subspace                # the GPU algorithm, on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg
import torch
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import profiled

import pipeline.spectral as spectral
from machine import cpu_model
from pipeline.datasets.demo import generate_demo
from pipeline.imageio import load_rgb
from pipeline.spectral import (
    MIN_DEGREE,
    SOLVERS,
    colour_patch_features,
    fix_signs,
    key_affinity,
    normalized_laplacian,
    segment_patches,
    smallest_eigenpairs,
)

PATCH = 16
VOC_GRID = (23, 31)  # 368x496 px at patch 16: a typical VOC image
SMOOTH_FIELD = 1.5  # std of the synthetic keys' spatially smooth component (prototypes: std 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-images", type=int, default=24, help="demo images at 384x288 (0: skip)")
    parser.add_argument("--voc-images", type=int, default=64, help="synthetic 23x31 grids (0: skip)")
    parser.add_argument("--dim", type=int, default=384, help="key dimension of the synthetic grids")
    parser.add_argument("--voc-grid", default="23x31", help="patch grid HxW of the synthetic set (28x28: 784 patches)")
    parser.add_argument("-K", "--k", type=int, default=20, help="eigenpairs per image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (ours and eigh; eigsh is CPU)")
    parser.add_argument("--solver", default="auto", choices=SOLVERS, help="smallest_eigenpairs' solver")
    parser.add_argument("--no-eigh", action="store_true", help="on a GPU, skip the float32 eigh baseline")
    parser.add_argument("--subspace-block", type=int, help="vectors in the subspace solver's block "
                        "(pipeline.spectral.SUBSPACE_BLOCK; default: _block_size, 32 for K = 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS/LAPACK threads")
    parser.add_argument("--ref-dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--eig-tol", type=float, default=1e-4)
    parser.add_argument("--subspace-tol", type=float, default=1e-3)
    parser.add_argument("--gap-tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the Markdown report here (overwrite)")
    parser.add_argument("--profile", type=Path, help="append torch.profiler's tables of ours on each set's first "
                        "batch to this file (bench/profiling.py)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- inputs

def demo_affinities(count: int, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """W (count×N×N) of ``count`` demo images at 384x288 from the colour stand-in keys."""
    with tempfile.TemporaryDirectory(prefix="bench-spectral-") as tmp:
        generate_demo(Path(tmp), seed=seed, n_train=count, n_val=0, width=384, height=288)
        paths = sorted((Path(tmp) / "images" / "train").glob("*.png"))
        keys = [colour_patch_features(load_rgb(path), PATCH) for path in paths]
    grid = keys[0][1]
    return key_affinity(torch.stack([k for k, _ in keys])), grid


def synthetic_keys(rng: np.random.Generator, grid: tuple[int, int], dim: int) -> np.ndarray:
    """One grid of keys: background prototype, 1-4 rectangles / ellipses of other prototypes,
    a component shared by all patches (as ViT keys have), a spatially smooth random field
    (neighbouring patches alike, as in ViT keys: it gives the graded Laplacian spectrum of real
    images instead of a flat noise bulk right after the first few eigenvalues) and i.i.d. noise.
    Returns N×dim float32."""
    gh, gw = grid
    n_protos = int(rng.integers(3, 7))
    protos = rng.normal(size=(n_protos, dim)) + 0.5 * rng.normal(size=(1, dim))
    labels = np.zeros(grid, dtype=np.int64)
    yy, xx = np.mgrid[0:gh, 0:gw]
    for _ in range(int(rng.integers(1, 5))):
        h, w = int(rng.integers(3, gh * 2 // 3)), int(rng.integers(3, gw * 2 // 3))
        y0, x0 = int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1))
        if rng.random() < 0.5:
            region = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:
            cy, cx = y0 + h / 2, x0 + w / 2
            region = ((yy + 0.5 - cy) / (h / 2)) ** 2 + ((xx + 0.5 - cx) / (w / 2)) ** 2 <= 1
        labels[region] = int(rng.integers(1, n_protos))
    noise = rng.uniform(0.5, 1.0) * rng.normal(size=(gh * gw, dim))
    smooth = scipy.ndimage.gaussian_filter(rng.normal(size=(gh, gw, dim)), sigma=(2, 2, 0))
    smooth *= SMOOTH_FIELD / smooth.std()
    return (protos[labels.reshape(-1)] + noise + smooth.reshape(gh * gw, dim)).astype(np.float32)


def voc_affinities(
    count: int, dim: int, seed: int, grid: tuple[int, int] = VOC_GRID
) -> tuple[torch.Tensor, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    keys = np.stack([synthetic_keys(rng, grid, dim) for _ in range(count)])
    return key_affinity(torch.from_numpy(keys)), grid


# ---------------------------------------------------------------------------------------- solvers

def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eigh_float32(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU solver before the subspace one: batched float32 ``torch.linalg.eigh`` of L_sym."""
    lap, inv_sqrt = normalized_laplacian(w.float())
    values, vectors = torch.linalg.eigh(lap)
    vectors = torch.nn.functional.normalize(inv_sqrt.unsqueeze(-1) * vectors[..., :k], dim=-2)
    return values[..., :k].clamp_min(0.0), fix_signs(vectors)


def time_solver(solve, batch: torch.Tensor, k: int, device: torch.device):
    """(values, vectors on the CPU, seconds) of one ``solve(batch, k)`` call; the host-to-device
    copy is outside the timed span, the result's copy back inside it."""
    batch = batch.to(device)
    synchronise(device)
    begin = time.perf_counter()
    values, vectors = solve(batch, k)
    values, vectors = values.cpu(), vectors.cpu()
    return values, vectors, time.perf_counter() - begin


def reference_one(w: np.ndarray, k: int):
    """Deep Spectral Methods' solve of one image; returns (values K, vectors N×K) ascending with
    unit-norm columns and fixed signs."""
    d = w.sum(1)
    lap = scipy.sparse.csr_matrix(np.diag(d) - w)
    values, vectors = scipy.sparse.linalg.eigsh(lap, k=k, sigma=0, which="LM", M=scipy.sparse.diags(d))
    order = np.argsort(values)
    values, vectors = values[order], vectors[:, order]
    vectors = vectors / np.linalg.norm(vectors, axis=0, keepdims=True)
    vectors = fix_signs(torch.from_numpy(vectors)[None])[0].numpy()
    return values, vectors


def time_reference(w: np.ndarray, k: int):
    """((values, vectors, "") or (None, None, error text), seconds) for one image. Timed: building
    D - W and diag(D), eigsh, sorting and normalising."""
    begin = time.perf_counter()
    try:
        values, vectors = reference_one(w, k)
        out = (values, vectors, "")
    except Exception as exc:  # noqa: BLE001 - any eigsh failure is a counted failure
        out = (None, None, f"{type(exc).__name__}: {str(exc)[:120]}")
    return out, time.perf_counter() - begin


@dataclass
class Solved:
    """One batched solver's results over a set: values, vectors (CPU) and the timed seconds."""
    values: torch.Tensor
    vectors: torch.Tensor
    seconds: float


def solve_all(w: torch.Tensor, args: argparse.Namespace, device: torch.device, solvers: dict):
    """All solvers over all images, interleaved batch by batch so that they see the same load
    from other jobs on a shared machine. One untimed warm-up of each first (imports, LAPACK
    workspace, CUDA context). Returns ({name: Solved} for the batched ``solvers``, reference
    results, reference s)."""
    k, size = args.k, args.batch_size
    matrices = w.numpy().astype(args.ref_dtype)
    for solve in solvers.values():
        time_solver(solve, w[:size], k, device)
    time_reference(matrices[0], k)
    parts = {name: ([], [], 0.0) for name in solvers}
    ref_results, ref_s = [], 0.0
    for start in range(0, w.shape[0], size):
        for name, solve in solvers.items():
            v, u, seconds = time_solver(solve, w[start:start + size], k, device)
            values, vectors, total = parts[name]
            parts[name] = (values + [v], vectors + [u], total + seconds)
        for matrix in matrices[start:start + size]:
            result, seconds = time_reference(matrix, k)
            ref_results.append(result)
            ref_s += seconds
    solved = {name: Solved(torch.cat(v), torch.cat(u), s) for name, (v, u, s) in parts.items()}
    return solved, ref_results, ref_s


# ---------------------------------------------------------------------------------------- truth

def ground_truth(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full spectrum of L_sym = I - D^{-1/2} W D^{-1/2} in float64 from the same float32 W:
    (values ascending, orthonormal eigenvectors u as columns, sqrt of the degrees)."""
    w = w.astype(np.float64)
    sqrt_d = np.sqrt(np.maximum(w.sum(1), MIN_DEGREE))
    lap = np.eye(len(w)) - w / sqrt_d[:, None] / sqrt_d[None, :]
    values, u = scipy.linalg.eigh((lap + lap.T) / 2)
    return values, u, sqrt_d


def cluster_end(true_values: np.ndarray, k: int, gap_tol: float) -> int:
    """m ≥ K: the number of true eigenvalues ≤ λ_{K-1} + gap_tol (a window, not a chain: a dense
    spectrum would otherwise chain through everything)."""
    return max(k, int(np.searchsorted(true_values, true_values[k - 1] + gap_tol, side="right")))


@dataclass
class Check:
    eig_err: float  # max |λ_i - λ_i(true)| over the K pairs
    orth_err: float  # max |UᵀU - I| of the method's vectors mapped to u = D^{1/2} v
    sub_sin: float  # sin of the largest angle between span(U) and the true first-m span
    m: int
    wrong: bool


def check(values: np.ndarray, vectors: np.ndarray, truth, args: argparse.Namespace) -> Check:
    """Compare one method's K pairs (v of the generalised problem) with the ground truth."""
    true_values, true_u, sqrt_d = truth
    k = args.k
    eig_err = float(np.abs(values.astype(np.float64) - true_values[:k]).max())
    u = sqrt_d[:, None] * vectors.astype(np.float64)
    u /= np.linalg.norm(u, axis=0, keepdims=True)
    orth_err = float(np.abs(u.T @ u - np.eye(k)).max())
    m = cluster_end(true_values, k, args.gap_tol)
    q = true_u[:, :m]
    sub_sin = float(np.linalg.norm(u - q @ (q.T @ u), 2))
    wrong = eig_err > args.eig_tol or orth_err > args.subspace_tol or sub_sin > args.subspace_tol
    return Check(eig_err, orth_err, sub_sin, m, wrong)


# ---------------------------------------------------------------------------------------- one set

@dataclass
class SetResult:
    name: str
    images: int
    grid: tuple[int, int]
    ours_s: float
    ref_s: float
    ours_checks: list[Check] = field(default_factory=list)
    ref_checks: list[Check] = field(default_factory=list)
    ref_failures: list[str] = field(default_factory=list)
    aris: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)
    n_segments: list[int] = field(default_factory=list)  # ours, incl. background, compared images
    baselines: dict[str, tuple[float, list[Check]]] = field(default_factory=dict)  # name: (s, checks)


def segments(values, vectors, grid) -> np.ndarray:
    seg = segment_patches(torch.as_tensor(values).float(), torch.as_tensor(vectors).float(), grid,
                          n_segments=None, max_segments=8, background="border", seed=0)
    return seg.numpy().reshape(-1)


def batched_solvers(args: argparse.Namespace, device: torch.device) -> dict:
    """ours, and on a GPU the float32 eigh it replaced (unless --no-eigh)."""
    solvers = {"ours": lambda w, k: smallest_eigenpairs(w, k, solver=args.solver)}
    if device.type != "cpu" and not args.no_eigh:
        solvers["torch.linalg.eigh float32"] = eigh_float32
    return solvers


def evaluate_set(name: str, w: torch.Tensor, grid, args: argparse.Namespace, device) -> SetResult:
    solved, ref_results, ref_s = solve_all(w, args, device, batched_solvers(args, device))
    if args.profile:
        with profiled(args.profile, f"spectral, ours, {name}, batch {args.batch_size}, {device}"):
            time_solver(batched_solvers(args, device)["ours"], w[:args.batch_size], args.k, device)
    ours = solved.pop("ours")
    result = SetResult(name, w.shape[0], grid, ours.seconds, ref_s)
    with threadpool_limits(limits=1):  # untimed checks: one thread whatever --threads says
        verify(result, w, grid, ours.values, ours.vectors, ref_results, args)
        for other, out in solved.items():
            checks = [check(out.values[i].numpy(), out.vectors[i].numpy(), ground_truth(w[i].numpy()), args)
                      for i in range(w.shape[0])]
            result.baselines[other] = (out.seconds, checks)
    return result


def verify(result: SetResult, w, grid, ours_values, ours_vectors, ref_results, args) -> None:
    """Fill ``result`` with both methods' checks and the segment agreement."""
    for index, (ref_values, ref_vectors, error) in enumerate(ref_results):
        truth = ground_truth(w[index].numpy())
        ours_v, ours_u = ours_values[index].numpy(), ours_vectors[index].numpy()
        result.ours_checks.append(check(ours_v, ours_u, truth, args))
        if ref_values is None:
            result.ref_failures.append(error)
            continue
        result.ref_checks.append(check(ref_values, ref_vectors, truth, args))
        ours_seg, ref_seg = segments(ours_v, ours_u, grid), segments(ref_values, ref_vectors, grid)
        result.aris.append(adjusted_rand_score(ref_seg, ours_seg))
        result.identical.append(bool(np.array_equal(ours_seg, ref_seg)))
        result.n_segments.append(len(np.unique(ours_seg)))


# ---------------------------------------------------------------------------------------- report

def load_text(load: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


def summary_row(r: SetResult) -> str:
    ours_ms, ref_ms = 1000 * r.ours_s / r.images, 1000 * r.ref_s / r.images
    ours_wrong = sum(c.wrong for c in r.ours_checks)
    ref_wrong = sum(c.wrong for c in r.ref_checks)
    ari = f"{np.mean(r.aris):.4f}" if r.aris else "n/a"
    same = f"{np.mean(r.identical):.3f}" if r.identical else "n/a"
    counts = f"{min(r.n_segments)}–{max(r.n_segments)}" if r.n_segments else "n/a"
    n = r.grid[0] * r.grid[1]
    return (f"| {r.name} | {r.images} | {r.grid[0]}×{r.grid[1]} = {n} | {ours_ms:.1f} | {ref_ms:.1f} "
            f"| {ref_ms / ours_ms:.2f}× | {ours_wrong} | {ref_wrong} | {len(r.ref_failures)} "
            f"| {ari} | {same} | {counts} |")


def detail_row(r: SetResult, who: str, checks: list[Check]) -> str:
    if not checks:
        return f"| {r.name} | {who} | 0 | n/a | n/a | n/a | n/a | n/a |"
    eig = max(c.eig_err for c in checks)
    orth = max(c.orth_err for c in checks)
    sub = max(c.sub_sin for c in checks)
    ms = [c.m for c in checks]
    return (f"| {r.name} | {who} | {len(checks)} | {eig:.1e} | {orth:.1e} | {sub:.1e} "
            f"| {min(ms)}–{max(ms)} (mean {np.mean(ms):.1f}) | {sum(c.wrong for c in checks)} |")


def baseline_rows(r: SetResult) -> list[str]:
    """ours and the other batched solvers on the device: time and wrong count side by side."""
    rows = [("ours", r.ours_s, r.ours_checks)] + [(name, s, c) for name, (s, c) in r.baselines.items()]
    return [f"| {r.name} | {name} | {1000 * s / r.images:.2f} | {r.images / s:.0f} | {r.ours_s and s / r.ours_s:.2f}× "
            f"| {sum(c.wrong for c in checks)} |" for name, s, checks in rows]


def report(results: list[SetResult], args, device, load_before, load_after, wall: float) -> str:
    lines = [
        f"Spectral solver: ours (`smallest_eigenpairs`, solver {args.solver}, batch {args.batch_size}, "
        f"subspace block {spectral._block_size(10**6, args.k)} (fewer on graphs of fewer patches), device {device}) vs "
        f"Deep Spectral Methods' per-image `eigsh(D - W, k={args.k}, sigma=0, which='LM', M=D)` "
        f"({args.ref_dtype}, CPU), same float32 W = `key_affinity(keys)`; affinity construction not "
        f"timed on either side. {args.threads} torch/BLAS thread(s).",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, load average (1/5/15 min) "
        f"{load_text(load_before)} before, {load_text(load_after)} after; torch {torch.__version__}, "
        f"scipy {scipy.__version__}, numpy {np.__version__}; whole run {wall:.0f} s.",
        "",
        "| input set | images | patches | ours ms/image | reference ms/image | speed ratio (ref/ours) "
        "| wrong: ours | wrong: reference | reference failures (exceptions) | mean ARI ours vs ref "
        "| identical segments | segments per map |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [summary_row(r) for r in results]
    if any(r.baselines for r in results):
        lines += ["", f"Batched solvers on {device} (same batches, same run):", "",
                  "| input set | solver | ms/image | images/s | time / ours | wrong |", "|---|---|---:|---:|---:|---:|"]
        lines += [row for r in results for row in baseline_rows(r)]
    lines += [
        "",
        f"Wrong = vs dense float64 `eigh(L_sym)`, in L_sym's space (u = D^1/2 v): an eigenvalue off "
        f"by > {args.eig_tol:g}, or max|UᵀU − I| > {args.subspace_tol:g}, or sin(largest principal "
        f"angle) > {args.subspace_tol:g} between span(U) and the true first m eigenvectors, where "
        f"m = number of true eigenvalues ≤ λ_{args.k - 1} + {args.gap_tol:g} (≥ {args.k}; admits a "
        f"cluster straddling the K boundary). ARI / identical over images where the reference "
        f"returned.",
        "",
        "| input set | method | images checked | max eigenvalue error | max orthogonality error "
        "| max subspace sin | m (K + boundary cluster) | wrong |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(detail_row(r, "ours", r.ours_checks))
        lines.append(detail_row(r, "reference", r.ref_checks))
        lines += [detail_row(r, name, checks) for name, (_, checks) in r.baselines.items()]
    failures = [f"{r.name}: {e}" for r in results for e in r.ref_failures]
    if failures:
        lines += ["", "Reference failures:"] + [f"- {text}" for text in sorted(set(failures))[:10]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    spectral.SUBSPACE_BLOCK = args.subspace_block
    load_before = os.getloadavg()
    begin = time.perf_counter()
    results = []
    with threadpool_limits(limits=args.threads):
        if args.demo_images > 0:
            w, grid = demo_affinities(args.demo_images, args.seed)
            results.append(evaluate_set("demo (colour keys, 384×288)", w, grid, args, device))
        if args.voc_images > 0:
            grid = tuple(int(v) for v in args.voc_grid.lower().split("x"))
            w, grid = voc_affinities(args.voc_images, args.dim, args.seed, grid)
            results.append(evaluate_set(f"VOC-size synthetic (dim {args.dim})", w, grid, args, device))
    text = report(results, args, device, load_before, os.getloadavg(), time.perf_counter() - begin)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
