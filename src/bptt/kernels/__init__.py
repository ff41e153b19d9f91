"""Compiled whole-sequence kernels: the time loop of :mod:`bptt.nn.recurrence`, fused.

Shape legend: T time steps, N batch, H hidden units, G = g·H stacked gate
pre-activations (g = 1 RNN, 4 LSTM, 3 GRU), P the width of h (P = H unless an
LSTM has a projection), D input features, s the step counter (s-th step run).

``sequence_impl(mode, dtype, required)`` returns ``(forward, backward)`` with the
contract of :func:`bptt.nn.recurrence.sequence_forward` /
:func:`bptt.nn.recurrence.sequence_backward`, or None (use the reference loop) when
Numba is missing or fails to compile and ``required`` is False.

How a step is computed
----------------------
Every time step is (1) one matrix product with the recurrent weights and (2) the
element-wise gate maths.  (2) is one Numba loop per step that reads each
pre-activation once and writes the activated gates, the new state and the
output in the same pass, with no temporaries.  Its transcendental functions
are the vectorisable ``_exp_neg`` / ``_tanh`` / ``_sigmoid`` below (a
polynomial exp in float64, accurate to a few ulp), because a call to libm's
``tanh`` per element would cost ~20 ns and dominate the step.

The loop over a range of steps is one compiled function (``_forward_loop`` /
``_backward_loop``, driven by :class:`ForwardRun` / :class:`BackwardRun`, which
run a layer a chunk of steps at a time for :mod:`bptt.runtime.wavefront`).  It does (1)
in one of three ways, chosen by size (``_SMALL_MACS``, ``_ONE_THREAD_MACS``):

* small steps (e.g. N = 1, H = 100): hand loops shaped as ``axpy`` over
  contiguous rows (``out[n, :] += h[n, p] · Wᵀ[p, :]``), which vectorise
  without reordering sums; a BLAS call would cost more than the product.
* larger steps run on one core: register-blocked products (``_panel_times``)
  on weights packed once per sequence into column panels (``pack_panels``).
  The weights are the same for all T steps, so packing them per call, as BLAS
  must, is wasted; a block of the product stays in vector registers for the
  whole sum over k.  x86 with FMA only (``_panel_vectors``).
* steps long enough for several BLAS threads, or any step where the panels are
  not available: NumPy's own BLAS ``cblas_?gemm``, found through threadpoolctl
  and called through ctypes from inside the compiled loop (``_gemm_function``),
  so no Python runs per step and the GIL is not taken.  Where no such symbol is
  found (other NumPy builds), a Python loop calls ``np.matmul`` per step instead.

The gate loops index one view per gate, every loop running from 0: LLVM
vectorised those, but not loops over offset ranges such as ``range(2H, 3H)``,
which ran 2–4× slower.  Three more things keep them vectorised and fast (each
measured, see the comments where they apply): a backward step reads its gate
row from a scratch copy, because it writes dgx over that same row
(``_ALIASED_ROWS``); a loop writes one output row, because LLVM gives up on a
loop that needs more than 8 run-time overlap checks; and the constants have the
array's dtype, because a float64 ``1.0`` turns float32 arithmetic into float64.
Every kernel may contract a·b + c into a fused multiply-add and asks for 512-bit
vectors where the CPU has them (``_wide_vectors``).

States live in (T+1, N, P) arrays ``hs`` (and ``cs`` for the LSTM cell) in time
order: the state entering step t is ``hs[t + rev]`` and the one leaving it is
``hs[t + 1 − rev]`` (rev = 1 for the reverse direction).  So ``h_prev`` — the
(T, N, P) rows of ∂L/∂W_hh that the layer reads — is the contiguous view
``hs[rev : T + rev]`` and is never copied.

Masks (variable lengths), as in :mod:`bptt.nn.recurrence`: a padded step keeps its
state and outputs zero; backwards, the carried gradient passes it unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import NamedTuple

import numpy as np

__all__ = ["sequence_impl", "sequence_forward", "sequence_backward", "ForwardRun", "BackwardRun", "KernelCache",
           "available", "blas_threads", "single_thread_blas", "scatter_add_rows", "softmax_cross_entropy",
           "rmsprop_step", "adam_step"]

try:  # Numba is a dependency, but the reference loop must work without it
    import numba
    from llvmlite import ir as _ir
    from numba import njit, types
    from numba.extending import intrinsic, overload
except Exception:  # pragma: no cover - exercised only without numba
    numba = None

# Below this many multiply-adds per recurrent product, the whole sequence runs in
# one Numba function with hand-written products (no Python or BLAS call per step).
_SMALL_MACS = int(os.environ.get("BPTT_SMALL_MACS", 48_000))

_MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")

# Per-step products below this many multiply-adds run with one BLAS thread.  A
# sequence makes 2T small BLAS calls in a row; with two OpenBLAS threads each call
# waits for the other thread, which on a shared 2-core machine (measured: a
# 50×1024×256 step product, other processes running) made a training step 5×
# slower than with one thread.  Above the threshold the product is long enough
# for threads to pay.  Uses threadpoolctl (a dependency); BPTT_STEP_THREADS_MACS=0
# turns the limit off.
_ONE_THREAD_MACS = int(os.environ.get("BPTT_STEP_THREADS_MACS", 16_000_000))
# Batches of at least twice this many rows run in slices, one thread each (bptt.nn.rnn.RNNBase._batch_parts),
# when a step's product has fewer multiply-adds than _SPLIT_MAX_MACS; BPTT_SPLIT_MIN_ROWS=0 turns that off.
# Above 12 M (measured at 13 M: LSTM 2×256 and RNN 2×512 at N = 50) the split gained at most 1.10× and
# its extra memory (each slice's copy of a dense input, a second set of weight gradients) put the RNN
# 2×512 training step at 60 MB of peak growth against PyTorch's 57 (the wavefront: 46).  The bound holds
# in training mode only: an eval-mode forward splits at every size (see RNNBase._batch_parts).
_SPLIT_MIN_ROWS = int(os.environ.get("BPTT_SPLIT_MIN_ROWS", 8)) or 1 << 62
_SPLIT_MAX_MACS = 12_000_000
_BLAS = {}


def _panel_vectors():
    """(bytes per vector register, vectors per panel row) for the register-blocked step products
    (``_panel_times``), or (0, 0) where they are not used (no Numba, no FMA, not x86, or
    BPTT_PANEL_PRODUCTS=0).  A block of 6 rows × _PANEL_VECTORS vectors of accumulators must
    fit the register file: 24 of AVX-512's 32 registers, 12 of AVX2's 16."""
    if numba is None or os.environ.get("BPTT_PANEL_PRODUCTS", "1") == "0":
        return 0, 0
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception:  # pragma: no cover - no feature list (not x86): BLAS for every product
        return 0, 0
    if features.get("avx512f") and features.get("fma"):
        return 64, 4
    if features.get("avx2") and features.get("fma"):
        return 32, 2
    return 0, 0


_VECTOR_BYTES, _PANEL_VECTORS = _panel_vectors()
_PANEL_PRODUCTS = _VECTOR_BYTES > 0  # read at run time (tests turn it off to cover the BLAS route)


def _blas_controllers():
    """threadpoolctl's controller of NumPy's BLAS, or None (threadpoolctl missing or failing)."""
    if "libs" not in _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS["libs"] = ThreadpoolController().select(user_api="blas")
        except Exception:  # leave the threads alone
            _BLAS["libs"] = None
    return _BLAS["libs"]


# glibc malloc options (mallopt): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
_MALLOPT = {-3: 32 << 20, -1: 128 << 20}
_MALLOC_TUNED: list[bool] = []


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (once per process; True if it took).

    A training step allocates its caches (gates, states: 15 MB at 2×128, N = 50) and
    frees them at the end of the backward pass.  By default glibc hands large freed
    blocks back to the system, and when a layer runs in threads (arrays allocated
    in a worker thread) it did so on every step: the next forward touched those
    pages anew, 7,300 page faults a step, and a 2×128 training step of the
    character model took 43 ms against 26 ms with this setting.  Blocks up to
    32 MB are then taken from the heap (the largest mmap threshold glibc allows),
    and up to 128 MB of free heap is kept instead of trimmed.  A process-wide
    setting, so it is made only when bptt runs batch slices in threads (the
    wavefront did not need it, and its peak memory grew with it: GRU 2×512 102 →
    120 MB), on glibc, and not at all with BPTT_KEEP_FREED_MEMORY=0.
    """
    if not _MALLOC_TUNED:
        ok = False
        if os.environ.get("BPTT_KEEP_FREED_MEMORY", "1") != "0":
            try:
                import ctypes

                libc = ctypes.CDLL(None)
                mallopt = getattr(libc, "mallopt", None)
                if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):  # glibc's meaning of the options
                    ok = all(mallopt(option, value) == 1 for option, value in _MALLOPT.items())
            except (OSError, AttributeError):  # no C library to ask: leave malloc alone
                pass
        _MALLOC_TUNED.append(ok)
    return _MALLOC_TUNED[0]


_OUTER_THREADS: list[int] = []  # BLAS thread counts in force before single_thread_blas() limited them


def blas_threads() -> int:
    """The cores bptt may keep busy: how many threads NumPy's BLAS may use (1 if unknown),
    counted outside :func:`single_thread_blas` (which lowers BLAS's count, not the budget)."""
    if _OUTER_THREADS:
        return _OUTER_THREADS[-1]
    libs = _blas_controllers()
    if libs is None or not libs.lib_controllers:
        return 1
    return max(1, max(c.num_threads for c in libs.lib_controllers))


