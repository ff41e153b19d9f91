"""The per-step kernels of the recurrent cells: each cell's forward step and its backward side by side.

Shape legend: T time steps, N batch, H hidden units, P the width of h (P = H
unless an LSTM has a projection), G = g·H stacked gate pre-activations in the
order of :data:`bptt.nn.gates.GATES` (RNN: h; LSTM: i, f, g, o; GRU: r, z, n).

A step runs after the loop driver (:mod:`bptt.kernels.loops`) has made the step's
product a = h_{t−1} W_hhᵀ (N, G); it does the element-wise gate maths in one pass
per batch row, reading each pre-activation once and writing the activated gates,
the new state and the output, with no temporaries.  The equations are those of
:mod:`bptt.nn.cells`, in the docstrings below.

Arguments shared by the forward steps: t the time index; rev 1 for the reverse
direction; hs (T+1, N, P) the states in time order, the one entering step t at
hs[t + rev] and the one leaving it at hs[t + 1 − rev]; gates (T, N, G): on entry gates[t] holds the input
pre-activations gx_t = x_t W_ihᵀ + b (b_hh folded in, except the GRU's), on exit the
activated gates kept for the backward (RNN: h̃_t) — activated in place, so a training
forward keeps one (T, N, G) array, not two, and writes no cache lines it has not just
read; y (T, N, P) the outputs; mask (T, N) (read only when has_mask): a padded step
keeps its state and outputs zero.

Arguments shared by the backward steps: dy (T, N, P) ∂L/∂y; dh (N, P) the carried
∂L/∂h_t from step t+1, updated in place to ∂L/∂h_{t−1}; dc (N, H) likewise for the
LSTM cell; dgx (T, N, G) ∂L/∂a_t, written over ``gates`` (see _ALIASED_ROWS); row (≥ G,)
a scratch row of the caller's (the steps allocate nothing: see STEP_JIT).  A
padded step gets zero pre-activation gradients and leaves the carries untouched.

How the loops stay vectorised (each measured; see the comments where they apply):
every gate has a view of its own so each loop runs from 0 (LLVM vectorised those,
not loops over offset ranges such as ``range(2H, 3H)``, which ran 2–4× slower); a
loop writes one output row (LLVM gives up on a loop needing more than 8 run-time
overlap checks); constants have the array's dtype (a float64 ``1.0`` turns float32
arithmetic into float64); a backward step reads its gate row from a scratch copy
(_ALIASED_ROWS below).
"""

from __future__ import annotations

import numpy as np

from bptt.kernels.mathfn import HAVE_NUMBA

__all__ = ["rnn_fw_step", "rnn_bw_step", "lstm_fw_step", "merge_step", "lstm_bw_step", "masked_sum", "gru_fw_step",
           "gru_bw_step", "merge_grad", "rnn_fw", "rnn_bw", "lstm_fw", "lstm_bw", "gru_fw", "gru_bw"]

