"""Vectorisable transcendental functions for the compiled kernels, and the Numba plumbing they share.

Shape legend: none — scalar functions, inlined into the element loops of
:mod:`bptt.kernels.steps` and :mod:`bptt.kernels.fused` (x a float32 or float64 scalar).

A call to libm's ``tanh`` per element would cost ~20 ns and dominate a step; these
are branch-free polynomials that LLVM vectorises with the loop around them:

* ``exp_neg(x)`` = eˣ for x ≤ 0 in float64: x = k ln2 + r, |r| ≤ ln2/2, eʳ by its
  Taylor series to r¹² (error < 2e-16), 2ᵏ written into the exponent bits
  (``bits_as_float``); ``tanh`` and ``sigmoid`` built on it without overflow.
* ``exp_neg32`` / ``tanh32`` / ``sigmoid32``: the same in float32 with a 7th-order
  polynomial (truncation < 6e-9, below float32's rounding), twice the vector lanes.
* ``act_tanh`` / ``act_sigmoid`` / ``act_exp_neg``: call these from compiled code;
  each picks the version matching its argument's type when the caller is compiled.

Also here, for every kernel module: ``JIT``, the ``njit`` options all kernels use,
and ``wide_vectors()``, which asks LLVM for 512-bit vectors in the calling function.
``HAVE_NUMBA`` is False when Numba is missing (then none of the compiled names exist).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["HAVE_NUMBA", "JIT", "wide_vectors", "bits_as_float", "exp_neg", "tanh", "sigmoid", "exp_neg32", "tanh32",
           "sigmoid32", "act_tanh", "act_sigmoid", "act_exp_neg"]

try:  # Numba is a dependency, but the reference loop must work without it
    import numba
    from llvmlite import ir as _ir
    from numba import njit, types
    from numba.extending import intrinsic, overload
except Exception:  # pragma: no cover - exercised only without numba
    numba = None

HAVE_NUMBA = numba is not None

if HAVE_NUMBA:
    # error_model="numpy": no division checks, so loops vectorise.  fastmath "contract" only: a·b + c
    # may become one fused multiply-add (one rounding instead of two), nothing else is relaxed.
    JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})

    @intrinsic
    def wide_vectors(typingctx):
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
    def bits_as_float(typingctx, i):
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

    @njit(inline="always", **JIT)
    def exp_neg(x):
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
        return p * bits_as_float((np.int64(k) + 1023) << 52)

    @njit(inline="always", **JIT)
    def tanh(x):
        """tanh(x) = sign(x) (1 − e^{−2|x|}) / (1 + e^{−2|x|}), in float64."""
        x = float(x)
        e = exp_neg(-2.0 * abs(x))
        t = (1.0 - e) / (1.0 + e)
        return t if x >= 0.0 else -t

    @njit(inline="always", **JIT)
    def sigmoid(x):
        """σ(x) = 1 / (1 + e^{−x}), via e^{−|x|} so nothing overflows."""
        x = float(x)
        e = exp_neg(-abs(x))
        s = 1.0 / (1.0 + e)
        return s if x >= 0.0 else e * s  # e/(1+e), not 1 − s: no cancellation for x ≪ 0

    # float32 versions: the same formulas in single precision with a 7th-order
    # polynomial (truncation error < 6e-9, below float32's 6e-8 rounding), twice the
    # vector lanes of float64 and fewer terms.  ``act_tanh`` / ``act_sigmoid`` pick
    # the version matching the argument's type when a step function is compiled.
    _F32 = np.float32
    _LOG2E_32, _HALF_32, _ONE_32, _ZERO_32 = _F32(_LOG2E), _F32(0.5), _F32(1.0), _F32(0.0)
    _LN2_HI_32, _LN2_LO_32 = _F32(0.693145751953125), _F32(1.428606765330187e-06)  # hi has 12 bits
    _C2, _C3, _C4, _C5, _C6, _C7 = (_F32(1.0 / math.factorial(k)) for k in range(2, 8))
    _MIN_EXP_32, _TWO_32, _SMALL_32 = _F32(-87.0), _F32(2.0), _F32(0.0625)
    _T3, _T5, _T7 = _F32(-1.0 / 3.0), _F32(2.0 / 15.0), _F32(-17.0 / 315.0)

    @njit(inline="always", **JIT)
    def exp_neg32(x):
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
        return p * bits_as_float(np.int32((np.int32(kf) + 127) << 23))

    @njit(inline="always", **JIT)
    def tanh32(x):
        e = exp_neg32(-_TWO_32 * abs(x))
        t = (_ONE_32 - e) / (_ONE_32 + e)
        if abs(x) < _SMALL_32:  # 1 − e cancels near 0: the odd series instead
            x2 = x * x
            t = abs(x) * (_ONE_32 + x2 * (_T3 + x2 * (_T5 + x2 * _T7)))
        return t if x >= _ZERO_32 else -t

    @njit(inline="always", **JIT)
    def sigmoid32(x):
        e = exp_neg32(-abs(x))
        s = _ONE_32 / (_ONE_32 + e)
        return s if x >= _ZERO_32 else e * s

    # Inlining the overloads (needed for the loops to vectorise) trips a pedantic
    # internal check of Numba's, which warns at compile time about nothing that affects
    # the result; keep it out of users' terminals.
    warnings.filterwarnings("ignore", message=r"(?s).*_ov_act_", category=numba.core.errors.NumbaIRAssumptionWarning)

    def act_tanh(x):  # pragma: no cover - replaced by the overload inside compiled code
        raise NotImplementedError

    def act_sigmoid(x):  # pragma: no cover
        raise NotImplementedError

    @overload(act_tanh, inline="always")
    def _ov_act_tanh(x):
        return (lambda x: tanh32(x)) if x == types.float32 else (lambda x: tanh(x))

    @overload(act_sigmoid, inline="always")
    def _ov_act_sigmoid(x):
        return (lambda x: sigmoid32(x)) if x == types.float32 else (lambda x: sigmoid(x))

    def act_exp_neg(x):  # pragma: no cover
        raise NotImplementedError

    @overload(act_exp_neg, inline="always")
    def _ov_act_exp_neg(x):
        return (lambda x: exp_neg32(x)) if x == types.float32 else (lambda x: exp_neg(x))