@contextlib.contextmanager
def single_thread_blas():
    """Limit BLAS to one thread inside the block (a no-op when it already is).

    Why bptt does this: OpenBLAS's idle worker threads busy-wait for a while
    (~0.1 s) after each multi-threaded product.  While bptt runs one thread
    per layer (:mod:`bptt.runtime.wavefront`), a spinning worker takes a core from
    them: measured 2.2 ms chunks taking 6-7 ms.  So every product of a
    wavefront step, and of a model step around it, is single-threaded.
    """
    libs = _blas_controllers()
    before = [] if libs is None else [c.num_threads for c in libs.lib_controllers]
    if all(n == 1 for n in before):
        yield
        return
    _OUTER_THREADS.append(blas_threads())
    # each library's own set_num_threads, not threadpoolctl's limit(): 4.7 against 10.4 µs
    # an entry and exit of this block, which sampling pays on every character
    try:
        for c in libs.lib_controllers:
            c.set_num_threads(1)
        yield
    finally:
        for c, n in zip(libs.lib_controllers, before):
            c.set_num_threads(n)
        _OUTER_THREADS.pop()


def _step_blas_limit(macs):
    """A context manager limiting BLAS to one thread for per-step products of ``macs``, or a no-op."""
    if macs >= _ONE_THREAD_MACS:
        return contextlib.nullcontext()
    return single_thread_blas()


class KernelCache(NamedTuple):
    """What the fused backward needs.  Arrays are in time order (index t = step t)."""

    mode: str
    reverse: bool
    mask: np.ndarray | None  # (T, N) bool or None
    h_prev: np.ndarray  # (T, N, P) state entering step t (a view of hs)
    hs: np.ndarray  # (T+1, N, P) all states, see the module docstring
    cs: np.ndarray | None  # (T+1, N, H) LSTM cell states, same layout
    gates: np.ndarray  # (T, N, G) activated gates; RNN: h̃_t (T, N, H)
    aux: np.ndarray | None  # LSTM: tanh(c_t) (T, N, H); GRU: gh_n (T, N, H)
    m: np.ndarray | None  # LSTM with projection: m_t = o ⊙ tanh(c_t) (T, N, H)
    small: bool  # whether the compiled-loop path ran (backward uses the same)


