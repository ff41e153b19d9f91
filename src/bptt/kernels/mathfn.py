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
* ``normal_cdf32(x)`` = Φ(x) = ½ (1 + erf(x/√2)) for float32 x (the exact GELU's), branch-free,
  absolute error < 6e-8, as small as the float32 formula ½ (1 + erff(z))'s (whose 1 + erf cancels
  for x < 0, where this one does not); ``act_normal_cdf`` takes it for a float32 argument and
  libm's ``erf`` (exact, not vectorised: ~9 ns an element) for a float64 one.

Also here, for every kernel module: ``JIT``, the ``njit`` options all kernels use,
and ``wide_vectors()``, which asks LLVM for 512-bit vectors in the calling function.
``HAVE_NUMBA`` is False when Numba is missing (then none of the compiled names exist).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["HAVE_NUMBA", "JIT", "wide_vectors", "bits_as_float", "exp_neg", "tanh", "sigmoid", "exp_neg32", "tanh32",
           "sigmoid32", "act_tanh", "act_sigmoid", "act_exp_neg", "normal_cdf32", "normal_cdf_libm",
           "act_normal_cdf", "ERF_SMALL", "ERFC_LOG"]

# Φ(x) = ½ (1 + erf(z)), z = x/√2, for float32 x from two polynomials (coefficients in powers, lowest first),
# fitted by interpolation at Chebyshev nodes (numpy.polynomial.chebyshev.chebfit at the 7 and 9 nodes of
# each interval, cheb2poly, and for P the change of variable back to w) against math.erf / math.erfc:
#   |z| < 1:  erf(z) = z · P(z²), in float64           P of degree 6 in w = z² ∈ [0, 1]   (relative error 1.4e-9)
#   |z| ≥ 1:  erfc(|z|) = exp(−z² + Λ(u)), in float32  Λ ≈ log(e^{z²} erfc(|z|)) of degree 8 in
#             u = (min(|z|, 4) − 2.5) / 1.5 ∈ [−1, 1]                                     (absolute error 1.2e-8)
# Beyond |z| = 4, where erfc < 1.6e-8, Λ is held at its value at 4 (an absolute error in Φ below 1e-10).
ERF_SMALL = (1.1283791658483513e+00, -3.7612626666722343e-01, 1.1283594715180420e-01, -2.6854212011396362e-02,
             5.1890874247889334e-03, -8.0168642982784326e-04, 7.8758750970131777e-05)
ERFC_LOG = (-1.556815266609192, -0.5290210247039795, 0.12623916566371918, -0.036647576838731766,
            0.010961849242448807, -0.0031903053168207407, 0.0008803970995359123, -0.00022749950585421175,
            4.1958399378927425e-05)

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


    # ======================================================================== the normal distribution's CDF
    _P0, _P1, _P2, _P3, _P4, _P5, _P6 = ERF_SMALL
    _L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = (_F32(c) for c in ERFC_LOG)
    _INV_SQRT2, _INV_SQRT2_32 = 1.0 / math.sqrt(2.0), _F32(1.0 / math.sqrt(2.0))
    _FOUR_32, _MID_32, _INV_HALF_WIDTH_32 = _F32(4.0), _F32(2.5), _F32(1.0 / 1.5)

    @njit(inline="always", **JIT)
    def normal_cdf32(x):
        """Φ(x) = ½ (1 + erf(x/√2)) for float32 x, as a float32, branch-free (absolute error < 6e-8).

        With z = x/√2 and w = z²: ½ + ½ z P(w) for |z| < 1, in float64 (in float32 its rounding
        errors reached 1.4 ulp); in the tails from erfc, in float32 and with no cancellation,
        ½ exp(Λ(u) − w) for z ≤ −1 and 1 − ½ exp(Λ(u) − w) for z ≥ 1 (``ERF_SMALL``,
        ``ERFC_LOG``).  Both are computed and one is selected, so a loop around it vectorises.
        """
        z = x * _INV_SQRT2_32
        w = z * z
        a = abs(z)
        z64 = np.float64(x) * _INV_SQRT2
        w64 = z64 * z64
        small = _F32(0.5 + 0.5 * z64 * (_P0 + w64 * (_P1 + w64 * (_P2 + w64 * (_P3 + w64 * (_P4 + w64 * (
            _P5 + w64 * _P6)))))))
        u = (min(a, _FOUR_32) - _MID_32) * _INV_HALF_WIDTH_32
        lam = _L0 + u * (_L1 + u * (_L2 + u * (_L3 + u * (_L4 + u * (_L5 + u * (_L6 + u * (_L7 + u * _L8)))))))
        tail = _HALF_32 * exp_neg32(lam - w)  # ½ erfc(|z|)
        big = _ONE_32 - tail if z >= _ZERO_32 else tail
        return small if a < _ONE_32 else big

    @njit(inline="always", **JIT)
    def normal_cdf_libm(x):
        """Φ(x) = ½ (1 + erf(x/√2)) in float64 with the C library's erf: the NumPy reference's formula."""
        return 0.5 * (1.0 + math.erf(x * _INV_SQRT2))

    def act_normal_cdf(x):  # pragma: no cover
        raise NotImplementedError

    @overload(act_normal_cdf, inline="always")
    def _ov_act_normal_cdf(x):
        """Φ(x) in x's type: the polynomial one for float32, libm's erf for float64."""
        return (lambda x: normal_cdf32(x)) if x == types.float32 else (lambda x: normal_cdf_libm(x))
