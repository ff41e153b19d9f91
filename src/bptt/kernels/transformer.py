"""The Transformer's element-wise and row-wise passes, compiled: exact GELU, LayerNorm, attention softmax;
and a language model's whole generation step.

Shape legend: M rows (positions × batch), n numbers per normalised row, B stacked score
matrices (batch × heads), L query rows, S key columns.

Each public function does in one or two compiled passes over memory what NumPy does in
several whole-array passes, with the formulas of its NumPy reference (named in its
docstring; the tests hold the two equal in float64 and float32).  Each returns None — and
changes nothing — when Numba is missing or the arrays do not suit it; the caller then runs
the NumPy reference.  The LayerNorm's row statistics of float32 data are summed in float64.
"""

from __future__ import annotations

import math

import numpy as np

from bptt.kernels.mathfn import HAVE_NUMBA
from bptt.runtime import policy
from bptt.runtime.wavefront import run_row_slices

__all__ = ["gelu_forward", "relu_backward", "layer_norm_forward", "layer_norm_backward", "softmax_rows", "softmax_rows_backward",
           "lm_step"]

if HAVE_NUMBA:
    from numba import njit

    from bptt.kernels.mathfn import JIT, act_exp_neg, act_normal_cdf, wide_vectors

    # "reassoc" on the row loops: a sum or max over a row may run in vector lanes (only the order of
    # the additions changes); the element-wise loops are written so reassociation has nothing else to do.
    ROWS = dict(JIT, fastmath={"contract", "reassoc"})
    _INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _floats(*arrays):
    """Whether every array is C-contiguous of one float dtype, and Numba is there."""
    dtype = arrays[0].dtype
    return HAVE_NUMBA and dtype in (np.float32, np.float64) and all(
        a.dtype == dtype and a.flags.c_contiguous for a in arrays)


# ============================================================================ GELU
if HAVE_NUMBA:
    @njit(**JIT)
    def _gelu(x, y, dydx):
        """y = x Φ(x),  dy/dx = Φ(x) + x φ(x),  φ(x) = e^{−x²/2}/√(2π), over flat arrays, in x's dtype."""
        wide_vectors()
        t = x.dtype.type
        minus_half, inv_sqrt_2pi = t(-0.5), t(_INV_SQRT_2PI)
        for i in range(x.shape[0]):
            v = x[i]
            cdf = act_normal_cdf(v)
            pdf = act_exp_neg(minus_half * v * v) * inv_sqrt_2pi
            y[i] = v * cdf
            dydx[i] = cdf + v * pdf

    @njit(**JIT)
    def _gelu_value(x, y):
        """y = x Φ(x) alone (no derivative: an evaluation pass), over flat arrays."""
        wide_vectors()
        for i in range(x.shape[0]):
            v = x[i]
            y[i] = v * act_normal_cdf(v)


def gelu_forward(x, need_grad=True):
    """(y, dy/dx) of the exact GELU, y = x Φ(x), as :func:`bptt.nn.feedforward.gelu_reference`;
    x any shape.  One pass where NumPy makes about ten.  Φ for float32 data from
    :func:`bptt.kernels.mathfn.normal_cdf32` (vectorised; libm's erf costs ~9 ns an element),
    for float64 data from libm's erf as in the reference.  ``need_grad`` False: (y, None), the
    same y without φ's exponential (an evaluation pass)."""
    if not _floats(x):
        return None
    y, dydx = np.empty_like(x), (np.empty_like(x) if need_grad else None)
    n = x.shape[-1] if x.ndim else 1
    x2, y2 = x.reshape(-1, n), y.reshape(-1, n)
    d2 = None if dydx is None else dydx.reshape(-1, n)

    def rows(s):
        if d2 is None:
            _gelu_value(x2[s].reshape(-1), y2[s].reshape(-1))
        else:
            _gelu(x2[s].reshape(-1), y2[s].reshape(-1), d2[s].reshape(-1))

    _by_rows(len(x2), n, rows)
    return y, dydx