if numba is not None:
    # error_model="numpy": no division checks, so loops vectorise.  fastmath "contract" only: a·b + c
    # may become one fused multiply-add (one rounding instead of two), nothing else is relaxed.
    _jit = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})

    @intrinsic
    def _wide_vectors(typingctx):
        """Mark the calling compiled function "prefer-vector-width"="512".

        LLVM vectorises for AVX-512 CPUs with 256-bit registers unless a function
        asks for more (a default chosen for older CPUs that clock down on 512-bit
        instructions).  The gate loops are arithmetic on long rows: with the mark
        and FMA contraction an LSTM forward step (N = 50, H = 128, float32) took
        23 µs against 38 µs.  Numba has no option for this attribute, so it is
        added to the function being generated; without AVX-512 it changes nothing.
        """

        def codegen(context, builder, signature, args):
            try:  # llvmlite accepts only its own list of attribute names; this one is set directly
                set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            except Exception:  # pragma: no cover - an llvmlite without set-based attributes: keep the default
                pass
            return context.get_dummy_value()

        return types.void(), codegen

    # ======================================================================== scalar maths
    @intrinsic
    def _bits_as_float(typingctx, i):
        """Reinterpret the bits of an int64 as a float64, of an int32 as a float32 (for building 2^k)."""
        if i == types.int64:
            sig, float_type = types.float64(types.int64), _ir.DoubleType()
        elif i == types.int32:
            sig, float_type = types.float32(types.int32), _ir.FloatType()
        else:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], float_type)

        return sig, codegen

    _LOG2E = 1.4426950408889634
    _LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two so k·ln2 is exact
    _LN2_LO = 1.90821492927058770002e-10
    _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12 = (1.0 / math.factorial(k) for k in range(2, 13))

    @njit(inline="always", **_jit)
    def _exp_neg(x):
        """e^x for x ≤ 0 in float64, branch-free so loops around it vectorise.

        x = k ln2 + r with |r| ≤ ln2/2; e^r by its Taylor series to r¹² (error
        < 2e-16); 2^k by writing k into the exponent bits.
        """
        if x < -700.0:
            x = -700.0
        k = math.floor(x * _LOG2E + 0.5)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = _E12
        p = p * r + _E11
        p = p * r + _E10
        p = p * r + _E9
        p = p * r + _E8
        p = p * r + _E7
        p = p * r + _E6
        p = p * r + _E5
        p = p * r + _E4
        p = p * r + _E3
        p = p * r + _E2
        p = p * r + 1.0
        p = p * r + 1.0
        return p * _bits_as_float((np.int64(k) + 1023) << 52)

    @njit(inline="always", **_jit)
    def _tanh(x):
        """tanh(x) = sign(x) (1 − e^{−2|x|}) / (1 + e^{−2|x|}), in float64."""
        x = float(x)
        e = _exp_neg(-2.0 * abs(x))
        t = (1.0 - e) / (1.0 + e)
        return t if x >= 0.0 else -t

    @njit(inline="always", **_jit)
    def _sigmoid(x):
        """σ(x) = 1 / (1 + e^{−x}), via e^{−|x|} so nothing overflows."""
        x = float(x)
        e = _exp_neg(-abs(x))
        s = 1.0 / (1.0 + e)
        return s if x >= 0.0 else e * s  # e/(1+e), not 1 − s: no cancellation for x ≪ 0

    # float32 versions: the same formulas in single precision with a 7th-order
    # polynomial (truncation error < 6e-9, below float32's 6e-8 rounding), twice the
    # vector lanes of float64 and fewer terms.  ``_act_tanh`` / ``_act_sigmoid`` pick
    # the version matching the argument's type when a step function is compiled.
    _F32 = np.float32
    _LOG2E_32, _HALF_32, _ONE_32, _ZERO_32 = _F32(_LOG2E), _F32(0.5), _F32(1.0), _F32(0.0)
    _LN2_HI_32, _LN2_LO_32 = _F32(0.693145751953125), _F32(1.428606765330187e-06)  # hi has 12 bits
    _C2, _C3, _C4, _C5, _C6, _C7 = (_F32(1.0 / math.factorial(k)) for k in range(2, 8))
    _MIN_EXP_32, _TWO_32, _SMALL_32 = _F32(-87.0), _F32(2.0), _F32(0.0625)
    _T3, _T5, _T7 = _F32(-1.0 / 3.0), _F32(2.0 / 15.0), _F32(-17.0 / 315.0)

    @njit(inline="always", **_jit)
    def _exp_neg32(x):
        """e^x for float32 x ≤ 0: x = k ln2 + r, e^r to r⁷, 2^k from the exponent bits."""
        if x < _MIN_EXP_32:
            x = _MIN_EXP_32
        kf = np.floor(x * _LOG2E_32 + _HALF_32)
        r = (x - kf * _LN2_HI_32) - kf * _LN2_LO_32
        p = _C7
        p = p * r + _C6
        p = p * r + _C5
        p = p * r + _C4
        p = p * r + _C3
        p = p * r + _C2
        p = p * r + _ONE_32
        p = p * r + _ONE_32
        return p * _bits_as_float(np.int32((np.int32(kf) + 127) << 23))

    @njit(inline="always", **_jit)
    def _tanh32(x):
        e = _exp_neg32(-_TWO_32 * abs(x))
        t = (_ONE_32 - e) / (_ONE_32 + e)
        if abs(x) < _SMALL_32:  # 1 − e cancels near 0: the odd series instead
            x2 = x * x
            t = abs(x) * (_ONE_32 + x2 * (_T3 + x2 * (_T5 + x2 * _T7)))
        return t if x >= _ZERO_32 else -t

    @njit(inline="always", **_jit)
    def _sigmoid32(x):
        e = _exp_neg32(-abs(x))
        s = _ONE_32 / (_ONE_32 + e)
        return s if x >= _ZERO_32 else e * s

    # Inlining the overloads (needed for the loops to vectorise) trips a pedantic
    # internal check of Numba's, which warns at compile time about nothing that affects
    # the result; keep it out of users' terminals.
    warnings.filterwarnings("ignore", message=r"(?s).*_ov_act_", category=numba.core.errors.NumbaIRAssumptionWarning)

    def _act_tanh(x):  # pragma: no cover - replaced by the overload inside compiled code
        raise NotImplementedError

    def _act_sigmoid(x):  # pragma: no cover
        raise NotImplementedError

    @overload(_act_tanh, inline="always")
    def _ov_act_tanh(x):
        return (lambda x: _tanh32(x)) if x == types.float32 else (lambda x: _tanh(x))

    @overload(_act_sigmoid, inline="always")
    def _ov_act_sigmoid(x):
        return (lambda x: _sigmoid32(x)) if x == types.float32 else (lambda x: _sigmoid(x))

    def _act_exp_neg(x):  # pragma: no cover
        raise NotImplementedError

    @overload(_act_exp_neg, inline="always")
    def _ov_act_exp_neg(x):
        return (lambda x: _exp_neg32(x)) if x == types.float32 else (lambda x: _exp_neg(x))

    # ======================================================================== softmax cross-entropy
    # Their own fastmath: "reassoc" lets a sum or max over the V logits of a row run in
    # vector lanes (the order is all it changes).  The max may skip a NaN ("nnan"), but the
    # sum of exponentials has no "nnan", so a NaN logit still gives a NaN loss.
    @njit(inline="always", cache=True, nogil=True, fastmath={"reassoc", "nnan", "nsz"})
    def _row_max(zr):
        m = zr[0]
        for j in range(1, zr.shape[0]):
            m = max(m, zr[j])
        return m

    @njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract", "reassoc"})
    def _softmax_xent_rows(z, y, grad, scale):
        """Σ_n −log softmax(z_n)_{y_n} over the rows of z (M, V), summed in float64:

            m = max_j z_nj    s = Σ_j e^{z_nj − m}    −log softmax(z_n)_{y_n} = m + log s − z_{n,y_n}

        and, when grad is (M, V) (not (0, V)), grad_n = scale · (e^{z_n − m} / s − onehot(y_n)).
        One pass over each row's V logits for the max, one for the exponentials."""
        _wide_vectors()
        M, V = z.shape
        want = grad.shape[0] > 0
        total = 0.0
        for n in range(M):
            zr = z[n]
            m = _row_max(zr)
            s = zr[0] - zr[0]  # zero of z's dtype
            if want:
                gr = grad[n]
                for j in range(V):
                    e = _act_exp_neg(zr[j] - m)
                    gr[j] = e
                    s += e
                inv = scale / s
                for j in range(V):
                    gr[j] *= inv
                gr[y[n]] -= scale
            else:
                for j in range(V):
                    s += _act_exp_neg(zr[j] - m)
            total += math.log(s) + (float(m) - float(zr[y[n]]))
        return total

    # ======================================================================== optimizer steps
    # The update formulas of bptt.nn.optim in one pass over each parameter, where NumPy makes
    # 8 (RMSprop) or 11 (Adam) whole-array passes.  Scalars come in the parameter's dtype
    # (1 − α and 1 − β too), so float32 stays float32 as in NumPy.
    @njit(**_jit)
    def _rmsprop_step(p, g, sq, buf, lr, alpha, one_minus_alpha, eps, wd, momentum):
        """RMSprop (bptt.nn.optim.RMSprop, not centered) over flat arrays; buf is empty when μ = 0:

            d = g + λθ    v ← αv + (1 − α)d²    s = d / (√v + ε)
            b ← μb + s, θ ← θ − γb   (μ > 0)      θ ← θ − γs   (μ = 0)
        """
        _wide_vectors()
        for i in range(p.shape[0]):
            d = g[i]
            if wd != 0:
                d += wd * p[i]
            v = alpha * sq[i] + one_minus_alpha * (d * d)
            sq[i] = v
            step = d / (np.sqrt(v) + eps)
            if momentum > 0:
                step += momentum * buf[i]
                buf[i] = step
            p[i] -= lr * step

    @njit(**_jit)
    def _adam_step(p, g, m, v, vmax, step_size, b1, one_minus_b1, b2, one_minus_b2, eps, wd, bias2_sqrt, amsgrad):
        """Adam with the L2 penalty coupled (λ in d; AdamW scales θ first, outside) over flat arrays;
        vmax is empty unless AMSGrad:

            d = g + λθ    m ← β₁m + (1 − β₁)d    v ← β₂v + (1 − β₂)d²    (AMSGrad: v̂ = max(v̂, v))
            θ ← θ − step_size · m / (√v / bias2_sqrt + ε),   step_size = γ / (1 − β₁ᵗ), bias2_sqrt = √(1 − β₂ᵗ)
        """
        _wide_vectors()
        for i in range(p.shape[0]):
            d = g[i]
            if wd != 0:
                d += wd * p[i]
            mi = b1 * m[i] + one_minus_b1 * d
            m[i] = mi
            vi = b2 * v[i] + one_minus_b2 * (d * d)
            v[i] = vi
            if amsgrad:
                vi = max(vmax[i], vi)
                vmax[i] = vi
            p[i] -= step_size * (mi / (np.sqrt(vi) / bias2_sqrt + eps))

    # ======================================================================== small products
    @njit(**_jit)
    def _mm_acc(A, Bt, out, zero):
        """out (N, K) (=|+=) A (N, M) · Bt (M, K): rows of Bt added as axpys (vectorised)."""
        _wide_vectors()
        N, M = A.shape
        K = Bt.shape[1]
        for n in range(N):
            if zero:
                for k in range(K):
                    out[n, k] = 0.0
            for j in range(M):
                a = A[n, j]
                if a != 0.0:
                    for k in range(K):
                        out[n, k] += a * Bt[j, k]

    @njit(**_jit)
    def _scatter_add_rows(out, ids, rows):
        """out[ids[i], :] += rows[i, :] for every i, in order (repeated ids accumulate)."""
        _wide_vectors()
        for i in range(ids.shape[0]):
            o, r = out[ids[i]], rows[i]
            for j in range(o.shape[0]):
                o[j] += r[j]

    # ======================================================================== register-blocked products
    # A per-step product h_{t−1} W_hhᵀ is small (25×128 by 128×512 per batch slice) and
    # its weights stay the same for all T steps.  BLAS packs both operands on every call
    # and ran such products at 54–90 GFLOP/s on one core (AMD EPYC, Zen 4), below its
    # 92–96 on a large product.  These kernels take the weights packed once per sequence
    # (``pack_panels``) and keep a block of C in vector registers for the whole sum
    # over k: 102–110 GFLOP/s on the same products (1.14–1.9× OpenBLAS, same run;
    # BENCHMARKS.md has the table).
    def _panel_block_kernel(R):
        """An intrinsic ``block(zero, a, lda, b, c, ldc, K)``: C[0:R, 0:PW] = A[0:R, 0:K] · B_panel.

        a, c: addresses of A and C (rows lda, ldc elements apart); b: a packed panel,
        K rows of PW = _PANEL_VECTORS·w contiguous elements (w = lanes of a vector of
        the dtype of ``zero``).  The R·_PANEL_VECTORS accumulators are SSA values,
        so LLVM keeps them in registers: per k, _PANEL_VECTORS vector loads of B and
        R broadcasts of A feed R·_PANEL_VECTORS fused multiply-adds.  K ≥ 1.
        """

        @intrinsic
        def block(typingctx, zero, a, lda, b, c, ldc, K):
            if zero not in (types.float32, types.float64):
                return None
            sig = types.void(zero, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)
            item = 4 if zero == types.float32 else 8
            fp = _ir.FloatType() if item == 4 else _ir.DoubleType()
            lanes = _VECTOR_BYTES // item

            def codegen(context, builder, signature, args):
                _, a_i, lda_i, b_i, c_i, ldc_i, K_i = args
                i64, vec = _ir.IntType(64), _ir.VectorType(fp, lanes)
                A, B, C = (builder.inttoptr(p, fp.as_pointer()) for p in (a_i, b_i, c_i))

                def const(v):
                    return _ir.Constant(i64, v)

                def vector_at(base, offset):
                    return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

                name = f"llvm.fma.v{lanes}f{8 * item}"
                fma = builder.module.globals.get(name) or _ir.Function(
                    builder.module, _ir.FunctionType(vec, [vec, vec, vec]), name)
                V = _PANEL_VECTORS
                entry = builder.block
                loop, done = builder.append_basic_block("panel.k"), builder.append_basic_block("panel.done")
                builder.branch(loop)
                builder.position_at_end(loop)
                k = builder.phi(i64)
                acc = [[builder.phi(vec) for _ in range(V)] for _ in range(R)]
                b_row = builder.mul(k, const(V * lanes))  # B_panel[k, :]
                bv = [builder.load(vector_at(B, builder.add(b_row, const(v * lanes))), align=item) for v in range(V)]
                splat = _ir.Constant(_ir.VectorType(_ir.IntType(32), lanes), [0] * lanes)
                new = []
                for r in range(R):  # acc[r][v] += A[r, k] · B_panel[k, v·w : (v+1)·w]
                    x = builder.load(builder.gep(A, [builder.add(builder.mul(const(r), lda_i), k)]))
                    xv = builder.insert_element(_ir.Constant(vec, _ir.Undefined), x, _ir.Constant(_ir.IntType(32), 0))
                    xv = builder.shuffle_vector(xv, _ir.Constant(vec, _ir.Undefined), splat)
                    new.append([builder.call(fma, [xv, bv[v], acc[r][v]]) for v in range(V)])
                k_next = builder.add(k, const(1))
                k.add_incoming(const(0), entry)
                k.add_incoming(k_next, loop)
                for r in range(R):
                    for v in range(V):
                        acc[r][v].add_incoming(_ir.Constant(vec, [0.0] * lanes), entry)
                        acc[r][v].add_incoming(new[r][v], loop)
                builder.cbranch(builder.icmp_signed("<", k_next, K_i), loop, done)
                builder.position_at_end(done)
                for r in range(R):
                    for v in range(V):
                        offset = builder.add(builder.mul(const(r), ldc_i), const(v * lanes))
                        builder.store(new[r][v], vector_at(C, offset), align=item)
                return context.get_dummy_value()

            return sig, codegen

        return block

    _block1, _block2, _block3, _block4, _block5, _block6 = (_panel_block_kernel(r) for r in range(1, 7))

    @njit(**_jit)
    def _panel_times(A, Bp, out, tmp):
        """out (M, n) = A (M, K) B, with B packed by :func:`pack_panels` as Bp (n_panels, K, PW).

        Rows go in blocks of at most 6, as even as possible (25 rows: five blocks of 5,
        not four of 6 and one of 1, which would use a fifth of the registers); a last
        panel narrower than PW is computed into ``tmp`` (6, PW) and its columns copied.
        Rows of A and out must be contiguous.
        """
        _wide_vectors()
        M, K = A.shape
        n = out.shape[1]
        n_panels, PW = Bp.shape[0], Bp.shape[2]
        size = A.itemsize
        zero = A.dtype.type(0)
        blocks = (M + 5) // 6
        lda, ldc = A.strides[0] // size, out.strides[0] // size
        for jp in range(n_panels):
            j0 = jp * PW
            width = min(PW, n - j0)
            b = Bp[jp].ctypes.data
            for blk in range(blocks):
                i0, i1 = M * blk // blocks, M * (blk + 1) // blocks
                a = A.ctypes.data + i0 * lda * size
                c, ld = (out.ctypes.data + (i0 * ldc + j0) * size, ldc) if width == PW else (tmp.ctypes.data, PW)
                r = i1 - i0
                if r == 6:
                    _block6(zero, a, lda, b, c, ld, K)
                elif r == 5:
                    _block5(zero, a, lda, b, c, ld, K)
                elif r == 4:
                    _block4(zero, a, lda, b, c, ld, K)
                elif r == 3:
                    _block3(zero, a, lda, b, c, ld, K)
                elif r == 2:
                    _block2(zero, a, lda, b, c, ld, K)
                else:
                    _block1(zero, a, lda, b, c, ld, K)
                if width < PW:
                    for i in range(r):
                        for j in range(width):
                            out[i0 + i, j0 + j] = tmp[i, j]

    # ======================================================================== forward steps
    # Shared arguments: t the time index, hs (T+1, N, P) states with entering state
    # hs[t+rev] and leaving state hs[t+1−rev]; mask (T, N) (ignored unless has_mask);
    # y (T, N, P) outputs.  Each batch row is a few short loops over 1-d row views
    # that LLVM vectorises (one long loop touching every array would not: too many
    # possible aliases); padded rows are fixed up afterwards by ``_keep_row``.

    @njit(inline="always", **_jit)
    def _keep_row(yr, hnr, hpr):
        """A padded step: y_t = 0, h_t = h_{t−1}."""
        for j in range(hnr.shape[0]):
            yr[j] = 0.0
            hnr[j] = hpr[j]

    @njit(inline="always", **_jit)
    def _emit_row(v, yr, hnr):
        """y_t = h_t = h̃_t."""
        for j in range(hnr.shape[0]):
            yr[j] = v[j]
            hnr[j] = v[j]

    @njit(**_jit)
    def _rnn_fw_step(t, rev, a, gx, hs, y, gates, mask, has_mask, relu):
        """a_t = gx_t + h_{t−1} W_hhᵀ (``a`` holds the product);  h̃_t = φ(a_t) (kept in ``gates``)."""
        _wide_vectors()
        N, H = a.shape
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        for n in range(N):
            ar, xr, hr = a[n], gx[t, n], gates[t, n]
            if relu:
                for j in range(H):
                    v = ar[j] + xr[j]
                    hr[j] = v if v > 0.0 else 0.0
            else:
                for j in range(H):
                    hr[j] = _act_tanh(ar[j] + xr[j])
            if has_mask and not mask[t, n]:
                _keep_row(y[t, n], hn[n], hp[n])
            else:
                _emit_row(hr, y[t, n], hn[n])

    @njit(**_jit)
    def _lstm_fw_step(t, rev, a, gx, hs, cs, y, gates, tanh_c, m_all, mask, has_mask, proj):
        """One LSTM step after the product a = h_{t−1} W_hhᵀ:

            [a_i a_f a_g a_o] = gx_t + a
            i = σ(a_i)  f = σ(a_f)  g = tanh(a_g)  o = σ(a_o)
            c̃_t = f ⊙ c_{t−1} + i ⊙ g      m_t = o ⊙ tanh(c̃_t)
            c_t = mask ? c̃_t : c_{t−1};  without projection h̃_t = m_t (y_t, h_t as for the RNN);
            with one, m_t is stored and h̃_t = m_t W_hrᵀ follows (``_merge_step``).
        """
        _wide_vectors()
        N = a.shape[0]
        H = cs.shape[2]
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        cp, cn = cs[t + rev], cs[t + 1 - rev]
        for n in range(N):
            ar, xr, gr = a[n], gx[t, n], gates[t, n]
            for j in range(2 * H):  # i, f
                gr[j] = _act_sigmoid(ar[j] + xr[j])
            ag, xg, g = ar[2 * H : 3 * H], xr[2 * H : 3 * H], gr[2 * H : 3 * H]
            for j in range(H):
                g[j] = _act_tanh(ag[j] + xg[j])
            ao, xo, o = ar[3 * H :], xr[3 * H :], gr[3 * H :]
            for j in range(H):
                o[j] = _act_sigmoid(ao[j] + xo[j])
            i, f = gr[:H], gr[H : 2 * H]
            cpr, cnr, tcr = cp[n], cn[n], tanh_c[t, n]
            for j in range(H):  # c̃ = f ⊙ c_{t−1} + i ⊙ g
                cnr[j] = f[j] * cpr[j] + i[j] * g[j]
            for j in range(H):
                tcr[j] = _act_tanh(cnr[j])
            mr = m_all[t, n] if proj else y[t, n]  # m_t, or directly h̃_t = y_t
            for j in range(H):
                mr[j] = o[j] * tcr[j]
            keep = has_mask and not mask[t, n]
            if keep:
                for j in range(H):
                    cnr[j] = cpr[j]
            if not proj:
                if keep:
                    _keep_row(y[t, n], hn[n], hp[n])
                else:
                    hnr = hn[n]
                    for j in range(H):
                        hnr[j] = mr[j]

    @njit(**_jit)
    def _merge_step(t, rev, h_new, hs, y, mask, has_mask):
        """y_t = m_t h̃_t;  h_t = m_t ? h̃_t : h_{t−1}   (after the LSTM projection)."""
        _wide_vectors()
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        for n in range(h_new.shape[0]):
            if has_mask and not mask[t, n]:
                _keep_row(y[t, n], hn[n], hp[n])
            else:
                _emit_row(h_new[n], y[t, n], hn[n])

    @njit(**_jit)
    def _gru_fw_step(t, rev, a, gx, b_hh, hs, y, gates, gh_n, mask, has_mask):
        """One GRU step after the product a = h_{t−1} W_hhᵀ (gh = a + b_hh):

            r = σ(gx_r + gh_r)   z = σ(gx_z + gh_z)   n = tanh(gx_n + r ⊙ gh_n)
            h̃_t = (1 − z) ⊙ n + z ⊙ h_{t−1}
        """
        _wide_vectors()
        N, H = hs.shape[1], hs.shape[2]
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        for n in range(N):
            ar, xr, gr, ghr = a[n], gx[t, n], gates[t, n], gh_n[t, n]
            for j in range(2 * H):  # r, z
                gr[j] = _act_sigmoid(xr[j] + (ar[j] + b_hh[j]))
            an, bn = ar[2 * H :], b_hh[2 * H :]
            for j in range(H):
                ghr[j] = an[j] + bn[j]
            r, z, nr, xn = gr[:H], gr[H : 2 * H], gr[2 * H :], xr[2 * H :]
            for j in range(H):  # n
                nr[j] = _act_tanh(xn[j] + r[j] * ghr[j])
            if has_mask and not mask[t, n]:
                _keep_row(y[t, n], hn[n], hp[n])
            else:
                yr, hpr, hnr = y[t, n], hp[n], hn[n]
                for j in range(H):
                    yr[j] = nr[j] + z[j] * (hpr[j] - nr[j])
                for j in range(H):
                    hnr[j] = yr[j]

    # ======================================================================== backward steps
    # dh (N, P) is the carried ∂L/∂h_t from step t+1 (updated in place to ∂L/∂h_{t−1});
    # dc (N, H) likewise for the LSTM cell.  Padded rows get zero pre-activation
    # gradients and leave the carries untouched.
    #
    # _ALIASED_ROWS: BackwardRun writes dgx over the forward's gate buffer, so a
    # step reads gates[t, n] and writes dgx[t, n] — the same memory.  LLVM's
    # vectorised loop is guarded by a run-time check that the rows do not overlap;
    # they do, so the scalar loop ran (LSTM, N = 50, H = 128: 43 µs a step in
    # place against 11.5 µs into another buffer).  Each step therefore first copies
    # the gate row into a scratch row (one short memcpy, in L1) and reads from it.

    @njit(**_jit)
    def _rnn_bw_step(t, dy, dh, gates, dgx, mask, has_mask, relu):
        """dh̃ = m_t (dh + dy_t);  da = dh̃ ⊙ φ'(a) with φ' = 1 − h̃² (tanh) or [h̃ > 0] (relu)."""
        _wide_vectors()
        N, H = dh.shape
        hr = np.empty(H, gates.dtype)  # h̃_t's row, copied: see _ALIASED_ROWS
        one, zero = gates.dtype.type(1.0), gates.dtype.type(0.0)  # typed: a float64 1.0 made the float32 maths float64
        for n in range(N):
            dr = dgx[t, n]
            if has_mask and not mask[t, n]:
                dr[:] = 0.0
                continue
            hr[:] = gates[t, n]
            dhr, dyr = dh[n], dy[t, n]
            if relu:
                for j in range(H):
                    d = dhr[j] + dyr[j]
                    dr[j] = d if hr[j] > zero else zero
            else:
                for j in range(H):
                    dr[j] = (dhr[j] + dyr[j]) * (one - hr[j] * hr[j])

    @njit(**_jit)
    def _lstm_bw_step(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, mask, has_mask, proj):
        """Backward of one LSTM step, the forward read bottom to top:

            dm = m_t (dh + dy_t)      (with a projection: dm = (m_t dh̃) W_hr, given as dm_in)
            do = dm ⊙ tanh(c_t)       dc̃ = dm ⊙ o ⊙ (1 − tanh²(c_t)) + m_t dc
            da_i = dc̃ ⊙ g ⊙ i(1−i)    da_f = dc̃ ⊙ c_{t−1} ⊙ f(1−f)
            da_g = dc̃ ⊙ i ⊙ (1−g²)    da_o = do ⊙ o(1−o)
            dc ← m_t ? dc̃ ⊙ f : dc    (the constant error carousel)
        """
        _wide_vectors()
        N = dh.shape[0]
        H = dc.shape[1]
        cp = cs[t + rev]
        gr = np.empty(gates.shape[2], gates.dtype)  # the gate row, copied: see _ALIASED_ROWS
        one = gates.dtype.type(1.0)  # typed: a float64 1.0 made the float32 maths float64
        for n in range(N):
            dr = dgx[t, n]
            if has_mask and not mask[t, n]:
                dr[:] = 0.0
                continue
            gr[:] = gates[t, n]
            tcr, dcr, cpr = tanh_c[t, n], dc[n], cp[n]
            # one view per gate, so every loop runs from 0 (LLVM vectorises those, not offset ranges)
            i, f, g, o = gr[:H], gr[H : 2 * H], gr[2 * H : 3 * H], gr[3 * H :]
            da_i, da_f, da_g, da_o = dr[:H], dr[H : 2 * H], dr[2 * H : 3 * H], dr[3 * H :]
            dmr = dm_in[n] if proj else dh[n]
            if not proj:
                dyr = dy[t, n]
                for j in range(H):
                    dmr[j] += dyr[j]  # dm = dh + dy_t (dh is overwritten by the product afterwards)
            # one output per loop: a loop writing several rows needs more run-time overlap
            # checks than LLVM allows (8), and then runs scalar (measured 2x slower)
            for j in range(H):
                da_o[j] = dmr[j] * tcr[j] * (o[j] * (one - o[j]))
            for j in range(H):
                dcr[j] = dmr[j] * o[j] * (one - tcr[j] * tcr[j]) + dcr[j]  # dc̃
            for j in range(H):
                da_i[j] = dcr[j] * g[j] * (i[j] * (one - i[j]))
            for j in range(H):
                da_f[j] = dcr[j] * cpr[j] * (f[j] * (one - f[j]))
            for j in range(H):
                da_g[j] = dcr[j] * i[j] * (one - g[j] * g[j])
            for j in range(H):
                dcr[j] *= f[j]  # dc carried to step t−1

    @njit(**_jit)
    def _masked_sum(t, dh, dy, out, mask, has_mask):
        """out_t = m_t (dh + dy_t): the gradient reaching h̃_t (the LSTM projection's output)."""
        _wide_vectors()
        N, P = dh.shape
        for n in range(N):
            o = out[t, n]
            if has_mask and not mask[t, n]:
                o[:] = 0.0
            else:
                dhr, dyr = dh[n], dy[t, n]
                for j in range(P):
                    o[j] = dhr[j] + dyr[j]

    @njit(**_jit)
    def _gru_bw_step(t, rev, dy, dh, hs, gates, gh_n, dgx, dgh, mask, has_mask):
        """Backward of one GRU step:

            dh̃ = m_t (dh + dy_t)
            da_n = dh̃ ⊙ (1 − z) ⊙ (1 − n²)     da_r = da_n ⊙ gh_n ⊙ r(1−r)
            da_z = dh̃ ⊙ (h_{t−1} − n) ⊙ z(1−z)
            dgx = [da_r, da_z, da_n],  dgh = [da_r, da_z, da_n ⊙ r]
            dh ← m_t ? dh̃ ⊙ z (+ dgh W_hh, added by ``_merge_grad``) : dh
        """
        _wide_vectors()
        N, H = dh.shape
        hp = hs[t + rev]
        gr = np.empty(gates.shape[2], gates.dtype)  # the gate row, copied: see _ALIASED_ROWS
        one = gates.dtype.type(1.0)  # typed: a float64 1.0 made the float32 maths float64
        for n in range(N):
            xr, hr = dgx[t, n], dgh[t, n]
            if has_mask and not mask[t, n]:
                xr[:] = 0.0
                hr[:] = 0.0
                continue
            gr[:] = gates[t, n]
            dhr, dyr, ghr, hpr = dh[n], dy[t, n], gh_n[t, n], hp[n]
            r, z, nn = gr[:H], gr[H : 2 * H], gr[2 * H :]  # views: loops from 0 vectorise
            da_r, da_z, da_n, dgh_n = xr[:H], xr[H : 2 * H], xr[2 * H :], hr[2 * H :]
            # one output per loop, as in _lstm_bw_step
            for j in range(H):
                dhr[j] += dyr[j]  # dh̃
            for j in range(H):
                da_n[j] = dhr[j] * (one - z[j]) * (one - nn[j] * nn[j])
            for j in range(H):
                da_r[j] = da_n[j] * ghr[j] * (r[j] * (one - r[j]))
            for j in range(H):
                da_z[j] = dhr[j] * (hpr[j] - nn[j]) * (z[j] * (one - z[j]))
            for j in range(H):
                dgh_n[j] = da_n[j] * r[j]
            for j in range(H):
                dhr[j] *= z[j]  # the direct path h_{t−1} → h̃_t
            for j in range(2 * H):
                hr[j] = xr[j]

    @njit(**_jit)
    def _merge_grad(t, prod, dh, mask, has_mask, add):
        """dh ← m_t ? prod (+ dh if add) : dh — the carried gradient after the product with W_hh."""
        _wide_vectors()
        N, P = dh.shape
        for n in range(N):
            if has_mask and not mask[t, n]:
                continue
            dhr, pr = dh[n], prod[n]
            if add:
                for j in range(P):
                    dhr[j] += pr[j]
            else:
                for j in range(P):
                    dhr[j] = pr[j]

    # ======================================================================== products inside the loops
    # ``gemm`` is NumPy's own BLAS ?gemm as a ctypes function (see _gemm_function),
    # or None for small sizes, where hand loops beat a BLAS call; Numba compiles
    # the branch for None away.  Weights come transposed and contiguous, so BLAS
    # reads B untransposed: measured 44 against 58 µs for the 50×128 by 128×512
    # step product, 726 against 1019 µs at H = 512.  Calling BLAS from compiled code keeps the time
    # loop free of Python, and of the GIL, which matters when one thread per
    # layer runs (bptt.runtime.wavefront).
    _ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

    @njit(inline="always", **_jit)
    def _times(gemm, one, zero, A, B, Bp, tmp, out):
        """out = A B.   A (M, K), B (K, N'); Bp is B packed (``pack_panels``) or empty."""
        if Bp.shape[0]:
            _panel_times(A, Bp, out, tmp)
        elif gemm is None:
            _mm_acc(A, B, out, True)
        else:
            M, K = A.shape
            n = B.shape[1]
            gemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, M, n, K, one, A.ctypes.data, K, B.ctypes.data, n, zero,
                 out.ctypes.data, n)

    # ======================================================================== the time loops, compiled
    @njit(**_jit)
    def _forward_loop(kind, rev, t0, t1, gemm, one, zero, gx, WhhT, b_hh, WhrT, hs, cs, y, gates, aux, m_all,
                      mask, has_mask, proj, WhhP, WhrP, tmp):
        """The forward loop over times [t0, t1) (kind 0 tanh, 1 relu, 2 LSTM, 3 GRU): per step the
        product a = h_{t−1} W_hhᵀ, then the fused step.  WhhT = W_hhᵀ (P, G), WhrT = W_hrᵀ (H, P);
        WhhP, WhrP the same packed for ``_panel_times`` (or empty: BLAS or ``_mm_acc``)."""
        _wide_vectors()
        N, G = gx.shape[1], gx.shape[2]
        a = np.empty((N, G), gx.dtype)
        h_new = np.empty((N, hs.shape[2]), gx.dtype)
        for s in range(t1 - t0):
            t = t1 - 1 - s if rev else t0 + s
            _times(gemm, one, zero, hs[t + rev], WhhT, WhhP, tmp, a)  # a = h_{t−1} W_hhᵀ
            if kind == 2:
                _lstm_fw_step(t, rev, a, gx, hs, cs, y, gates, aux, m_all, mask, has_mask, proj)
                if proj:
                    _times(gemm, one, zero, m_all[t], WhrT, WhrP, tmp, h_new)  # h̃_t = m_t W_hrᵀ
                    _merge_step(t, rev, h_new, hs, y, mask, has_mask)
            elif kind == 3:
                _gru_fw_step(t, rev, a, gx, b_hh, hs, y, gates, aux, mask, has_mask)
            else:
                _rnn_fw_step(t, rev, a, gx, hs, y, gates, mask, has_mask, kind == 1)

    @njit(**_jit)
    def _backward_loop(kind, rev, t0, t1, gemm, one, zero, dy, dh, dc, W_hh, W_hr, hs, cs, gates, aux, dgx, dgh, dh_all,
                       mask, has_mask, proj, W_hhP, W_hrP, tmp):
        """The backward loop over times [t0, t1), read backwards (dh, dc updated in place):
        per step the fused step, then the product with W_hh carrying dh to step t−1."""
        _wide_vectors()
        N, P = dy.shape[1], dy.shape[2]
        H = gates.shape[2] // (4 if kind == 2 else 3 if kind == 3 else 1)
        prod = np.empty((N, P), dy.dtype)
        dm = np.empty((N, H), dy.dtype)
        for s in range(t1 - t0):
            t = t0 + s if rev else t1 - 1 - s  # the forward order, read backwards
            if kind == 2:
                if proj:
                    _masked_sum(t, dh, dy, dh_all, mask, has_mask)
                    _times(gemm, one, zero, dh_all[t], W_hr, W_hrP, tmp, dm)  # dm = dh̃ W_hr
                _lstm_bw_step(t, rev, dy, dh, dc, dm, cs, gates, aux, dgx, mask, has_mask, proj)
            elif kind == 3:
                _gru_bw_step(t, rev, dy, dh, hs, gates, aux, dgx, dgh, mask, has_mask)
            else:
                _rnn_bw_step(t, dy, dh, gates, dgx, mask, has_mask, kind == 1)
            if kind == 3 or has_mask:  # GRU: dh += dgh W_hh;  padded rows keep their dh
                _times(gemm, one, zero, dgh[t], W_hh, W_hhP, tmp, prod)
                _merge_grad(t, prod, dh, mask, has_mask, kind == 3)
            else:
                _times(gemm, one, zero, dgx[t], W_hh, W_hhP, tmp, dh)  # dh = da W_hh


