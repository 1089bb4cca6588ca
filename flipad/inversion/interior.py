"""The anchored lasso by a log-barrier interior-point method with exact Newton steps.

Same problem as :func:`flipad.inversion.lasso.solve_lasso`, per sample,

    d* = argmin_d 0.5 ||r - A d||^2 + alpha ||d||_1,

written as the barrier problem of Kim, Koh, Lustig, Boyd and Gorinevsky (2007, "An
interior-point method for large-scale l1-regularized least squares"): bounds ``|d| <= u``,
``t (||A d - r||^2 + 2 alpha sum(u)) - sum(log(u + d) + log(u - d))`` minimised by Newton's method
with a backtracking line search while ``t`` grows. Each sample stops when its certified relative
duality gap (the residual scaled into the dual feasible set, the same certificate every solver
reports) falls below ``gap_tol``.

A Newton step needs ``(2 A^T A + D)^-1`` with ``D`` diagonal over the ``n`` unknowns. By the
Woodbury identity that is one system in the ``m`` outputs, ``(I/2 + A D^-1 A^T) v = A D^-1 g``.
For a convolution each output interacts only with the outputs within a kernel's reach, so the
matrix is banded once the outputs are ordered well (natural order or reverse Cuthill-McKee,
whichever is narrower): it is assembled from the products of each column's non-zeros and
factorised exactly by LAPACK's banded Cholesky. About 20-25 Newton steps reach a gap of 1e-4
where first-order methods need thousands of iterations (``python -m bench inversion_speed``).

The method runs on the CPU in float64. :func:`output_system` returns ``None`` for layers without
an explicit adjoint or whose columns are too many to probe, and says whether the method pays (a
Newton step costs at most ``NEWTON_STEP_BUDGET`` FISTA iterations; a 64x64 RGB output's band is
too wide for that).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee
from threadpoolctl import threadpool_limits

from .layers import LinearMap

__all__ = ["OutputSystem", "output_system", "barrier_lasso", "blocks"]

# A Newton step may cost at most this many FISTA iterations (2 nnz(A) multiply-adds each):
# ~25 steps x 100 = 2,500 iterations, fewer than FISTA needs for a gap of 1e-4 (3,000 left a
# median of 4.9e-4 on the 32x32 DCGAN of `python -m bench inversion_speed`, where one step costs ~50).
NEWTON_STEP_BUDGET = 100
MAX_PROBE_ENTRIES = 50_000_000  # n * m: A's columns are probed densely, in chunks
PROBE_CHUNK_BYTES = 64 * 2**20
BAND_BUFFER_BYTES = 256 * 2**20  # the samples of one block (their Newton-step vectors)
ASSEMBLY_GROUP = 8
LINE_SEARCH_STEPS = 60
BARRIER_GROWTH = 2.0  # the factor on t of Kim et al.
ARMIJO = 0.01
BOUNDARY_FRACTION = 0.99  # the line search starts at this fraction of the step to the boundary

_SYSTEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class OutputSystem:
    """The band of ``A diag(w) A^T`` as a linear function of ``w``, for one layer.

    ``order`` permutes the outputs to make the band narrow; ``pairs`` maps ``w`` (n) to the
    upper band (``bandwidth + 1`` rows of ``m``, LAPACK's layout) flattened. ``pays``: a Newton
    step costs at most ``NEWTON_STEP_BUDGET`` FISTA iterations (what ``method="auto"`` asks).
    """

    order: np.ndarray
    bandwidth: int
    pairs: scipy.sparse.csr_matrix
    num_inputs: int
    num_outputs: int
    pays: bool

    def samples_per_block(self) -> int:
        """Samples whose bands fit ``BAND_BUFFER_BYTES`` together."""
        return max(1, BAND_BUFFER_BYTES // (8 * (self.bandwidth + 1) * self.num_outputs))

    def solve(self, weights: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """Per sample ``k``: ``(I/2 + A diag(weights[k]) A^T)^-1 rhs[k]`` (arrays (B, n) and (B, m))."""
        out = np.empty_like(rhs)
        # one BLAS thread: a band this narrow gains nothing from more, and spinning BLAS
        # threads slow the solve ~7x when other work holds the cores (measured)
        with threadpool_limits(1, user_api="blas"):
            self._solve_groups(weights, rhs, out)
        return out

    def _solve_groups(self, weights: np.ndarray, rhs: np.ndarray, out: np.ndarray) -> None:
        u, m = self.bandwidth, self.num_outputs
        for start in range(0, len(rhs), ASSEMBLY_GROUP):
            # a few samples per sparse product: the index is read once, the transpose stays in cache
            bands = np.ascontiguousarray((self.pairs @ weights[start : start + ASSEMBLY_GROUP].T).T)
            for k, flat in enumerate(bands, start):
                band = flat.reshape(u + 1, m)
                band[u] += 0.5
                out[k, self.order] = scipy.linalg.solveh_banded(
                    band, rhs[k, self.order], overwrite_ab=True, overwrite_b=False, check_finite=False
                )


def output_system(op: LinearMap) -> OutputSystem | None:
    """The banded output system of ``op`` (cached per layer), or None where it cannot be built
    (no explicit adjoint, or too many columns to probe)."""
    if op not in _SYSTEMS:
        _SYSTEMS[op] = _build_system(op)
    return _SYSTEMS[op]


def _columns(op: LinearMap) -> scipy.sparse.csr_matrix:
    """``A^T`` as a sparse (n, m) matrix: row j holds column j of ``A``, probed with unit inputs."""
    n, m = op.num_inputs, op.num_outputs
    chunk = max(1, PROBE_CHUNK_BYTES // (8 * (n + m)))
    rows = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            basis = torch.zeros(stop - start, n, dtype=torch.float64)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            cols = op.forward(basis.view(-1, *op.input_shape)).reshape(stop - start, m)
            rows.append(scipy.sparse.csr_matrix(cols.numpy()))
    return scipy.sparse.vstack(rows, format="csr")


def _narrow_order(columns: scipy.sparse.csr_matrix) -> tuple[np.ndarray, int]:
    """The output order (natural or reverse Cuthill-McKee) with the narrower band of ``A A^T``."""
    pattern = (columns.T @ columns).tocsr()
    pattern.data[:] = 1
    coo = pattern.tocoo()
    best: tuple[np.ndarray, int] | None = None
    for order in (np.arange(pattern.shape[0]), reverse_cuthill_mckee(pattern, symmetric_mode=True)):
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        width = int(np.abs(position[coo.row] - position[coo.col]).max(initial=0))
        if best is None or width < best[1]:
            best = (np.asarray(order, dtype=np.int64), width)
    return best


def _build_system(op: LinearMap) -> OutputSystem | None:
    n, m = op.num_inputs, op.num_outputs
    if not op._explicit or n * m > MAX_PROBE_ENTRIES:
        return None
    columns = _columns(op)
    per_column = np.diff(columns.indptr)
    num_pairs = int((per_column * (per_column + 1) // 2).sum())
    order, width = _narrow_order(columns)
    pays = num_pairs + m * (width + 1) ** 2 <= NEWTON_STEP_BUDGET * 2 * columns.nnz
    position = np.empty(m, dtype=np.int64)
    position[order] = np.arange(m)
    rows, cols, vals = [], [], []
    for size in np.unique(per_column):  # columns with the same number of non-zeros, vectorised
        if size == 0:
            continue
        js = np.nonzero(per_column == size)[0]
        starts = columns.indptr[js][:, None] + np.arange(size)
        pos, val = position[columns.indices[starts]], columns.data[starts]
        first, second = np.triu_indices(size)
        p, q = pos[:, first], pos[:, second]
        low, high = np.minimum(p, q), np.maximum(p, q)
        rows.append(((width + low - high) * m + high).ravel())
        cols.append(np.repeat(js, len(first)))
        vals.append((val[:, first] * val[:, second]).ravel())
    pairs = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=((width + 1) * m, n)
    )
    return OutputSystem(order, width, pairs, n, m, pays)


def barrier_lasso(
    op: LinearMap, system: OutputSystem, target: np.ndarray, alpha: float, gap_tol: float, max_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Solve the lasso for each row of ``target`` (float64, (B, m)).

    Returns ``d`` (B, n), Newton steps, converged flags and, per sample, a lower bound on the
    optimal value of ``0.5 ||r - A d||^2 + alpha ||d||_1`` (the best dual value met).
    """
    n, m = system.num_inputs, system.num_outputs
    lam = 2.0 * alpha  # the barrier problem's scale: ||A d - r||^2 + 2 alpha ||d||_1
    size = len(target)

    def forward(x: np.ndarray) -> np.ndarray:
        return op.forward(torch.from_numpy(x).view(-1, *op.input_shape)).reshape(len(x), m).numpy()

    def adjoint(y: np.ndarray) -> np.ndarray:
        return op.adjoint(torch.from_numpy(y).view(-1, *op.output_shape)).reshape(len(y), n).numpy()

    x, bound = np.zeros((size, n)), np.ones((size, n))
    t = np.full(size, min(max(1.0, 1.0 / lam), 2.0 * n / 1e-3))
    dual_best = np.full(size, -np.inf)
    gap = np.full(size, np.inf)
    steps = np.zeros(size, dtype=np.int64)
    converged = np.zeros(size, dtype=bool)
    active = np.ones(size, dtype=bool)
    step_taken = np.ones(size)
    residual = forward(x) - target  # A d - r
    with np.errstate(divide="ignore", invalid="ignore"):
        while True:
            idx = np.nonzero(active)[0]
            z, xa, ua, ya = residual[idx], x[idx], bound[idx], target[idx]
            grad_data = 2.0 * adjoint(z)
            correlation = np.abs(grad_data).max(1)
            nu = 2.0 * z * np.minimum(1.0, lam / np.maximum(correlation, 1e-300))[:, None]
            primal = (z * z).sum(1) + lam * np.abs(xa).sum(1)
            dual_best[idx] = np.maximum(dual_best[idx], -0.25 * (nu * nu).sum(1) - (nu * ya).sum(1))
            gap[idx] = (primal - dual_best[idx]) / np.maximum(primal, 1e-300)
            done = gap[idx] <= gap_tol
            converged[idx[done]] = True
            active[idx[done]] = False
            active[idx[steps[idx] >= max_steps]] = False
            if not active.any():
                break
            keep = active[idx]
            idx, z, xa, ua, grad_data = idx[keep], z[keep], xa[keep], ua[keep], grad_data[keep]
            primal = primal[keep]
            absolute_gap = gap[idx] * np.maximum(primal, 1e-300)
            # Kim et al.'s update: t grows towards 2n mu / gap after a step that was not cut short
            grown = np.maximum(np.minimum(2.0 * n * BARRIER_GROWTH / absolute_gap, BARRIER_GROWTH * t[idx]), t[idx])
            t[idx] = np.where(step_taken[idx] >= 0.5, grown, t[idx])
            dx, du, g_x, g_u = _newton_direction(system, forward, adjoint, grad_data, xa, ua, t[idx], lam)
            a_dx = forward(dx)
            phi = primal - lam * np.abs(xa).sum(1) + _bound_terms(xa, ua, t[idx], lam)
            slope = (g_x * dx).sum(1) + (g_u * du).sum(1)
            s = np.minimum(1.0, BOUNDARY_FRACTION * np.minimum(_max_step(ua + xa, du + dx), _max_step(ua - xa, du - dx)))
            pending = np.ones(len(idx), dtype=bool)
            for _ in range(LINE_SEARCH_STEPS):  # backtracking (Armijo) on the barrier objective
                new_x, new_u, new_z = xa + s[:, None] * dx, ua + s[:, None] * du, z + s[:, None] * a_dx
                feasible = ((new_u + new_x) > 0).all(1) & ((new_u - new_x) > 0).all(1)
                new_phi = (new_z * new_z).sum(1) + _bound_terms(new_x, new_u, t[idx], lam)
                accept = pending & feasible & (new_phi - phi <= ARMIJO * s * slope)
                rows = idx[accept]
                x[rows], bound[rows], residual[rows] = new_x[accept], new_u[accept], new_z[accept]
                pending &= ~accept
                if not pending.any():
                    break
                s = np.where(pending, s / 2, s)
            steps[idx] += 1
            step_taken[idx] = s
            active[idx[pending]] = False  # no descent left in float64: stop, not converged
    return x, steps, converged, dual_best / 2.0


def _bound_terms(x: np.ndarray, u: np.ndarray, t: np.ndarray, lam: float) -> np.ndarray:
    """Per row, ``lam sum(u) - sum(log(u + x) + log(u - x)) / t``: the barrier objective but the data term."""
    return lam * u.sum(1) - (np.log(u + x) + np.log(u - x)).sum(1) / t


def _newton_direction(system: OutputSystem, forward, adjoint, grad_data: np.ndarray, x: np.ndarray, u: np.ndarray,
                      t: np.ndarray, lam: float) -> tuple[np.ndarray, ...]:
    """The Newton step ``(dx, du)`` of the barrier objective and its gradient ``(g_x, g_u)``.

    The Hessian is ``[[2 A^T A + D1, D2], [D2, D1]]`` with diagonal ``D1, D2``; eliminating ``du``
    leaves ``(2 A^T A + D) dx = b`` with ``D = D1 - D2^2 / D1``, solved through the output system
    (Woodbury: ``D^-1 - D^-1 A^T (I/2 + A D^-1 A^T)^-1 A D^-1``).
    """
    ti = t[:, None]
    q1, q2 = 1.0 / (u + x), 1.0 / (u - x)
    d1, d2 = (q1 * q1 + q2 * q2) / ti, (q1 * q1 - q2 * q2) / ti
    g_x = grad_data - (q1 - q2) / ti
    g_u = lam - (q1 + q2) / ti
    weights = ti * (u * u + x * x) / 2.0  # D^-1 = (d1 - d2^2 / d1)^-1, written without cancellation
    rhs = (-g_x + d2 * g_u / d1) * weights
    dx = rhs - weights * adjoint(system.solve(weights, forward(rhs)))
    du = -(g_u + d2 * dx) / d1
    return dx, du, g_x, g_u


def _max_step(slack: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Per row, the largest ``s`` keeping ``slack + s direction > 0`` (inf if nothing shrinks)."""
    ratio = np.where(direction < 0, -slack / np.where(direction < 0, direction, -1.0), np.inf)
    return ratio.min(1)


def blocks(count: int, system: OutputSystem) -> list[slice]:
    """Slices of at most :meth:`OutputSystem.samples_per_block` samples."""
    per = system.samples_per_block()
    return [slice(start, min(count, start + per)) for start in range(0, count, per)]