# ============================================================================ ReLU's backward
if HAVE_NUMBA:
    @njit(**JIT)
    def _relu_backward(dy, y, dx):
        """dx = 0 where y ≤ 0, else dy, over rows (M, n) (torch's threshold_backward at 0: a NaN y passes dy)."""
        wide_vectors()
        zero = dx.dtype.type(0)
        for i in range(dy.shape[0]):
            for j in range(dy.shape[1]):
                dx[i, j] = zero if y[i, j] <= 0 else dy[i, j]


def relu_backward(dy, y, dx):
    """∂L/∂x of y = relu(x) into dx: 0 where y ≤ 0, else dy, as :class:`bptt.nn.feedforward.ReLU`'s
    NumPy fallback ``np.where(y <= 0, 0, dy)`` (1.7 against 18 ms on 3.9 M float32 numbers).
    dy, y, dx (M, n) of one float dtype; returns dx, or None (then nothing is written)."""
    if not (_floats_2d(dy, y, dx) and dy.shape == y.shape == dx.shape):
        return None
    _relu_backward(dy, y, dx)
    return dx


def _floats_2d(*arrays):
    """Whether every array is 2-d of one float dtype with contiguous rows, and Numba is there."""
    dtype = arrays[0].dtype
    return HAVE_NUMBA and dtype in (np.float32, np.float64) and all(
        a.dtype == dtype and a.ndim == 2 and a.strides[1] == a.itemsize for a in arrays)


def _by_rows(M, n, rows):
    """``rows(s)`` over the M rows of n numbers: in slices side by side where BLAS is held to one thread
    (:func:`bptt.runtime.policy.row_slices`; a Transformer layer whose attention runs in tiles), else at once."""
    return run_row_slices(M, n * policy.ELEMENT_MACS, rows)


# ============================================================================ LayerNorm
if HAVE_NUMBA:
    @njit(inline="always", **ROWS)
    def _row_stats(x, eps):
        """(μ, 1/√(σ² + ε)) of one row x (n,): μ = Σ x / n, σ² = Σ (x − μ)² / n, summed in float64."""
        n = x.shape[0]
        s = 0.0
        for j in range(n):
            s += x[j]
        mu = s / n
        q = 0.0
        for j in range(n):
            c = x[j] - mu
            q += c * c
        return mu, 1.0 / math.sqrt(q / n + eps)

    @njit(**ROWS)
    def _layer_norm(x, gamma, beta, eps, y, xhat, rstd):
        """Per row r of x (M, n): μ = Σ x / n, σ² = Σ (x − μ)² / n, rstd = 1/√(σ² + ε),
        x̂ = (x − μ) rstd, y = x̂ γ + β (γ, β empty: y not written; β empty: no β)."""
        wide_vectors()
        M, n = x.shape
        affine, shift = gamma.shape[0] > 0, beta.shape[0] > 0
        for r in range(M):
            xr, hr = x[r], xhat[r]
            mu, rs = _row_stats(xr, eps)
            rstd[r] = rs
            for j in range(n):
                hr[j] = (xr[j] - mu) * rs
            if affine:
                yr = y[r]
                for j in range(n):
                    yr[j] = hr[j] * gamma[j] + (beta[j] if shift else 0.0)

    @njit(**ROWS)
    def _layer_norm_backward(dy, xhat, rstd, gamma, dx, dgamma, dbeta):
        """Per row: g = dy γ (γ empty: g = dy), dx = rstd (g − mean g − x̂ mean(g x̂));
        dγ += Σ_rows dy x̂ and dβ += Σ_rows dy into the float64 (n,) sums (empty: skipped)."""
        wide_vectors()
        M, n = dy.shape
        affine, sums = gamma.shape[0] > 0, dgamma.shape[0] > 0
        for r in range(M):
            dr, hr, xr = dy[r], xhat[r], dx[r]
            a = 0.0
            b = 0.0
            for j in range(n):
                g = np.float64(dr[j]) * gamma[j] if affine else np.float64(dr[j])
                a += g
                b += g * hr[j]
            a /= n
            b /= n
            rs = np.float64(rstd[r])
            for j in range(n):
                g = np.float64(dr[j]) * gamma[j] if affine else np.float64(dr[j])
                xr[j] = rs * (g - a - hr[j] * b)
            if sums:
                for j in range(n):
                    dgamma[j] += np.float64(dr[j]) * hr[j]
                    dbeta[j] += dr[j]