_KIND = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
_NO_MASK = np.ones((1, 1), dtype=np.bool_)


# ============================================================================ Python drivers
def _prepare(mode, gx, weights, dtype):
    gx = np.ascontiguousarray(gx, dtype=dtype)
    b_hh = weights.b_hh
    if b_hh is not None and mode != "gru":
        gx = gx + b_hh.astype(dtype)  # RNN/LSTM: b_hh joins the same sum (layers fold it already)
        b_hh = None
    return gx, b_hh


def _panel_width(dtype):
    """PW, the columns of one packed panel: _PANEL_VECTORS vectors of ``dtype``."""
    return _PANEL_VECTORS * _VECTOR_BYTES // np.dtype(dtype).itemsize


def pack_panels(B):
    """B (K, n) → (⌈n / PW⌉, K, PW) contiguous: column panels of PW = _PANEL_VECTORS vectors,
    the last padded with zeros, each read by ``_panel_times`` row after row."""
    K, n = B.shape
    PW = _panel_width(B.dtype)
    n_panels = -(-n // PW)
    packed = np.empty((n_panels, K, PW), B.dtype)
    whole = n // PW
    packed[:whole] = B[:, : whole * PW].reshape(K, whole, PW).transpose(1, 0, 2)  # one strided copy
    if whole < n_panels:
        packed[whole, :, : n - whole * PW] = B[:, whole * PW :]
        packed[whole, :, n - whole * PW :] = 0
    return packed


class _Panels:
    """The step products' weights packed for ``_panel_times``, made on first use by a run."""

    def __init__(self):
        self.packed = None

    def get(self, small, macs, weights):
        """(packed weights, packed projection (empty without one), scratch) when this run's
        step products should use ``_panel_times``, else None.

        They do when the products are not hand loops (``small``), the kernels exist for
        this CPU, and BLAS would run the product on one thread: below ``_ONE_THREAD_MACS``,
        or inside :func:`single_thread_blas` (the wavefront and the batch split).  Longer
        products on several BLAS threads stay with BLAS.
        """
        if small or not _PANEL_PRODUCTS or not (macs < _ONE_THREAD_MACS or _OUTER_THREADS or blas_threads() == 1):
            return None
        if self.packed is None:
            W, W_r = weights
            tmp = np.empty((6, _panel_width(W.dtype)), W.dtype)
            self.packed = (pack_panels(W), np.empty((0, 0, 0), W.dtype) if W_r is None else pack_panels(W_r), tmp)
        return self.packed


class ForwardRun:
    """The fused forward of one layer direction, run a range of time steps at a time.

    ``run = ForwardRun(mode, h0, c0, weights, gx, mask, reverse)`` takes the
    input projections gx (T, N, G) (b_hh folded in, except for the GRU), which
    the caller may fill chunk by chunk: ``run.steps(t0, t1)`` needs gx[t0:t1]
    and runs times [t0, t1) (in reverse order for the reverse direction), after
    the chunks before them.  ``run.result()`` → ``(y, h_n, c_n, cache)`` as
    :func:`sequence_forward`.  Chunks let :mod:`bptt.nn.rnn` start layer k+1 on
    the first steps of layer k's output while layer k goes on.
    """

    def __init__(self, mode, h0, c0, weights, gx, mask=None, reverse=False):
        self.mode, self.kind, self.gx = mode, _KIND[mode], gx
        T, N, G = gx.shape
        dtype = gx.dtype
        self.W_hh = np.ascontiguousarray(weights.W_hh, dtype=dtype)
        P = self.W_hh.shape[1]
        self.H = H = G // (4 if self.kind == 2 else 3 if self.kind == 3 else 1)
        self.rev = rev = int(bool(reverse))
        self.proj = weights.W_hr is not None
        self.W_hr = np.ascontiguousarray(weights.W_hr, dtype=dtype) if self.proj else None
        self.has_mask = mask is not None
        self.mask = np.ascontiguousarray(mask, dtype=np.bool_) if self.has_mask else _NO_MASK
        self.b = None
        if self.kind == 3:
            self.b = np.zeros(G, dtype) if weights.b_hh is None else np.ascontiguousarray(weights.b_hh, dtype=dtype)

        self.hs = np.empty((T + 1, N, P), dtype)  # states, time order (see module docstring)
        self.hs[T if rev else 0] = h0
        self.cs = None
        if self.kind == 2:
            self.cs = np.empty((T + 1, N, H), dtype)
            self.cs[T if rev else 0] = c0
        self.y = np.empty((T, N, P), dtype)
        self.gates = np.empty((T, N, G), dtype)
        self.aux = np.empty((T, N, H), dtype) if self.kind >= 2 else None
        self.m_all = np.empty((T, N, H), dtype) if self.proj else None
        self.small = N * G * P <= _SMALL_MACS
        self.macs = N * G * P
        # transposed once per sequence: the products read them untransposed (faster in BLAS)
        self.WhhT = np.ascontiguousarray(self.W_hh.T)
        self.WhrT = np.ascontiguousarray(self.W_hr.T) if self.proj else self.gates[0, :0, :0]
        self.panels = _Panels()

    def steps(self, t0, t1):
        """Run times [t0, t1) (t1−1 down to t0 in the reverse direction)."""
        kind, rev, proj, dtype = self.kind, self.rev, self.proj, self.gx.dtype
        panels = self.panels.get(self.small, self.macs, (self.WhhT, self.WhrT if proj else None))
        gemm = None if self.small or panels else _gemm_function(dtype)
        if self.small or panels or gemm is not None:
            none = self.gates[:0, :0, :0]
            WhhP, WhrP, tmp = panels or (none, none, none.reshape(0, 0))
            with _step_blas_limit(self.macs):
                _forward_loop(
                    kind, rev, t0, t1, gemm, dtype.type(1), dtype.type(0), self.gx, self.WhhT,
                    self.b if kind == 3 else self.gates[0, 0, :0], self.WhrT, self.hs,
                    self.cs if self.cs is not None else none, self.y, self.gates,
                    self.aux if self.aux is not None else none, self.m_all if proj else none, self.mask,
                    self.has_mask, proj, WhhP, WhrP, tmp,
                )
            return
        # no BLAS callable from compiled code: the loop in Python, BLAS through NumPy
        with _step_blas_limit(self.macs):
            N, G = self.gx.shape[1], self.gx.shape[2]
            a = np.empty((N, G), dtype)
            WhhT = self.WhhT
            h_new = np.empty((N, self.hs.shape[2]), dtype) if proj else None
            hs, cs, y, gx, gates, aux, mask, has_mask = self.hs, self.cs, self.y, self.gx, self.gates, self.aux, self.mask, self.has_mask
            for t in (range(t1 - 1, t0 - 1, -1) if rev else range(t0, t1)):
                np.matmul(hs[t + rev], WhhT, out=a)  # a = h_{t−1} W_hhᵀ  (BLAS)
                if kind == 2:
                    _lstm_fw_step(t, rev, a, gx, hs, cs, y, gates, aux, self.m_all if proj else aux, mask, has_mask, proj)
                    if proj:
                        np.matmul(self.m_all[t], self.WhrT, out=h_new)  # h̃_t = m_t W_hrᵀ
                        _merge_step(t, rev, h_new, hs, y, mask, has_mask)
                elif kind == 3:
                    _gru_fw_step(t, rev, a, gx, self.b, hs, y, gates, aux, mask, has_mask)
                else:
                    _rnn_fw_step(t, rev, a, gx, hs, y, gates, mask, has_mask, kind == 1)

    def result(self):
        T, rev = self.y.shape[0], self.rev
        h_n = self.hs[0] if rev else self.hs[T]
        c_n = None if self.cs is None else (self.cs[0] if rev else self.cs[T])
        cache = KernelCache(self.mode, bool(rev), self.mask if self.has_mask else None, self.hs[rev : T + rev],
                            self.hs, self.cs, self.gates, self.aux, self.m_all, self.small)
        return self.y, h_n, c_n, cache


def sequence_forward(mode, gx, h0, c0, weights, mask=None, reverse=False):
    """Fused :func:`bptt.nn.recurrence.sequence_forward`: same arguments, same results."""
    dtype = np.asarray(gx).dtype
    gx, b_hh = _prepare(mode, gx, weights, dtype)
    run = ForwardRun(mode, h0, c0, weights._replace(b_hh=b_hh), gx, mask, reverse)
    run.steps(0, gx.shape[0])
    return run.result()


class BackwardRun:
    """The fused backward of one layer direction, a range of time steps at a time.

    ``run = BackwardRun(dy, dh_n, dc_n, cache, weights)``; the caller may fill
    dy (T, N, P) chunk by chunk: ``run.steps(t0, t1)`` needs dy[t0:t1] and runs
    times t1−1 down to t0 (t0 up to t1−1 in the reverse direction), after the
    chunks that come before them in that order.  ``run.result()`` →
    ``(dgx, dgh, dh_0, dc_0, dW_hr)`` as :func:`sequence_backward`.  dgx is
    written over ``cache.gates``: a cache serves one backward pass.
    """

    def __init__(self, dy, dh_n, dc_n, cache: KernelCache, weights):
        self.cache = cache
        self.dtype = dtype = cache.gates.dtype
        self.dy = dy
        T, N, P = dy.shape
        self.kind = kind = _KIND[cache.mode]
        self.W_hh = np.ascontiguousarray(weights.W_hh, dtype=dtype)
        G = self.W_hh.shape[0]
        self.H = H = G // (4 if kind == 2 else 3 if kind == 3 else 1)
        self.rev = int(cache.reverse)
        self.proj = weights.W_hr is not None
        self.W_hr = np.ascontiguousarray(weights.W_hr, dtype=dtype) if self.proj else None
        self.has_mask = cache.mask is not None
        self.mask = cache.mask if self.has_mask else _NO_MASK
        self.dh = np.zeros((N, P), dtype) if dh_n is None else np.array(dh_n, dtype=dtype)  # a copy updated in place
        self.dc = None
        if kind == 2:
            self.dc = np.zeros((N, H), dtype) if dc_n is None else np.array(dc_n, dtype=dtype)
        # ∂L/∂a_t overwrites the activated gates of step t, which the backward step reads just
        # before (the forward cache is consumed): one (T, N, G) buffer less at the peak
        self.dgx = cache.gates
        self.dgh = np.empty((T, N, G), dtype) if kind == 3 else self.dgx
        self.dh_all = np.empty((T, N, P), dtype) if self.proj else None
        self.macs = N * G * P
        self.panels = _Panels()

    def steps(self, t0, t1):
        """Run times t1−1 down to t0 (t0 up to t1−1 in the reverse direction)."""
        c, kind, rev, proj = self.cache, self.kind, self.rev, self.proj
        dy, dh, dc, dgx, dgh, dh_all, mask, has_mask = (self.dy, self.dh, self.dc, self.dgx, self.dgh, self.dh_all,
                                                        self.mask, self.has_mask)
        panels = self.panels.get(c.small, self.macs, (self.W_hh, self.W_hr if proj else None))
        gemm = None if c.small or panels else _gemm_function(self.dtype)
        if c.small or panels or gemm is not None:
            dummy = dgx[:0, :0, :0]
            W_hhP, W_hrP, tmp = panels or (dummy, dummy, dummy.reshape(0, 0))
            with _step_blas_limit(self.macs):
                _backward_loop(
                    kind, rev, t0, t1, gemm, self.dtype.type(1), self.dtype.type(0), dy, dh,
                    dc if dc is not None else dgx[0, :0, :0], self.W_hh, self.W_hr if proj else dgx[0, :0, :0], c.hs,
                    c.cs if c.cs is not None else dummy, c.gates, c.aux if c.aux is not None else dummy, dgx, dgh,
                    dh_all if proj else dummy, mask, has_mask, proj, W_hhP, W_hrP, tmp,
                )
            return
        # no BLAS callable from compiled code: the loop in Python, BLAS through NumPy
        with _step_blas_limit(self.macs):
            N, P = dh.shape
            prod = np.empty((N, P), self.dtype)
            dm = np.empty((N, self.H), self.dtype) if proj else dh
            W_hh = self.W_hh
            for t in (range(t0, t1) if rev else range(t1 - 1, t0 - 1, -1)):  # the forward order, read backwards
                if kind == 2:
                    if proj:
                        _masked_sum(t, dh, dy, dh_all, mask, has_mask)
                        np.matmul(dh_all[t], self.W_hr, out=dm)  # dm = dh̃ W_hr
                    _lstm_bw_step(t, rev, dy, dh, dc, dm, c.cs, c.gates, c.aux, dgx, mask, has_mask, proj)
                    _product_into_dh(t, dgx[t], W_hh, dh, prod, mask, has_mask, False)
                elif kind == 3:
                    _gru_bw_step(t, rev, dy, dh, c.hs, c.gates, c.aux, dgx, dgh, mask, has_mask)
                    np.matmul(dgh[t], W_hh, out=prod)
                    _merge_grad(t, prod, dh, mask, has_mask, True)
                else:
                    _rnn_bw_step(t, dy, dh, c.gates, dgx, mask, has_mask, kind == 1)
                    _product_into_dh(t, dgx[t], W_hh, dh, prod, mask, has_mask, False)

    def result(self):
        dW_hr = None
        if self.proj:  # ∂L/∂W_hr = Σ_t dh̃_tᵀ m_t, one product over all steps
            P = self.dh.shape[1]
            dW_hr = self.dh_all.reshape(-1, P).T @ self.cache.m.reshape(-1, self.H)
        return self.dgx, self.dgh, self.dh, self.dc, dW_hr


def sequence_backward(dy, dh_n, dc_n, cache: KernelCache, weights):
    """Fused :func:`bptt.nn.recurrence.sequence_backward`: same arguments, same results
    (the cache's gate buffer becomes dgx, so a cache serves one backward pass)."""
    dy = np.ascontiguousarray(dy, dtype=cache.gates.dtype)
    run = BackwardRun(dy, dh_n, dc_n, cache, weights)
    run.steps(0, dy.shape[0])
    return run.result()


def _product_into_dh(t, da, W_hh, dh, prod, mask_arr, has_mask, add):
    """dh ← m_t ? da W_hh : dh.  Without a mask the product goes straight into dh."""
    if has_mask:
        np.matmul(da, W_hh, out=prod)
        _merge_grad(t, prod, dh, mask_arr, has_mask, add)
    else:
        np.matmul(da, W_hh, out=dh)


def scatter_add_rows(out, ids, rows):
    """out[ids[i]] += rows[i] for i = 0 … M−1 (repeated ids accumulate).   out (V, E), ids (M,), rows (M, E).

    What ``np.add.at(out, ids, rows)`` does, compiled: measured 0.2 ms against
    NumPy's 9 ms for 2,500 rows of 512.  Falls back to ``np.add.at`` without Numba.
    """
    if numba is not None and out.flags.c_contiguous and out.dtype == rows.dtype and out.dtype in (np.float32, np.float64):
        try:
            _scatter_add_rows(out, np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(rows))
            return
        except Exception:  # pragma: no cover - compilation failure: the NumPy way below
            pass
    np.add.at(out, ids, rows)


def softmax_cross_entropy(z, y, grad, scale):
    """Σ_n −log softmax(z_n)_{y_n} (a float) over the rows of z (M, V), and with ``grad``
    (an (M, V) array, or None) grad_n = scale · (softmax(z_n) − onehot(y_n)); y (M,)
    integers in [0, V), checked by the caller.  None without Numba (the caller then
    computes it with NumPy: :func:`bptt.nn.losses.cross_entropy`).

    The compiled loop makes two passes over each row of logits (max; exponentials, sum
    and gradient) where NumPy makes about eight whole-array passes (max, subtract, exp,
    sum, log, gather, exp, scale): for the char model's 2,500 × 65 logits, loss and
    gradient, measured 0.54 → 0.26 ms in float32 and 1.5 → 0.35 ms in float64.
    """
    if numba is None or z.dtype not in (np.float32, np.float64):
        return None
    z = np.ascontiguousarray(z)
    out = grad if grad is not None else z[:0]
    return float(_softmax_xent_rows(z, np.ascontiguousarray(y, dtype=np.int64), out, z.dtype.type(scale)))


def _flat(*arrays):
    """Flat views of C-contiguous arrays of one float dtype, or None (the caller uses NumPy)."""
    dtype = arrays[0].dtype
    if numba is None or dtype not in (np.float32, np.float64):
        return None
    if any(a.dtype != dtype or not a.flags.c_contiguous for a in arrays):
        return None
    return [a.reshape(-1) for a in arrays]


def rmsprop_step(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum) -> bool:
    """One non-centered RMSprop update of ``p`` in place (buffers sq, buf — None when μ = 0 —
    updated too), compiled; False (nothing done) when the arrays do not suit it."""
    flat = _flat(p, g, sq) if buf is None else _flat(p, g, sq, buf)
    if flat is None:
        return False
    c = p.dtype.type
    _rmsprop_step(*flat[:3], flat[3] if buf is not None else flat[0][:0], c(lr), c(alpha), c(1.0 - alpha), c(eps),
                  c(weight_decay), c(momentum))
    return True


def adam_step(p, g, m, v, vmax, step_size, b1, b2, eps, weight_decay, bias2_sqrt) -> bool:
    """One Adam update of ``p`` in place (see ``_adam_step``; vmax None without AMSGrad),
    compiled; False (nothing done) when the arrays do not suit it."""
    flat = _flat(p, g, m, v) if vmax is None else _flat(p, g, m, v, vmax)
    if flat is None:
        return False
    c = p.dtype.type
    _adam_step(*flat[:4], flat[4] if vmax is not None else flat[0][:0], c(step_size), c(b1), c(1.0 - b1), c(b2),
               c(1.0 - b2), c(eps), c(weight_decay), c(bias2_sqrt), vmax is not None)
    return True


# ============================================================================ BLAS for compiled code
_GEMM: dict = {}  # dtype char -> ctypes ?gemm function or None


def _gemm_function(dtype):
    """NumPy's own BLAS ``cblas_?gemm`` as a ctypes function the compiled loops can call, or None.

    Found through threadpoolctl (the library file NumPy loaded) under the names
    NumPy's wheels (``scipy_cblas_sgemm64_``, 64-bit integers) and other builds
    (``cblas_sgemm64_``, ``cblas_sgemm``) use, and checked on a small product
    before use.  None (BPTT_KERNEL_BLAS=0, or nothing found) keeps the time loop
    in Python with ``np.matmul`` per step.
    """
    key = np.dtype(dtype).char
    if key not in _GEMM:
        fn = None
        if numba is not None and os.environ.get("BPTT_KERNEL_BLAS", "1") != "0":
            try:
                fn = _load_gemm(key)
            except Exception:  # any surprise: keep the NumPy route
                fn = None
        _GEMM[key] = fn
    return _GEMM[key]


def _load_gemm(key):
    import ctypes

    libs = _blas_controllers()
    if libs is None:
        return None
    t, real = ("s", ctypes.c_float) if key == "f" else ("d", ctypes.c_double)
    dtype = np.dtype(key)
    for controller in libs.lib_controllers:
        lib = ctypes.CDLL(controller.filepath)
        for name in (f"scipy_cblas_{t}gemm64_", f"cblas_{t}gemm64_", f"cblas_{t}gemm"):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            integer = ctypes.c_int64 if name.endswith("64_") else ctypes.c_int
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real, ctypes.c_void_p,
                           integer, ctypes.c_void_p, integer, real, ctypes.c_void_p, integer]
            rng = np.random.default_rng(0)
            A, B = rng.standard_normal((3, 5)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
            out = np.zeros((3, 4), dtype)
            _times(fn, dtype.type(1), dtype.type(0), A, np.ascontiguousarray(B.T), np.empty((0, 0, 0), dtype),
                   np.empty((0, 0), dtype), out)  # compiled, as used
            if np.allclose(out, A @ B.T, rtol=1e-5, atol=1e-5):
                return fn
    return None


# ============================================================================ availability
_STATE: dict = {}  # (mode, dtype) -> None when ready, else the reason it is not


def _warm_up(mode, dtype):
    """Compile (or load from Numba's on-disk cache) the kernels of one mode and dtype."""
    from bptt.nn.recurrence import Weights

    rng = np.random.default_rng(0)
    g = 4 if mode == "lstm" else 3 if mode == "gru" else 1
    for N, H in ((1, 2), (64, 32)):  # the compiled-loop path, then the BLAS-loop path
        P = H
        W = Weights(rng.standard_normal((g * H, P)).astype(dtype), rng.standard_normal(g * H).astype(dtype),
                    rng.standard_normal((P, H)).astype(dtype) if mode == "lstm" else None)
        gx = rng.standard_normal((2, N, g * H)).astype(dtype)
        c0 = np.zeros((N, H), dtype) if mode == "lstm" else None
        y, _, _, cache = sequence_forward(mode, gx, np.zeros((N, P), dtype), c0, W, np.ones((2, N), bool), False)
        sequence_backward(np.ones_like(y), None, None, cache, W)


def available(mode="lstm", dtype=np.float32) -> bool:
    """True when the fused kernels of ``mode``/``dtype`` compile (the first call compiles or loads the cache)."""
    key = (mode, np.dtype(dtype))
    if key not in _STATE:
        if numba is None:
            _STATE[key] = "numba is not installed"
        elif mode not in _MODES or key[1] not in (np.float32, np.float64):
            _STATE[key] = f"no fused kernel for mode={mode!r}, dtype={key[1]}"
        else:
            try:
                _warm_up(mode, key[1])
                _STATE[key] = None
            except Exception as exc:  # compilation failed: fall back to the reference loop
                _STATE[key] = f"{type(exc).__name__}: {exc}"
    return _STATE[key] is None


def sequence_impl(mode, dtype, required=False):
    """``(sequence_forward, sequence_backward)`` for ``mode`` and ``dtype``, or None.

    None means "use bptt.nn.recurrence" (Numba missing or failing to compile); with
    ``required=True`` that raises RuntimeError instead.
    """
    if available(mode, dtype):
        return sequence_forward, sequence_backward
    if required:
        raise RuntimeError(f"fused kernels are not available: {_STATE[(mode, np.dtype(dtype))]}")
    return None


# ============================================================================ one step of a stacked layer
def layer_step(mode, params, x, h0, c0):
    """One time step through every layer of a unidirectional stack, for sampling.

    params: per layer (W_ih (G, D_k), b_ih, W_hh (G, P), b_hh, W_hr or None);
    x (N, D); h0 (L, N, P); c0 (L, N, H) or None.
    Returns y (N, P), h_n (L, N, P), c_n (L, N, H) or None — what
    ``RNNBase.forward`` returns for a one-step sequence, without its bookkeeping:
    per layer two BLAS products (x W_ihᵀ, h W_hhᵀ) and one fused step, T = 1.
    """
    kind = _KIND[mode]
    dtype = x.dtype
    N = x.shape[0]
    L, _, P = h0.shape
    h_n = np.empty_like(h0)
    c_n = None if c0 is None else np.empty_like(c0)
    W_hh = params[-1][2]
    if W_hh.nbytes >= _STEP_THREADS_BYTES:  # memory-bound products: more cores, more bandwidth
        limit = contextlib.nullcontext()
    else:
        limit = _step_blas_limit(N * W_hh.shape[0] * P)
    with limit:
        return _layer_step(kind, params, x, h0, c0, h_n, c_n, dtype, N, L, P)


# One step at a small batch (sampling) is a few matrix–vector products, limited by how
# fast the weights stream from memory, not by arithmetic.  Once a layer's recurrent
# weights outgrow a core's cache a second BLAS thread adds bandwidth: measured per
# character of a 2-layer LSTM (N = 1), one thread against BLAS's two: H = 384
# (2.4 MB) 540 → 324 µs, H = 512 (4.2 MB) 745 → 493 µs, H = 1024 4533 → 1555 µs;
# at H = 128 and 256 (≤ 1 MB) no difference.  Below this size the one-thread rule of
# _step_blas_limit stands.
_STEP_THREADS_BYTES = 2 * 1024 * 1024


def _layer_step(kind, params, x, h0, c0, h_n, c_n, dtype, N, L, P):
    inp = x
    for k in range(L):
        W_ih, b_ih, W_hh, b_hh, W_hr = params[k]
        G = W_hh.shape[0]
        gx = np.empty((1, N, G), dtype)
        np.matmul(inp, W_ih.T, out=gx[0])  # x W_ihᵀ
        if b_ih is not None:
            gx[0] += b_ih
        a = np.empty((N, G), dtype)
        np.matmul(h0[k], W_hh.T, out=a)  # h_{t−1} W_hhᵀ
        hs = np.empty((2, N, P), dtype)
        hs[0] = h0[k]
        y = np.empty((1, N, P), dtype)
        if kind == 3:
            b = np.zeros(G, dtype) if b_hh is None else b_hh
            gates, aux = np.empty((1, N, G), dtype), np.empty((1, N, P), dtype)
            _gru_fw_step(0, 0, a, gx, b, hs, y, gates, aux, _NO_MASK, False)
        else:
            if b_hh is not None:
                gx[0] += b_hh
            gates = np.empty((1, N, G), dtype)
            if kind == 2:
                H = c0.shape[2]
                cs = np.empty((2, N, H), dtype)
                cs[0] = c0[k]
                aux = np.empty((1, N, H), dtype)
                proj = W_hr is not None
                m = np.empty((1, N, H), dtype) if proj else aux
                _lstm_fw_step(0, 0, a, gx, hs, cs, y, gates, aux, m, _NO_MASK, False, proj)
                if proj:
                    np.matmul(m[0], W_hr.T, out=hs[1])  # h̃ = m W_hrᵀ
                    y[0] = hs[1]
                c_n[k] = cs[1]
            else:
                _rnn_fw_step(0, 0, a, gx, hs, y, gates, _NO_MASK, False, kind == 1)
        h_n[k] = hs[1]
        inp = y[0]
    return inp, h_n, c_n