if HAVE_NUMBA:
    from numba import njit

    from bptt.kernels.mathfn import JIT, act_sigmoid, act_tanh, wide_vectors

    # The step functions allocate nothing (a backward step's scratch row is its caller's), so they are compiled
    # without Numba's reference counting (``_nrt=False``): the row views they make (a[n], gr[:H], …) then cost
    # no atomic increments and decrements.  The LSTM's forward gate step (25×128, float32, one core) took 7.4
    # against 9.8 µs.
    STEP_JIT = dict(JIT, _nrt=False)

    # _ALIASED_ROWS: BackwardRun writes dgx over the forward's gate buffer, so a
    # backward step reads gates[t, n] and writes dgx[t, n] — the same memory.  LLVM's
    # vectorised loop is guarded by a run-time check that the rows do not overlap;
    # they do, so the scalar loop ran (LSTM, N = 50, H = 128: 43 µs a step in
    # place against 11.5 µs into another buffer).  Each step therefore first copies
    # the gate row into a scratch row (one short memcpy, in L1) and reads from it.

    # ======================================================================== padded rows, plain rows
    # Each batch row is a few short loops over 1-d row views that LLVM vectorises (one
    # long loop touching every array would not: too many possible aliases); padded rows
    # are fixed up afterwards by ``_keep_row``.
    @njit(inline="always", **JIT)
    def _keep_row(yr, hnr, hpr):
        """A padded step: y_t = 0, h_t = h_{t−1}."""
        for j in range(hnr.shape[0]):
            yr[j] = 0.0
            hnr[j] = hpr[j]

    @njit(inline="always", **JIT)
    def _copy_row(src, dst):
        """dst = src, element by element (a slice assignment of one array to another needs Numba's runtime)."""
        for j in range(dst.shape[0]):
            dst[j] = src[j]

    @njit(inline="always", **JIT)
    def _emit_row(v, yr, hnr):
        """y_t = h_t = h̃_t."""
        for j in range(hnr.shape[0]):
            yr[j] = v[j]
            hnr[j] = v[j]

    # ======================================================================== Elman RNN
    @njit(**STEP_JIT)
    def rnn_fw_step(t, rev, a, hs, y, gates, mask, has_mask, relu):
        """a_t = gx_t + h_{t−1} W_hhᵀ (``a`` holds the product, gates[t] gx_t);  h̃_t = φ(a_t) (into ``gates``)."""
        wide_vectors()
        N, H = a.shape
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        for n in range(N):
            ar, hr = a[n], gates[t, n]  # hr: gx_t's row, then h̃_t's
            if relu:
                for j in range(H):
                    v = ar[j] + hr[j]
                    hr[j] = v if v > 0.0 else 0.0
            else:
                for j in range(H):
                    hr[j] = act_tanh(ar[j] + hr[j])
            if has_mask and not mask[t, n]:
                _keep_row(y[t, n], hn[n], hp[n])
            else:
                _emit_row(hr, y[t, n], hn[n])

    @njit(**STEP_JIT)
    def rnn_bw_step(t, dy, dh, gates, dgx, row, mask, has_mask, relu):
        """dh̃ = m_t (dh + dy_t);  da = dh̃ ⊙ φ'(a) with φ' = 1 − h̃² (tanh) or [h̃ > 0] (relu)."""
        wide_vectors()
        N, H = dh.shape
        hr = row[:H]  # h̃_t's row, copied (row: the caller's scratch, at least H): see _ALIASED_ROWS
        one, zero = gates.dtype.type(1.0), gates.dtype.type(0.0)  # typed: a float64 1.0 made the float32 maths float64
        for n in range(N):
            dr = dgx[t, n]
            if has_mask and not mask[t, n]:
                dr[:] = 0.0
                continue
            _copy_row(gates[t, n], hr)
            dhr, dyr = dh[n], dy[t, n]
            if relu:
                for j in range(H):
                    d = dhr[j] + dyr[j]
                    dr[j] = d if hr[j] > zero else zero
            else:
                for j in range(H):
                    dr[j] = (dhr[j] + dyr[j]) * (one - hr[j] * hr[j])

    # ======================================================================== LSTM
    # (with a projection, merge_step finishes the forward step and masked_sum starts the backward)
    @njit(**STEP_JIT)
    def lstm_fw_step(t, rev, a, hs, cs, y, gates, tanh_c, m_all, mask, has_mask, proj):
        """One LSTM step after the product a = h_{t−1} W_hhᵀ (gates[t] holds gx_t, then i, f, g, o):

            [a_i a_f a_g a_o] = gx_t + a
            i = σ(a_i)  f = σ(a_f)  g = tanh(a_g)  o = σ(a_o)
            c̃_t = f ⊙ c_{t−1} + i ⊙ g      m_t = o ⊙ tanh(c̃_t)
            c_t = mask ? c̃_t : c_{t−1};  without projection h̃_t = m_t (y_t, h_t as for the RNN);
            with one, m_t is stored and h̃_t = m_t W_hrᵀ follows (``merge_step``).
        """
        wide_vectors()
        N = a.shape[0]
        H = cs.shape[2]
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        cp, cn = cs[t + rev], cs[t + 1 - rev]
        for n in range(N):
            ar, gr = a[n], gates[t, n]  # gr: gx_t's row, activated in place
            for j in range(2 * H):  # i, f
                gr[j] = act_sigmoid(ar[j] + gr[j])
            ag, g = ar[2 * H : 3 * H], gr[2 * H : 3 * H]
            for j in range(H):
                g[j] = act_tanh(ag[j] + g[j])
            ao, o = ar[3 * H :], gr[3 * H :]
            for j in range(H):
                o[j] = act_sigmoid(ao[j] + o[j])
            i, f = gr[:H], gr[H : 2 * H]
            cpr, cnr, tcr = cp[n], cn[n], tanh_c[t, n]
            for j in range(H):  # c̃ = f ⊙ c_{t−1} + i ⊙ g
                cnr[j] = f[j] * cpr[j] + i[j] * g[j]
            for j in range(H):
                tcr[j] = act_tanh(cnr[j])
            mr = m_all[t, n] if proj else y[t, n]  # m_t, or directly h̃_t = y_t
            for j in range(H):
                mr[j] = o[j] * tcr[j]
            keep = has_mask and not mask[t, n]
            if keep:
                _copy_row(cpr, cnr)
            if not proj:
                if keep:
                    _keep_row(y[t, n], hn[n], hp[n])
                else:
                    _copy_row(mr, hn[n])

    @njit(**STEP_JIT)
    def lstm_bw_step(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, row, mask, has_mask, proj):
        """Backward of one LSTM step, the forward read bottom to top:

            dm = m_t (dh + dy_t)      (with a projection: dm = (m_t dh̃) W_hr, given as dm_in)
            do = dm ⊙ tanh(c_t)       dc̃ = dm ⊙ o ⊙ (1 − tanh²(c_t)) + m_t dc
            da_i = dc̃ ⊙ g ⊙ i(1−i)    da_f = dc̃ ⊙ c_{t−1} ⊙ f(1−f)
            da_g = dc̃ ⊙ i ⊙ (1−g²)    da_o = do ⊙ o(1−o)
            dc ← m_t ? dc̃ ⊙ f : dc    (the constant error carousel)
        """
        wide_vectors()
        N = dh.shape[0]
        H = dc.shape[1]
        cp = cs[t + rev]
        gr = row[: gates.shape[2]]  # the gate row, copied (row: the caller's scratch, at least G): see _ALIASED_ROWS
        one = gates.dtype.type(1.0)  # typed: a float64 1.0 made the float32 maths float64
        for n in range(N):
            dr = dgx[t, n]
            if has_mask and not mask[t, n]:
                dr[:] = 0.0
                continue
            _copy_row(gates[t, n], gr)
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

    @njit(**STEP_JIT)
    def merge_step(t, rev, h_new, hs, y, mask, has_mask):
        """y_t = m_t h̃_t;  h_t = m_t ? h̃_t : h_{t−1}   (after the LSTM projection)."""
        wide_vectors()
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        for n in range(h_new.shape[0]):
            if has_mask and not mask[t, n]:
                _keep_row(y[t, n], hn[n], hp[n])
            else:
                _emit_row(h_new[n], y[t, n], hn[n])

    @njit(**STEP_JIT)
    def masked_sum(t, dh, dy, out, mask, has_mask):
        """out_t = m_t (dh + dy_t): the gradient reaching h̃_t (the LSTM projection's output)."""
        wide_vectors()
        N, P = dh.shape
        for n in range(N):
            o = out[t, n]
            if has_mask and not mask[t, n]:
                o[:] = 0.0
            else:
                dhr, dyr = dh[n], dy[t, n]
                for j in range(P):
                    o[j] = dhr[j] + dyr[j]

    # ======================================================================== GRU
    @njit(**STEP_JIT)
    def gru_fw_step(t, rev, a, b_hh, hs, y, gates, gh_n, mask, has_mask):
        """One GRU step after the product a = h_{t−1} W_hhᵀ (gh = a + b_hh; gates[t] holds gx_t, then r, z, n):

            r = σ(gx_r + gh_r)   z = σ(gx_z + gh_z)   n = tanh(gx_n + r ⊙ gh_n)
            h̃_t = (1 − z) ⊙ n + z ⊙ h_{t−1}
        """
        wide_vectors()
        N, H = hs.shape[1], hs.shape[2]
        hp, hn = hs[t + rev], hs[t + 1 - rev]
        for n in range(N):
            ar, gr, ghr = a[n], gates[t, n], gh_n[t, n]  # gr: gx_t's row, activated in place
            for j in range(2 * H):  # r, z
                gr[j] = act_sigmoid(gr[j] + (ar[j] + b_hh[j]))
            an, bn = ar[2 * H :], b_hh[2 * H :]
            for j in range(H):
                ghr[j] = an[j] + bn[j]
            r, z, nr = gr[:H], gr[H : 2 * H], gr[2 * H :]
            for j in range(H):  # n
                nr[j] = act_tanh(nr[j] + r[j] * ghr[j])
            if has_mask and not mask[t, n]:
                _keep_row(y[t, n], hn[n], hp[n])
            else:
                yr, hpr, hnr = y[t, n], hp[n], hn[n]
                for j in range(H):
                    yr[j] = nr[j] + z[j] * (hpr[j] - nr[j])
                for j in range(H):
                    hnr[j] = yr[j]

    @njit(**STEP_JIT)
    def gru_bw_step(t, rev, dy, dh, hs, gates, gh_n, dgx, dgh_n, dgh, row, mask, has_mask):
        """Backward of one GRU step:

            dh̃ = m_t (dh + dy_t)
            da_n = dh̃ ⊙ (1 − z) ⊙ (1 − n²)     da_r = da_n ⊙ gh_n ⊙ r(1−r)
            da_z = dh̃ ⊙ (h_{t−1} − n) ⊙ z(1−z)
            dgx = [da_r, da_z, da_n],  dgh = [da_r, da_z, da_n ⊙ r]
            dh ← m_t ? dh̃ ⊙ z (+ dgh W_hh, added by ``merge_grad``) : dh

        dgx[t] (N, G) is kept for the weight gradients, and of dgh only the part that differs
        from dgx, dgh_n[t] = da_n ⊙ r (N, H); the whole dgh row goes to ``dgh`` (N, G), one
        step's scratch for the product with W_hh.  dgh_n may be gh_n itself (BackwardRun writes
        it over the forward's): each row of gh_n is read (for da_r) before the row of dgh_n is
        written, in separate loops, so no loop reads and writes the same memory (_ALIASED_ROWS).
        """
        wide_vectors()
        N, H = dh.shape
        hp = hs[t + rev]
        gr = row[: gates.shape[2]]  # the gate row, copied (row: the caller's scratch, at least G): see _ALIASED_ROWS
        one = gates.dtype.type(1.0)  # typed: a float64 1.0 made the float32 maths float64
        for n in range(N):
            xr, hr, nr = dgx[t, n], dgh[n], dgh_n[t, n]
            if has_mask and not mask[t, n]:
                xr[:] = 0.0
                hr[:] = 0.0
                nr[:] = 0.0
                continue
            _copy_row(gates[t, n], gr)
            dhr, dyr, ghr, hpr = dh[n], dy[t, n], gh_n[t, n], hp[n]
            r, z, nn = gr[:H], gr[H : 2 * H], gr[2 * H :]  # views: loops from 0 vectorise
            da_r, da_z, da_n, hr_n = xr[:H], xr[H : 2 * H], xr[2 * H :], hr[2 * H :]
            # one output per loop, as in lstm_bw_step
            for j in range(H):
                dhr[j] += dyr[j]  # dh̃
            for j in range(H):
                da_n[j] = dhr[j] * (one - z[j]) * (one - nn[j] * nn[j])
            for j in range(H):
                da_r[j] = da_n[j] * ghr[j] * (r[j] * (one - r[j]))
            for j in range(H):
                da_z[j] = dhr[j] * (hpr[j] - nn[j]) * (z[j] * (one - z[j]))
            for j in range(H):
                nr[j] = da_n[j] * r[j]
            for j in range(H):
                dhr[j] *= z[j]  # the direct path h_{t−1} → h̃_t
            for j in range(2 * H):
                hr[j] = xr[j]
            for j in range(H):
                hr_n[j] = nr[j]

    # ======================================================================== every cell
    # the carried gradient after the product with W_hh
    @njit(**STEP_JIT)
    def merge_grad(t, prod, dh, mask, has_mask, add):
        """dh ← m_t ? prod (+ dh if add) : dh — the carried gradient after the product with W_hh."""
        wide_vectors()
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

    # ======================================================================== the flags as constants
    # Numba compiles a function once per tuple of argument types, and a bool written as a constant
    # is a type of its own (Literal[bool]): each branch below calls a version of the step compiled
    # for those flags, the other paths' code left out.  Called with run-time flags, the one version
    # keeps every path and its loops vectorise less: the RNN's forward gate step (25×256, float32,
    # one core) took 5.6 against 3.3 µs.  The time loops call these.
    @njit(inline="always", **JIT)
    def rnn_fw(t, rev, a, hs, y, gates, mask, has_mask, relu):
        """:func:`rnn_fw_step` with ``has_mask`` and ``relu`` compiled in."""
        if has_mask:
            if relu:
                rnn_fw_step(t, rev, a, hs, y, gates, mask, True, True)
            else:
                rnn_fw_step(t, rev, a, hs, y, gates, mask, True, False)
        elif relu:
            rnn_fw_step(t, rev, a, hs, y, gates, mask, False, True)
        else:
            rnn_fw_step(t, rev, a, hs, y, gates, mask, False, False)

    @njit(inline="always", **JIT)
    def rnn_bw(t, dy, dh, gates, dgx, row, mask, has_mask, relu):
        """:func:`rnn_bw_step` with ``has_mask`` and ``relu`` compiled in."""
        if has_mask:
            if relu:
                rnn_bw_step(t, dy, dh, gates, dgx, row, mask, True, True)
            else:
                rnn_bw_step(t, dy, dh, gates, dgx, row, mask, True, False)
        elif relu:
            rnn_bw_step(t, dy, dh, gates, dgx, row, mask, False, True)
        else:
            rnn_bw_step(t, dy, dh, gates, dgx, row, mask, False, False)

    @njit(inline="always", **JIT)
    def lstm_fw(t, rev, a, hs, cs, y, gates, tanh_c, m_all, mask, has_mask, proj):
        """:func:`lstm_fw_step` with ``has_mask`` and ``proj`` compiled in."""
        if has_mask:
            if proj:
                lstm_fw_step(t, rev, a, hs, cs, y, gates, tanh_c, m_all, mask, True, True)
            else:
                lstm_fw_step(t, rev, a, hs, cs, y, gates, tanh_c, m_all, mask, True, False)
        elif proj:
            lstm_fw_step(t, rev, a, hs, cs, y, gates, tanh_c, m_all, mask, False, True)
        else:
            lstm_fw_step(t, rev, a, hs, cs, y, gates, tanh_c, m_all, mask, False, False)

    @njit(inline="always", **JIT)
    def lstm_bw(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, row, mask, has_mask, proj):
        """:func:`lstm_bw_step` with ``has_mask`` and ``proj`` compiled in."""
        if has_mask:
            if proj:
                lstm_bw_step(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, row, mask, True, True)
            else:
                lstm_bw_step(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, row, mask, True, False)
        elif proj:
            lstm_bw_step(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, row, mask, False, True)
        else:
            lstm_bw_step(t, rev, dy, dh, dc, dm_in, cs, gates, tanh_c, dgx, row, mask, False, False)

    @njit(inline="always", **JIT)
    def gru_fw(t, rev, a, b_hh, hs, y, gates, gh_n, mask, has_mask):
        """:func:`gru_fw_step` with ``has_mask`` compiled in."""
        if has_mask:
            gru_fw_step(t, rev, a, b_hh, hs, y, gates, gh_n, mask, True)
        else:
            gru_fw_step(t, rev, a, b_hh, hs, y, gates, gh_n, mask, False)

    @njit(inline="always", **JIT)
    def gru_bw(t, rev, dy, dh, hs, gates, gh_n, dgx, dgh_n, dgh, row, mask, has_mask):
        """:func:`gru_bw_step` with ``has_mask`` compiled in."""
        if has_mask:
            gru_bw_step(t, rev, dy, dh, hs, gates, gh_n, dgx, dgh_n, dgh, row, mask, True)
        else:
            gru_bw_step(t, rev, dy, dh, hs, gates, gh_n, dgx, dgh_n, dgh, row, mask, False)