def layer_norm_forward(x2, eps, weight=None, bias=None):
    """LayerNorm over the rows of x2 (M, n): ``(y, x̂, rstd)``, y = x̂ γ + β (None without ``weight``),
    x̂ (M, n), rstd (M, 1), as :func:`bptt.nn.norm.layer_norm_forward` and the affine step of
    ``LayerNorm.forward``.  Two passes over each row (its statistics; x̂ and y) where NumPy makes
    about nine over the array; the sums in float64."""
    if not _floats(x2) or (weight is not None and not _floats(x2, weight)) or (
            bias is not None and not _floats(x2, bias)):
        return None
    M, n = x2.shape
    xhat, rstd = np.empty_like(x2), np.empty((M, 1), x2.dtype)
    y = np.empty_like(x2) if weight is not None else x2[:0]
    empty = x2[0, :0] if M else np.empty(0, x2.dtype)
    gamma, beta, r = empty if weight is None else weight.reshape(-1), empty if bias is None else bias.reshape(-1), \
        rstd.reshape(-1)
    _by_rows(M, n, lambda s: _layer_norm(x2[s], gamma, beta, float(eps), y[s], xhat[s], r[s]))
    return (y if weight is not None else None), xhat, rstd


def layer_norm_backward(dy2, xhat, rstd, weight=None, dweight=None, dbias=None):
    """∂L/∂y (M, n) → ∂L/∂x (M, n) for y = x̂ γ + β, as :func:`bptt.nn.norm.layer_norm_backward` after
    g = dy γ; adds Σ_rows dy x̂ to ``dweight`` and Σ_rows dy to ``dbias`` when they are given (both or
    neither; ``dbias`` may be None alone when there is no β).  One read of each row for its two sums,
    one to write dx."""
    if not _floats(dy2, xhat, rstd) or (weight is not None and not _floats(dy2, weight)):
        return None
    M, n = dy2.shape
    dx = np.empty_like(dy2)
    gamma, r = np.empty(0, dy2.dtype) if weight is None else weight.reshape(-1), rstd.reshape(-1)

    def rows(s):  # each slice's own float64 sums, added below in slice order (a fixed order)
        f64 = np.zeros(n) if dweight is not None else np.empty(0)
        db64 = np.zeros(n) if dweight is not None else np.empty(0)
        _layer_norm_backward(dy2[s], xhat[s], r[s], gamma, dx[s], f64, db64)
        return f64, db64

    for f64, db64 in _by_rows(M, n, rows):
        if dweight is not None:
            dweight += f64.reshape(dweight.shape).astype(dweight.dtype)
            if dbias is not None:
                dbias += db64.reshape(dbias.shape).astype(dbias.dtype)
    return dx


