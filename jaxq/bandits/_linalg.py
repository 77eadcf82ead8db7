"""Small dense linear algebra for the Gram matrices: Cholesky inverses, rank-one updates, log-dets.

The bandit algorithms keep ``A^{-1}`` and ``log det A`` for ``A = λI + Σ x xᵀ`` (and the pooled
``A + G_0``). Between exact refreshes they are advanced by Sherman-Morrison and the matrix determinant
lemma, O(d²) per sample; every ``refresh_every`` rounds they are recomputed from ``A`` itself by a
Cholesky factorisation, so rounding errors of the rank-one updates cannot accumulate over the horizon.

The factorisations (Cholesky, triangular inverse, Gram-Schmidt, Jacobi eigenvalues) are written as short
loops of plain jnp ops instead of calling LAPACK. Batched LAPACK calls on
XLA:CPU parallelise over the batch on the intra-op thread pool and block a pool thread while they wait;
two such calls scheduled concurrently on a 2-thread pool deadlocked (jaxlib 0.10.2: both pool threads
asleep in ``ParallelBatchMap``, the full-size run hung for good). For d = 10 these loops are as fast
and cannot block.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from ._types import Matrix, Scalar, Vector


def cholesky(a: Matrix) -> Matrix:
    """Lower Cholesky factor of a symmetric positive-definite matrix, one column per loop step."""
    d = a.shape[-1]
    idx = jnp.arange(d)

    def column(j, chol):
        r = chol[j]  # L[j, :j], zeros beyond: columns >= j are not filled yet
        ljj = jnp.sqrt(a[j, j] - jnp.dot(r, r))
        col = (a[:, j] - chol @ r) / ljj
        return chol.at[:, j].set(jnp.where(idx > j, col, jnp.where(idx == j, ljj, 0.0)))

    return jax.lax.fori_loop(0, d, column, jnp.zeros_like(a))


def lower_inverse(chol: Matrix) -> Matrix:
    """Inverse of a lower-triangular matrix by forward substitution, one row per loop step."""
    d = chol.shape[-1]
    eye = jnp.eye(d, dtype=chol.dtype)

    def row(i, inv):
        # Rows >= i of inv are still zero, so chol[i] @ inv = Σ_{k<i} L[i,k] inv[k].
        return inv.at[i].set((eye[i] - chol[i] @ inv) / chol[i, i])

    return jax.lax.fori_loop(0, d, row, jnp.zeros_like(chol))


def inv_logdet(a: Matrix) -> tuple[Matrix, Scalar]:
    """Exact inverse and log-determinant of a symmetric positive-definite matrix (Cholesky)."""
    chol = cholesky(a)
    linv = lower_inverse(chol)
    inv = linv.T @ linv
    # Symmetrise: the rank-one updates below assume a symmetric inverse and preserve symmetry only if
    # they start from one.
    inv = 0.5 * (inv + inv.T)
    return inv, 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))


def rank_one_update(inv: Matrix, logdet: Scalar, x: Vector) -> tuple[Matrix, Scalar]:
    """``(A + x xᵀ)^{-1}`` and ``log det(A + x xᵀ)`` from ``A^{-1}`` and ``log det A``."""
    ax = inv @ x
    q = jnp.dot(x, ax)
    # Symmetric form u uᵀ / (1 + q): keeps the inverse exactly symmetric in floating point.
    inv = inv - jnp.outer(ax, ax) / (1.0 + q)
    return inv, logdet + jnp.log1p(q)


def quad_norms(xs: Matrix, a: Matrix) -> Vector:
    """Row-wise ``||x||_A = sqrt(xᵀ A x)`` for the rows of ``xs``, clipped at 0 against rounding."""
    return jnp.sqrt(jnp.maximum(jnp.sum((xs @ a) * xs, axis=-1), 0.0))


def orthonormalise(g: Matrix) -> Matrix:
    """Q of the QR factorisation with a positive diagonal of R (Gram-Schmidt, with a second pass for
    orthogonality to working precision). For Gaussian ``g`` the result is Haar-distributed."""
    d = g.shape[-1]

    def column(j, q):
        v = g[:, j]
        for _ in range(2):  # columns >= j of q are still zero
            v = v - q @ (q.T @ v)
        return q.at[:, j].set(v / jnp.linalg.norm(v))

    return jax.lax.fori_loop(0, d, column, jnp.zeros_like(g))


def symmetric_eigh(a: Matrix, sweeps: int = 12) -> tuple[Vector, Matrix]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of a symmetric matrix by cyclic
    Jacobi rotations. Quadratically convergent: 12 sweeps reach working precision for d <= 20."""
    d = a.shape[-1]
    pairs = jnp.asarray(list(itertools.combinations(range(d), 2)), jnp.int32).reshape(-1, 2)
    eye = jnp.eye(d, dtype=a.dtype)
    idx = jnp.arange(d)

    def rotate(carry, pq):
        a, v = carry
        p, q = pq[0], pq[1]
        apq, app, aqq = a[p, q], a[p, p], a[q, q]
        scale = jnp.maximum(jnp.abs(app) + jnp.abs(aqq), jnp.finfo(a.dtype).tiny)
        # Skip negligible off-diagonals: atan2(0, negative) would swap the pair for nothing.
        theta = jnp.where(jnp.abs(apq) > jnp.finfo(a.dtype).eps * 1e-3 * scale,
                          0.5 * jnp.arctan2(2.0 * apq, aqq - app), 0.0)
        c, s = jnp.cos(theta), jnp.sin(theta)
        rot = (eye + (c - 1.0) * (jnp.outer(idx == p, idx == p) + jnp.outer(idx == q, idx == q))
               + s * jnp.outer(idx == p, idx == q) - s * jnp.outer(idx == q, idx == p))
        a = rot.T @ a @ rot
        return (0.5 * (a + a.T), v @ rot), None

    def sweep(carry, _):
        return jax.lax.scan(rotate, carry, pairs)[0], None

    (a, v), _ = jax.lax.scan(sweep, (a, eye), None, length=sweeps)
    evals = jnp.diagonal(a)
    order = jnp.argsort(evals)
    return evals[order], v[:, order]