# ============================================================================ attention softmax
if HAVE_NUMBA:
    _LANES = 16  # one AVX-512 register of float32

    @njit(inline="always", **ROWS)
    def _row_max(row, k):
        """max(row[:k]) (k ≥ 1) in _LANES running maxima, merged at the end.

        LLVM does not vectorise a max carried in one scalar (``m = max(m, row[j])``, 0.8 ns an
        element): its reassociation covers sums, not compare-and-select.  Sixteen independent
        maxima are sixteen lanes of one register (0.24 ns an element).  The order of
        comparisons changes nothing: the maximum is the same number."""
        lanes = np.empty(_LANES, row.dtype)
        for lane in range(_LANES):
            lanes[lane] = row[0]
        j = 0
        while j + _LANES <= k:
            for lane in range(_LANES):
                v = row[j + lane]
                lanes[lane] = v if v > lanes[lane] else lanes[lane]
            j += _LANES
        m = lanes[0]
        for lane in range(1, _LANES):
            m = max(m, lanes[lane])
        for jj in range(j, k):
            m = max(m, row[jj])
        return m

    @njit(**ROWS)
    def _softmax(s, scale, causal, dead, floor):
        """In place over s (B, L, S): row i of matrix b becomes softmax_j(scale · s[b, i, j]) over the
        keys j it may see (j ≤ i when ``causal``, else all); the others become 0.  A row whose
        every score is −∞ becomes ``dead`` (0 or NaN) throughout.  e^d for d below ``floor``
        (where the vectorised exp stops: e^floor < 2e-38) is 0, so a −∞ score gets exactly 0."""
        wide_vectors()
        B, L, S = s.shape
        zero, one = s.dtype.type(0), s.dtype.type(1)
        for b in range(B):
            for i in range(L):
                row = s[b, i]
                k = min(i + 1, S) if causal else S
                m = _row_max(row, k) * scale  # scale > 0: the max of the scaled row
                if m == -np.inf:
                    for j in range(S):
                        row[j] = dead
                    continue
                tot = zero
                for j in range(k):
                    d = row[j] * scale - m
                    e = act_exp_neg(d) if d >= floor else zero
                    row[j] = e
                    tot += e
                inv = one / tot
                for j in range(k):
                    row[j] *= inv
                for j in range(k, S):
                    row[j] = 0

    @njit(**ROWS)
    def _softmax_backward(a, da, scale, causal):
        """In place over da (B, L, S): ds = scale · a ⊙ (da − Σ_j a da), row by row; the keys a row
        may not see (j > i when ``causal``) get 0."""
        wide_vectors()
        B, L, S = a.shape
        for b in range(B):
            for i in range(L):
                ar, dr = a[b, i], da[b, i]
                k = min(i + 1, S) if causal else S
                dot = a.dtype.type(0)
                for j in range(k):
                    dot += ar[j] * dr[j]
                for j in range(k):
                    dr[j] = ar[j] * (dr[j] - dot) * scale
                for j in range(k, S):
                    dr[j] = 0


def softmax_rows(s, scale, causal=False, dead_rows_nan=False):
    """softmax over the last axis of scale · s, in place: s (..., L, S) C-contiguous becomes the
    attention weights a, as :func:`bptt.nn.multihead.softmax_rows` does for s · scale.  ``causal``:
    row i sees keys j ≤ i only (the others get weight 0, whatever s holds there).  A row whose
    every score is −∞ becomes zeros, or NaN with ``dead_rows_nan``.  Returns s, or None.

    Three passes over each row while it sits in cache (max; exponentials and their sum; scale)
    where NumPy makes six over the whole (…, L, S) array, and a causal row stops at its diagonal."""
    if not _floats(s) or s.ndim < 2 or s.shape[-1] == 0 or s.size == 0:
        return None
    t = s.dtype.type
    if scale < 0:  # the kernel's row maximum is taken before scaling, which needs scale > 0
        s *= t(scale)
        scale = 1.0
    floor = t(-87.0 if s.dtype == np.float32 else -700.0)  # where exp_neg32 / exp_neg clamp
    _softmax(s.reshape(-1, *s.shape[-2:]), t(scale), bool(causal), t(np.nan if dead_rows_nan else 0.0), floor)
    return s


def softmax_rows_backward(a, da, scale, causal=False):
    """∂L/∂a → ∂L/∂s for a = softmax(scale · s), in place in da: ds = scale · a ⊙ (da − Σ_S a ⊙ da),
    as :func:`bptt.nn.multihead.softmax_rows_backward`; ``causal`` as in :func:`softmax_rows`
    (those slots get 0).  a, da (..., L, S) C-contiguous.  Returns da, or None."""
    if not _floats(a, da) or a.shape != da.shape or a.ndim < 2 or a.size == 0:
        return None
    shape = (-1, *a.shape[-2:])
    _softmax_backward(a.reshape(shape), da.reshape(shape), a.dtype.type(scale), bool(causal))
    return da


# ============================================================================ a language model's generation step
if HAVE_NUMBA:
    @njit(inline="always", **ROWS)
    def _norm_row(x, gamma, beta, eps, out):
        """out = (x − μ) / √(σ² + ε) γ + β over one row (statistics summed in float64), as _layer_norm."""
        mu, rs = _row_stats(x, eps)
        for j in range(x.shape[0]):
            out[j] = (x[j] - mu) * rs * gamma[j] + beta[j]

    @njit(inline="always", **ROWS)
    def _affine_row(W, b, x, out):
        """out = W x + b for one row x (D,), W (K, D): K dot products over contiguous rows of W."""
        K, D = W.shape
        for i in range(K):
            w = W[i]
            acc = w.dtype.type(0)
            for j in range(D):
                acc += w[j] * x[j]
            out[i] = acc + b[i]

    @njit(**ROWS)
    def _lm_step(x, t, ln1w, ln1b, Wqkv, bqkv, Wo, bo, ln2w, ln2b, W1, b1, W2, b2, Kc, Vc, lnfw, lnfb, Wd, bd,
                 eps, logits):
        """One position t of a pre-norm GELU decoder stack for each row n of x (N, E), in place in x:

            z = LN₁(x);  [q k v] = W_qkv z + b;  K[t] = k, V[t] = v              per layer l
            per head: a = softmax(q · K[0..t]ᵀ / √d),  o = a V[0..t]
            x += W_o o + b_o;  x += W₂ GELU(W₁ LN₂(x) + b₁) + b₂
            logits[n] = W_dec LN_f(x) + b_dec

        Weights stacked over the L layers (``Wqkv`` (L, 3E, E), ...); the caches Kc, Vc (L, N, h, C, d)."""
        wide_vectors()
        N, E = x.shape
        L, F, h = Wqkv.shape[0], W1.shape[1], Kc.shape[2]
        d = E // h
        dt = x.dtype.type
        scale = dt(1.0 / math.sqrt(d))
        z, o, r = np.empty(E, x.dtype), np.empty(E, x.dtype), np.empty(E, x.dtype)
        qkv, f, s = np.empty(3 * E, x.dtype), np.empty(F, x.dtype), np.empty(t + 1, x.dtype)
        for n in range(N):
            xn = x[n]
            for l in range(L):
                _norm_row(xn, ln1w[l], ln1b[l], eps, z)
                _affine_row(Wqkv[l], bqkv[l], z, qkv)
                for j in range(h):
                    K, V = Kc[l, n, j], Vc[l, n, j]  # (C, d)
                    for c in range(d):
                        K[t, c] = qkv[E + j * d + c]
                        V[t, c] = qkv[2 * E + j * d + c]
                    m = dt(-np.inf)
                    for i in range(t + 1):
                        acc = dt(0)
                        for c in range(d):
                            acc += qkv[j * d + c] * K[i, c]
                        s[i] = acc * scale
                        m = max(m, s[i])
                    tot = dt(0)
                    for i in range(t + 1):
                        s[i] = act_exp_neg(s[i] - m)
                        tot += s[i]
                    inv = dt(1) / tot
                    for c in range(d):
                        o[j * d + c] = 0
                    for i in range(t + 1):
                        w = s[i] * inv
                        for c in range(d):
                            o[j * d + c] += w * V[i, c]
                _affine_row(Wo[l], bo[l], o, r)
                for c in range(E):
                    xn[c] += r[c]
                _norm_row(xn, ln2w[l], ln2b[l], eps, z)
                _affine_row(W1[l], b1[l], z, f)
                for c in range(F):
                    f[c] = f[c] * act_normal_cdf(f[c])  # exact GELU, x Φ(x)
                _affine_row(W2[l], b2[l], f, r)
                for c in range(E):
                    xn[c] += r[c]
            _norm_row(xn, lnfw, lnfb, eps, z)
            _affine_row(Wd, bd, z, logits[n])


def lm_step(x, t, weights, Kc, Vc, eps):
    """The logits (N, V) of one generation step of :class:`bptt.lm.transformer.TransformerLM` at position t,
    compiled: x (N, E) the token + position embeddings (overwritten), ``weights`` the tuple of
    :meth:`TransformerLM._step_weights` (stacked over the layers), Kc, Vc (L, N, h, C, d) the caches (position
    t written here).  The equations of ``TransformerLM._step_numpy``, its reference; None without Numba."""
    if not HAVE_NUMBA:
        return None
    logits = np.empty((x.shape[0], weights[-2].shape[0]), x.dtype)
    _lm_step(x, t, *weights[:12], Kc, Vc, *weights[12:], float(eps), logits)
    return logits
