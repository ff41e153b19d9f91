"""Recurrent layers: stacked, bidirectional RNN / LSTM / GRU over whole sequences.  Constructor signatures, shapes and parameter names are
PyTorch's, so ``layer.load_state_dict(torch_layer.state_dict())`` just works.

Shape legend: T time steps, N batch, D input features, H hidden units,
P = proj_size or H (the width of h), L layers, K = 2 if bidirectional else 1,
G = g·H stacked gates (g = 1 RNN, 4 LSTM, 3 GRU), V vocabulary, E embedding size.

A recurrent layer's forward, per layer k and direction d::

    gx = X_k W_ihᵀ + b_ih                      one matrix product for all T steps   (T, N, G)
    y, h_n = the time loop over gx             bptt.nn.recurrence (or the fused kernel)
    X_{k+1} = dropout([y_forward, y_reverse])  features concatenated                 (T, N, K·P)

(run chunk by chunk as a wavefront over the layers when there are cores to spare,
see :mod:`bptt.runtime.wavefront`, or on slices of the batch, one thread each, see
:func:`bptt.runtime.policy.batch_parts`), and its backward, the same read upwards::

    dgx, dgh, dh_0 = the time loop backwards
    ∂L/∂W_ih = dgxᵀ X_k,  ∂L/∂W_hh = dghᵀ H_prev    one matrix product each over all T·N rows
    ∂L/∂X_k  = Σ_d dgx W_ih
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import numpy as np

from bptt.nn import gates, recurrence
from bptt.nn.regularized_loop import Regularization, check_options, option_hint
from bptt.nn.cells import resolve_rng, uniform_init
from bptt.nn.batch_slices import ZerosOnDemand, add_gram, matmul_into, run_slices
from bptt.nn.module import Module, as_float_array
from bptt.nn.ops import dropout_mask, lengths_to_mask, scatter_add_rows
from bptt.nn.prepared import input_product, prepare
from bptt.runtime import policy
from bptt.runtime import threads as runtime_threads
from bptt.runtime.threads import keep_freed_memory, single_thread_blas

__all__ = ["RNN", "LSTM", "GRU", "RNNBase"]


class _LayerCache(NamedTuple):
    x: np.ndarray  # (T, N, D_k) this layer's input, after dropout (layer 0 with one_hot: the indices (T, N))
    drop: np.ndarray | None  # (T, N, D_k) the dropout mask applied to it, if any
    directions: list  # one recurrence.SequenceCache (or kernels.KernelCache) per direction


class _Context(NamedTuple):
    layers: list | None  # one _LayerCache per layer; None: the forward kept nothing for a backward
    batched: bool
    out_shape: tuple
    one_hot: bool  # the input was indices (see forward)
    chunks: list  # [(t0, t1)]: the time chunks the forward ran in (bptt.runtime.wavefront)
    threads: int
    parts: list  # [(batch slice, _Context of that slice)] when the batch ran split in threads, else []
    outside: object = None  # regularized_loop.Outside: the regularisers outside the loop, in training; else None


def _shifted(shift, j):
    """Whether chunk j's product for layer k+1 is made in layer k's thread: on every other
    chunk when the layers run shifted (one-hot input, see RNNBase.forward)."""
    return shift and j % 2 == 0


class RNNBase(Module):
    """Stacked, optionally bidirectional recurrent layer (the common part of RNN, LSTM, GRU).

    ``forward(x, state=None, lengths=None, *, one_hot=False)`` → ``(output, h_n)`` or, for
    the LSTM, ``(output, (h_n, c_n))``:

        x       (T, N, D), or (N, T, D) with batch_first, or unbatched (T, D)
        state   h_0 (L·K, N, P)  [LSTM: (h_0, c_0) with c_0 (L·K, N, H)]; zeros if None
        lengths (N,) valid steps per sequence, any order; outputs are zero past them
        one_hot x is integer indices (T, N) standing for one-hot vectors (see forward)
        output  (T, N, K·P) (batch_first: (N, T, K·P); unbatched: (T, K·P))
        h_n     (L·K, N, P) taken at each sequence's last valid step

    ``backward(doutput, dstate=None)`` → ``(dx, dstate_0)`` with the shapes of ``x``
    and ``state``; parameter gradients accumulate into ``self.grads``.

    A forward in eval mode is for inference: on the compiled kernels it keeps none of
    the per-step values a backward reads (gates, states: (T, N, G) and (T+1, N, P) per
    layer and direction), only the outputs and the last state, with the same results bit
    for bit; a backward after it raises.  ``forward(..., need_backward=True)`` keeps them
    in eval mode (``False`` drops them in training mode).  The reference loop
    (``backend = "reference"``) always keeps its per-step caches, which the analyses read.
    """

    mode = "rnn_tanh"

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        dtype=np.float32,
        rng=None,
        **regularization,
    ):
        super().__init__()
        # recurrent_dropout, input_dropout, output_dropout, weight_drop, zoneout, zoneout_c, layer_norm,
        # peephole: see bptt.nn.regularized_loop (checked before anything is built).  Input and output
        # dropout and weight drop alone act outside the time loop: this layer's own path runs them
        # (regularizer.plain_path); any other option runs bptt.nn.regularized_loop's NumPy loop.
        options = check_options(self.mode, proj_size, **regularization)
        for name, v, lo in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1), ("num_layers", num_layers, 1)):
            if int(v) != v or int(v) < lo:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if int(proj_size) < 0 or (proj_size and proj_size >= hidden_size):
            raise ValueError(f"proj_size must be in [0, hidden_size), got {proj_size}")
        if proj_size and self.mode != "lstm":
            raise ValueError("proj_size is only supported by LSTM")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout, self.proj_size = float(dropout), int(proj_size)
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self._dtype}")
        self.rng = resolve_rng(rng)
        self.num_directions = 2 if self.bidirectional else 1
        self.backend = "auto"  # "auto" (fused kernels when available) | "reference" | "fused"

        H, P, G = self.hidden_size, self.out_size, self.gate_count * self.hidden_size
        bound = 1.0 / np.sqrt(H)
        for k in range(self.num_layers):
            D_k = self.input_size if k == 0 else self.num_directions * P
            for sfx in self._suffixes():
                self.add_param(f"weight_ih_l{k}{sfx}", uniform_init(self.rng, (G, D_k), bound, self._dtype))  # (G, D_k)
                self.add_param(f"weight_hh_l{k}{sfx}", uniform_init(self.rng, (G, P), bound, self._dtype))  # (G, P)
                if self.bias:
                    self.add_param(f"bias_ih_l{k}{sfx}", uniform_init(self.rng, (G,), bound, self._dtype))  # (G,)
                    self.add_param(f"bias_hh_l{k}{sfx}", uniform_init(self.rng, (G,), bound, self._dtype))  # (G,)
                if self.proj_size:
                    self.add_param(f"weight_hr_l{k}{sfx}", uniform_init(self.rng, (P, H), bound, self._dtype))  # (P, H)
        self._ctx = None
        self.state = None
        # with any option on: its masks and parameters, and the NumPy loop that forward/backward/step
        # hand over to unless regularizer.plain_path (bptt.nn.regularized_loop); else None
        self.regularizer = Regularization(self, options) if options.active else None

    @property
    def _reference_loop(self) -> bool:
        """Whether forward/backward/step hand over to bptt.nn.regularized_loop's NumPy loop."""
        return self.regularizer is not None and not self.regularizer.plain_path

    def load_state_dict(self, state, strict=True):
        try:
            super().load_state_dict(state, strict)
        except ValueError as e:  # name the option that the unexpected or missing keys belong to
            raise type(e)(str(e) + option_hint(set(state) ^ set(self.params))) from None

    # ------------------------------------------------------------------ helpers
    @property
    def gate_count(self) -> int:
        """g, the gates stacked in each weight (1 RNN, 4 LSTM, 3 GRU; :data:`bptt.nn.gates.GATES`)."""
        return gates.gate_count(self.mode)

    @property
    def out_size(self) -> int:
        """P: the width of h (proj_size if set, else hidden_size)."""
        return self.proj_size or self.hidden_size

    def _suffixes(self):
        return ("", "_reverse")[: self.num_directions]

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.regularizer is not None:
            s += "".join(f", {k}={v}" for k, v in self.regularizer.opts._asdict().items() if v)
        return s

    def _direction_params(self, k, d):
        sfx = self._suffixes()[d]
        p = self._own_params
        return p[f"weight_ih_l{k}{sfx}"], p.get(f"bias_ih_l{k}{sfx}"), p[f"weight_hh_l{k}{sfx}"], p.get(f"bias_hh_l{k}{sfx}"), p.get(f"weight_hr_l{k}{sfx}")

    def _direction_grads(self, k, d, g):
        """Layer k, direction d's entries of the gradient dict g (self._own_grads, or a batch slice's own)."""
        sfx = self._suffixes()[d]
        return g[f"weight_ih_l{k}{sfx}"], g.get(f"bias_ih_l{k}{sfx}"), g[f"weight_hh_l{k}{sfx}"], g.get(f"bias_hh_l{k}{sfx}"), g.get(f"weight_hr_l{k}{sfx}")

    def _kernels(self):
        """The fused-kernel module when this layer runs on it, else None (the readable reference loop)."""
        if self.backend == "reference":
            return None
        from bptt import kernels

        if kernels.sequence_impl(self.mode, self._dtype, required=self.backend == "fused") is None:
            return None
        return kernels

    def blas_scope(self, T, N):
        """The context to run a model step around this layer in, for input (T, N, ·).

        When the layer runs in threads of its own (a wavefront, one thread per
        layer, or slices of the batch: :mod:`bptt.runtime.policy`), every BLAS
        product of the step should be single-threaded, the model's own too (see
        :func:`bptt.runtime.threads.single_thread_blas`); otherwise this does nothing.
        """
        if self._reference_loop:
            return contextlib.nullcontext()  # the NumPy reference loop: no threads of its own
        fused = self._kernels() is not None
        if self._time_chunks(T, N, fused)[1] > 1 or len(self._batch_parts(N, fused)) > 1:
            return single_thread_blas()
        return contextlib.nullcontext()

    def batch_slices(self, N):
        """The slices of a batch of N streams this layer would run in threads of its own now, in its
        mode (training or eval), on its kernels, with the cores there are (:func:`bptt.runtime.policy.batch_parts`);
        [slice(0, N)] for none.  A model may run its whole step in these slices instead
        (:meth:`bptt.lm.model.CharLM.train_step`)."""
        if self._reference_loop:
            return [slice(0, N)]
        return self._batch_parts(N, self._kernels() is not None)

    def _batch_parts(self, N, fused):
        """The batch slices to run in threads, each through the whole stack
        (:func:`bptt.runtime.policy.batch_parts`)."""
        macs = N * self.gate_count * self.hidden_size * self.out_size  # one step's product h_{t−1} W_hhᵀ
        return policy.batch_parts(N, macs, self.training, fused)

    def _time_chunks(self, T, N, fused):
        """(time chunks, threads) of the wavefront over the layers (:func:`bptt.runtime.policy.time_chunks`)."""
        macs = N * self.gate_count * self.hidden_size * self.out_size
        return policy.time_chunks(T, macs, self.num_layers, self.bidirectional, fused)

    def _check_input(self, x, one_hot=False):
        name = type(self).__name__
        if one_hot:
            ids = np.asarray(x)
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{name}: one_hot=True expects integer indices, got dtype {ids.dtype}")
            if ids.ndim not in (1, 2):
                layout = "(N, T)" if self.batch_first else "(T, N)"
                raise ValueError(f"{name}: one_hot=True expects indices of shape {layout} or (T,), got {ids.shape}")
            batched = ids.ndim == 2
            ids = ids.T if batched and self.batch_first else ids.reshape(len(ids), -1)
            if ids.size == 0:
                raise ValueError(f"{name} needs at least one time step and one batch item, got shape {ids.shape}")
            if ids.min() < 0 or ids.max() >= self.input_size:
                raise ValueError(f"{name}: one-hot indices must be in [0, {self.input_size}), "
                                 f"got [{ids.min()}, {ids.max()}]")
            return np.ascontiguousarray(ids, dtype=np.intp), batched
        x = as_float_array(x, self._dtype, "input")
        if x.ndim == 2:
            batched = False
            x = x[:, None, :]
        elif x.ndim == 3:
            batched = True
            if self.batch_first:
                x = x.transpose(1, 0, 2)
        else:
            layout = "(N, T, D)" if self.batch_first else "(T, N, D)"
            raise ValueError(f"{name} expects input of shape {layout} or (T, D), got {x.ndim}-d input of shape {x.shape}")
        T, N, D = x.shape
        if D != self.input_size:
            raise ValueError(f"{name} expects {self.input_size} input features, got {D} (input shape {x.shape})")
        if T == 0 or N == 0:
            raise ValueError(f"{name} needs at least one time step and one batch item, got T={T}, N={N}")
        return np.ascontiguousarray(x), batched

    def _check_state(self, s, N, batched, width, name):
        LK = self.num_layers * self.num_directions
        if s is None:
            return np.zeros((LK, N, width), self._dtype)
        s = as_float_array(s, self._dtype, name)
        want = (LK, N, width) if batched else (LK, width)
        if s.shape != want:
            raise ValueError(f"{type(self).__name__}: {name} must have shape {want}, got {s.shape}")
        return np.ascontiguousarray(s.reshape(LK, N, width))

    def _initial_state(self, state, N, batched):
        if self.mode == "lstm":
            if state is None:
                state = (None, None)
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ValueError("LSTM state must be a tuple (h_0, c_0)")
            return (
                self._check_state(state[0], N, batched, self.out_size, "h_0"),
                self._check_state(state[1], N, batched, self.hidden_size, "c_0"),
            )
        if isinstance(state, (tuple, list)):
            raise ValueError(f"{type(self).__name__} state must be one array h_0, not a tuple")
        return self._check_state(state, N, batched, self.out_size, "h_0"), None

    def _pack_state(self, h, c, batched):
        if not batched:
            h = h[:, 0]
            c = None if c is None else c[:, 0]
        return (h, c) if self.mode == "lstm" else h

    # ------------------------------------------------------------------ forward
    def forward(self, x, state=None, lengths=None, *, one_hot=False, need_backward=None):
        """See the class docstring.  ``one_hot=True``: x holds integer indices, (T, N)
        ((N, T) with batch_first, (T,) unbatched), standing for one-hot vectors of
        input_size features: the same results as passing the one-hot array, but
        the first layer's input product x W_ihᵀ becomes a row gather of W_ihᵀ.
        ``need_backward``: whether to keep what :meth:`backward` needs (default: in
        training mode only; the reference loop and the regularised cells keep it always)."""
        if self._reference_loop:
            return self.regularizer.forward(self, x, state, lengths, one_hot)
        x, batched = self._check_input(x, one_hot)
        T, N = x.shape[:2]
        if lengths is not None and not batched:
            raise ValueError("lengths needs batched input (T, N, D)")
        mask = lengths_to_mask(lengths, T, N)
        h0, c0 = self._initial_state(state, N, batched)
        kernels = self._kernels()
        keep = kernels is None or (self.training if need_backward is None else bool(need_backward))
        L, K, P = self.num_layers, self.num_directions, self.out_size
        outside = None  # bptt.nn.regularized_loop.Outside: input/output dropout, weight drop (in training)
        if self.regularizer is not None and self.training:  # their masks, and `dropout`'s, in that module's order
            x, one_hot, drops, outside = self.regularizer.around_the_loop(self, x, one_hot, fresh=state is None)
        else:  # dropout masks drawn up front, in layer order: the same draws as layer by layer
            drops = [None] + [dropout_mask((T, N, K * P), self.dropout, self.rng, self._dtype)
                              if self.training and self.dropout > 0 else None for _ in range(1, L)]
        W_hh = None if outside is None else outside.W_hh  # W̃_hh in place of W_hh (weight drop), or None
        parts = self._batch_parts(N, kernels is not None)
        chunks, threads = ([(0, T)], 1) if len(parts) > 1 else self._time_chunks(T, N, kernels is not None)
        # each layer's weights as its products read them (bptt.nn.prepared), made once and shared by batch slices;
        # packed for the register-blocked products where every product runs on one BLAS thread
        one_thread = len(parts) > 1 or threads > 1 or runtime_threads.blas_threads() == 1
        panels = kernels is not None and kernels.panels_enabled() and one_thread
        prepared = [[self._prepared(k, d, one_hot and k == 0, panels, kernels, W_hh) for d in range(K)] for k in range(L)]
        if len(parts) > 1 or not keep:
            # else each step's arrays are new pages (see there): a batch slice's, freed in its worker
            # thread, and an inference forward's, freed at the end of each call (LSTM 2×256, N = 50,
            # one thread: 3,700 page faults and 62 against 53 ms a call)
            keep_freed_memory()
        if len(parts) > 1:  # batch slices in parallel threads, each the whole stack (see policy.batch_parts)
            # an inference in windows writes each slice's rows of the output in place, else they are joined
            output = np.empty((T, N, K * P), self._dtype) if self._in_windows(keep, kernels, 1) else None

            def part(s):
                y, *rest = self._forward_stack(x[:, s], h0[:, s], None if c0 is None else c0[:, s],  # x: a view, no copy
                                               None if mask is None else mask[:, s],
                                               [None if m is None else m[:, s] for m in drops], one_hot, kernels,
                                               [(0, T)], 1, prepared, keep, W_hh, None if output is None else output[:, s])
                return (None if output is not None else y, *rest)

            results, (joined, h_n, c_n) = run_slices([functools.partial(part, s) for s in parts])
            output = joined if output is None else output
            self._ctx = _Context([] if keep else None, batched, output.shape, one_hot, [(0, T)], 1,
                                 [(s, r[3]) for s, r in zip(parts, results)] if keep else [], outside)
        else:
            output, h_n, c_n, ctx = self._forward_stack(x, h0, c0, mask, drops, one_hot, kernels, chunks, threads, prepared,
                                                        keep, W_hh)
            self._ctx = ctx._replace(batched=batched, outside=outside)
        if outside is not None:
            output = outside.output(output)  # ỹ = y ⊙ m_y
        if not batched:
            output = output[:, 0]
        elif self.batch_first:
            output = output.transpose(1, 0, 2)
        return output, self._pack_state(h_n, c_n, batched)

    def _in_windows(self, keep, kernels, threads):
        """Whether a forward runs as :meth:`_infer_in_windows`: inference, one direction, compiled, one thread
        (a wavefront's threads would refill a window still being read; a reverse direction starts at the end)."""
        return not keep and kernels is not None and threads == 1 and self.num_directions == 1

    def _forward_stack(self, x, h0, c0, mask, drops, one_hot, kernels, chunks, threads, prepared, keep=True, W_hh=None,
                       out=None):
        """The forward of every layer over (T, N) inputs x (checked), as a wavefront over
        ``chunks`` with ``threads`` threads: → (output (T, N, K·P), h_n, c_n, _Context);
        without ``keep`` the context's layers are None (nothing kept for a backward);
        ``W_hh``: W̃_hh per layer and direction, used in place of W_hh (weight drop), or None;
        ``out``: where an inference in windows writes the output (see there)."""
        if self._in_windows(keep, kernels, threads):
            return self._infer_in_windows(x, h0, c0, mask, drops, one_hot, kernels, prepared, W_hh, out)
        T, N = x.shape[:2]
        L, K, P = self.num_layers, self.num_directions, self.out_size
        inputs = [x] + [None if m is None else np.empty((T, N, K * P), self._dtype) for m in drops[1:]]  # after dropout
        outputs = [np.empty((T, N, K * P), self._dtype) if K == 2 else None for _ in range(L)]  # K = 1: the run's y
        runs = [[self._start_forward(k, d, T, N, h0, c0, mask, kernels, keep, panels=prepared[k][d].panels,
                                     W_hh=None if W_hh is None else W_hh[k][d])
                 for d in range(K)] for k in range(L)]
        # With a one-hot input the bottom layer's input product is a cheap gather, so its thread
        # also makes the product feeding the layer above, for every other chunk: the threads then
        # carry about equal work (every chunk overloaded the lower thread once the gate loops got
        # faster: 1.6 against 1.1 ms a chunk at 2×128).  Backward does the mirror image.
        shift = one_hot and threads > 1
        shifted = functools.partial(_shifted, shift)  # chunk j of layer k+1's input product made in layer k's thread

        def layer_output(k):
            return outputs[k] if K == 2 else runs[k][0].y

        def input_products(k, t0, t1):  # gx of layer k for times [t0, t1), from its input after dropout
            if k == 0:
                inp = x[t0:t1]
            else:
                inp = layer_output(k - 1)[t0:t1]
                if drops[k] is not None:
                    inp = np.multiply(inp, drops[k][t0:t1], out=inputs[k][t0:t1])
            for d, run in enumerate(runs[k]):
                self._input_product(k, d, inp, run.gx_rows(t0, t1), one_hot and k == 0, prepared)

        def layer_chunk(k, j):  # layer k, times [t0, t1): input product, then the time loop
            t0, t1 = chunks[j]
            if k == 0 or not shifted(j):
                input_products(k, t0, t1)
            for d, run in enumerate(runs[k]):
                run.steps(t0, t1)
                if K == 2:
                    outputs[k][t0:t1, :, d * P : (d + 1) * P] = run.y[t0:t1]
            if shifted(j) and k + 1 < L:
                input_products(k + 1, t0, t1)

        from bptt.runtime.wavefront import run_wavefront

        with single_thread_blas(threads > 1):
            run_wavefront(L, len(chunks), layer_chunk, threads)  # each layer's thread uses one BLAS thread

        h_n = np.empty_like(h0)
        c_n = None if c0 is None else np.empty_like(c0)
        layers = []
        for k in range(L):
            caches = []
            for d, run in enumerate(runs[k]):
                _, h_n[k * K + d], c_last, cache = run.result()
                if c_n is not None:
                    c_n[k * K + d] = c_last
                caches.append(cache)
            layer_in = inputs[k] if inputs[k] is not None else layer_output(k - 1)
            layers.append(_LayerCache(layer_in, drops[k], caches))
        output = layer_output(L - 1)
        return output, h_n, c_n, _Context(layers if keep else None, True, output.shape, one_hot, chunks, threads, [])

    def _infer_in_windows(self, x, h0, c0, mask, drops, one_hot, kernels, prepared, W_hh=None, out=None):
        """An inference forward (nothing kept for a backward) a window of steps at a time, through
        the whole stack: for each chunk [t0, t1) of ``policy.inference_chunks``, layer 0, 1, … in
        turn make their input product gx = inp W_ihᵀ + b into one gx window shared by the layers,
        then run their steps, writing y into a window of their own, which the layer above reads
        at once (still in cache); the top layer's window is copied to ``out`` (T, N, P), which may
        be a batch slice's view of the whole batch's output.  Held at once: one gx and L y windows, not
        (T, N, G) and L (T, N, P) arrays (docs/README.md, "Inference").  → as :meth:`_forward_stack`."""
        T, N = x.shape[:2]
        L, P, dtype = self.num_layers, self.out_size, self._dtype
        G, dropout = self.gate_count * self.hidden_size, any(m is not None for m in drops[1:])
        chunks = policy.inference_chunks(T, N * (G + (L + dropout) * P) * dtype.itemsize)  # a step's gx and y rows
        w = max(t1 - t0 for t0, t1 in chunks)
        if out is None:
            out = kernels.aligned_empty((T, N, P), dtype)  # arrays on cache lines (see kernels.aligned_empty)
        gx = kernels.aligned_empty((w, N, G), dtype)
        direct = w == T and out.flags.c_contiguous  # one chunk: the top layer writes out itself
        ys = [out if direct and k == L - 1 else kernels.aligned_empty((w, N, P), dtype) for k in range(L)]
        dropped = kernels.aligned_empty((w, N, P), dtype) if dropout else None
        runs = [self._start_forward(k, 0, T, N, h0, c0, mask, kernels, False, gx=gx, y=ys[k],
                                    panels=prepared[k][0].panels, W_hh=None if W_hh is None else W_hh[k][0])
                for k in range(L)]
        for t0, t1 in chunks:
            for k, run in enumerate(runs):
                inp = x[t0:t1] if k == 0 else ys[k - 1][: t1 - t0]
                if drops[k] is not None:
                    inp = np.multiply(inp, drops[k][t0:t1], out=dropped[: t1 - t0])
                self._input_product(k, 0, inp, run.gx_rows(t0, t1), one_hot and k == 0, prepared)
                run.steps(t0, t1)
            if not direct:
                out[t0:t1] = ys[L - 1][: t1 - t0]
        h_n, c_n = np.empty_like(h0), None if c0 is None else np.empty_like(c0)
        for k, run in enumerate(runs):
            _, h_n[k], c_last, _ = run.result()
            if c_n is not None:
                c_n[k] = c_last
        return out, h_n, c_n, _Context(None, True, out.shape, one_hot, chunks, 1, [])

    def _start_forward(self, k, d, T, N, h0, c0, mask, kernels, keep=True, gx=None, y=None, panels=None, W_hh=None):
        """The time loop of layer k, direction d, ready to run chunk by chunk (gx filled by the caller,
        through ``run.gx_rows``); ``keep``: whether it keeps the per-step values a backward needs,
        ``gx``, ``y``: the arrays to use (default new (T, N, ·) ones; for inference, windows of
        fewer steps), ``panels``: the packed recurrent weights shared by the runs of a forward call
        (all four for the fused kernels only, see ForwardRun); ``W_hh``: the recurrent weight to
        use (W̃_hh under weight drop, packed into ``panels`` by the first run; default the parameter)."""
        _, _, W_param, b_hh, W_hr = self._direction_params(k, d)
        W_hh = W_param if W_hh is None else W_hh
        if self.mode != "gru":
            b_hh = None  # RNN/LSTM: folded into gx by _input_product
        idx = k * self.num_directions + d
        args = (self.mode, h0[idx], None if c0 is None else c0[idx], recurrence.Weights(W_hh, b_hh, W_hr))
        if gx is None:  # the compiled loops' on cache lines (kernels.aligned_empty)
            gx = (np.empty if kernels is None else kernels.aligned_empty)((T, N, self.gate_count * self.hidden_size), self._dtype)
        if kernels is not None:
            return kernels.ForwardRun(*args, gx, mask, reverse=d == 1, keep=keep, length=T, panels=panels, y=y)
        return recurrence.WholeSequence(T, gx, lambda: recurrence.sequence_forward(args[0], gx, *args[1:], mask, reverse=d == 1))

    def _prepared(self, k, d, one_hot, panels, kernels, W_hh=None):
        """:meth:`_prepare`'s weights, made once per block of :meth:`Module.frozen_weights` (kept in
        ``frozen_cache``) and on every call outside one, or under weight drop (``W_hh``: a new
        W̃_hh every call)."""
        cache = self.frozen_cache if W_hh is None else None
        if cache is None:
            return self._prepare(k, d, one_hot, panels, kernels)
        key = ("prepared", k, d, one_hot, panels, kernels is None)
        if key not in cache:
            cache[key] = self._prepare(k, d, one_hot, panels, kernels)
        return cache[key]

    def _prepare(self, k, d, one_hot, panels, kernels):
        """Layer k, direction d's weights as this forward call's products read them (see
        :mod:`bptt.nn.prepared`), made once per call and shared by its batch slices."""
        return prepare(self._direction_params(k, d)[0], self._input_bias(k, d), one_hot, panels, kernels)

    def _input_bias(self, k, d):
        """b_ih, plus b_hh for RNN/LSTM, whose b_hh adds to the same sum (the GRU keeps b_hh apart)."""
        _, b_ih, _, b_hh, _ = self._direction_params(k, d)
        if b_hh is not None and self.mode != "gru":
            return b_ih + b_hh
        return b_ih

    def _input_product(self, k, d, inp, gx, one_hot, prepared):
        """gx = inp W_ihᵀ + b_ih (+ b_hh for RNN/LSTM), into gx (see :func:`bptt.nn.prepared.input_product`)."""
        input_product(prepared[k][d], inp, gx, one_hot)

    # ------------------------------------------------------------------ backward
    def backward(self, doutput, dstate=None, need_input_grad=True, recurrent_scale=None):
        """Backpropagate through the last forward; see the class docstring.

        ``need_input_grad=False`` skips ∂L/∂x of the first layer (returned as None):
        a one-hot input has no use for it, and it costs a (T·N, G)×(G, D) product.
        After ``forward(..., one_hot=True)`` there is no input gradient either.

        ``recurrent_scale`` (T,): multiply the gradient every layer carries from step t back to
        step t − 1 by ``recurrent_scale[t]`` (ARTBP's unbiasing, see
        :func:`bptt.nn.recurrence.sequence_backward`).  It runs the readable reference loop, so the
        forward must have run on it too (``layer.backend = "reference"``); unidirectional layers only.
        """
        if recurrent_scale is not None and self.regularizer is not None:
            raise ValueError("recurrent_scale is not supported by regularised or normalised cells "
                             "(bptt.nn.regularized_loop); use the plain layer")
        if self._reference_loop:
            return self.regularizer.backward(self, doutput, dstate, need_input_grad)
        ctx = self._saved(self._ctx)
        if ctx.layers is None:
            raise RuntimeError(f"{type(self).__name__}.backward(): the last forward kept nothing for a backward (it ran "
                               "in eval mode or with need_backward=False); run it in training mode (.train()) or with "
                               "need_backward=True")
        if recurrent_scale is not None:
            if self.bidirectional:
                raise ValueError("recurrent_scale applies to unidirectional layers only")
            if ctx.parts or not isinstance(ctx.layers[0].directions[0], recurrence.SequenceCache):
                raise ValueError('recurrent_scale needs the forward run on the reference backend '
                                 '(set layer.backend = "reference" before the forward)')
        dy = as_float_array(doutput, self._dtype, "doutput")
        T, N, KP = ctx.out_shape
        self._ctx = None  # consumed, as in PyTorch: each layer's cache is freed once its gradients are done
        if not ctx.batched:
            dy = dy.reshape(T, 1, KP) if dy.shape == (T, KP) else dy
        elif self.batch_first and dy.ndim == 3:
            dy = dy.transpose(1, 0, 2)
        if dy.shape != (T, N, KP):
            raise ValueError(f"doutput must have the shape of the output, got {np.shape(doutput)}")
        dy = np.ascontiguousarray(dy)
        outside = ctx.outside  # input/output dropout and weight drop of a training forward, or None
        if outside is not None:
            dy = outside.output_grad(dy)  # ∂L/∂y = ∂L/∂ỹ ⊙ m_y
            need_input_grad = need_input_grad and not outside.one_hot  # the caller passed indices
        dh_n, dc_n = (dstate, None) if self.mode != "lstm" else (dstate or (None, None))
        dh_n = None if dh_n is None else self._check_state(dh_n, N, ctx.batched, self.out_size, "dh_n")
        dc_n = None if dc_n is None else self._check_state(dc_n, N, ctx.batched, self.hidden_size, "dc_n")
        kernels = self._kernels()
        # under weight drop the stack's W_hh gradients are ∂L/∂W̃_hh: into buffers, mapped back below
        W_hh, buffers = (None, {}) if outside is None else (outside.W_hh, outside.recurrent_grads(self))
        grads = self._own_grads | buffers
        if ctx.parts:  # the forward ran batch slices in threads: so does the backward, each into its own grads
            # and each into its own columns of dx (see bptt.nn.batch_slices)
            dx = np.empty((T, N, self.input_size), self._dtype) if need_input_grad and not ctx.one_hot else None

            def part(i, s, sub):
                own = grads if i == 0 else ZerosOnDemand(grads)
                _, dh0_s, dc0_s = self._backward_stack(sub, dy[:, s], None if dh_n is None else dh_n[:, s],
                                                       None if dc_n is None else dc_n[:, s], need_input_grad, kernels,
                                                       own, W_hh=W_hh, dx=None if dx is None else dx[:, s])
                return None, dh0_s, dc0_s, own  # its dx: written in place

            jobs = [functools.partial(part, i, s, sub) for i, (s, sub) in enumerate(ctx.parts)]
            results, (_, dh0, dc0) = run_slices(jobs)
            for r in results[1:]:
                for name, g in r[3].items():
                    grads[name] += g
        else:
            dx, dh0, dc0 = self._backward_stack(ctx, dy, dh_n, dc_n, need_input_grad, kernels, grads, recurrent_scale,
                                                W_hh)
        if outside is not None:
            outside.add_recurrent_grads(self, buffers)  # ∂L/∂W_hh += ∂L/∂W̃_hh ⊙ M / (1 − p_w)
            dx = None if dx is None else outside.input_grad(dx)  # ∂L/∂x = ∂L/∂x̃_0 ⊙ m_x[0]
        if dx is not None:
            dx = dx[:, 0] if not ctx.batched else dx.transpose(1, 0, 2) if self.batch_first else dx
        return dx, self._pack_state(dh0, dc0, ctx.batched)

    def _backward_stack(self, ctx, dy, dh_n, dc_n, need_input_grad, kernels, grads, recurrent_scale=None, W_hh=None,
                        dx=None):
        """The backward of every layer from dy (T, N, K·P) as the forward of ``ctx`` ran it,
        accumulating parameter gradients into the dict ``grads``: → (dx or None, dh_0, dc_0);
        ``W_hh``: the W̃_hh per layer and direction the forward ran with (weight drop), or None;
        ``dx``: where to write ∂L/∂x (a batch slice's view of the whole batch's), else a new array."""
        T, N, _ = dy.shape
        L, K, P = self.num_layers, self.num_directions, self.out_size
        chunks, threads = ctx.chunks, ctx.threads
        need_dx0 = need_input_grad and not ctx.one_hot
        # dxs[k] = ∂L/∂(layer k's input); for k ≥ 1 that is the gradient the layer below
        # receives (after the dropout mask), filled chunk by chunk
        dxs = [(dx if dx is not None else np.empty((T, N, self.input_size), self._dtype)) if need_dx0 else None]
        dxs += [np.empty((T, N, K * P), self._dtype) for _ in range(1, L)]
        runs = [None] * L
        drops = [layer.drop for layer in ctx.layers]
        shift = ctx.one_hot and threads > 1  # layer k's input gradient made in layer k−1's thread (see forward)
        shifted = functools.partial(_shifted, shift)

        def input_grad(k, t0, t1):  # backprop into layer k's input: dx = Σ_d dgx W_ih (one product), ⊙ mask
            for d, run in enumerate(runs[k]):
                matmul_into(run.dgx[t0:t1], self._direction_params(k, d)[0], dxs[k][t0:t1], add=d > 0)
            if drops[k] is not None:
                dxs[k][t0:t1] *= drops[k][t0:t1]

        def layer_chunk(i, j):  # the i-th layer from the top, the j-th chunk from the end
            k = L - 1 - i
            t0, t1 = chunks[len(chunks) - 1 - j]
            if j == 0:
                dy_k = dy if k == L - 1 else dxs[k + 1]
                runs[k] = [self._start_backward(k, d, dy_k, dh_n, dc_n, ctx.layers[k].directions[d], kernels,
                                                recurrent_scale, None if W_hh is None else W_hh[k][d])
                           for d in range(K)]
            if shifted(j) and k + 1 < L:
                input_grad(k + 1, t0, t1)  # this layer's dy for these steps
            for run in runs[k]:
                run.steps(t0, t1)
            if dxs[k] is not None and not (shifted(j) and k > 0):
                input_grad(k, t0, t1)

        # A layer's buffers are freed while the layers below still run, once nothing reads them:
        # runs[k] is read by layer k's weight-gradient jobs and, with shift, by layer k−1's
        # chunks (input_grad(k)); whichever of the two ends last frees it.
        readers = [1 + (shift and k > 0) for k in range(L)]
        lock = threading.Lock()

        def release(k):
            with lock:
                readers[k] -= 1
                free = readers[k] == 0
            if free:
                runs[k] = None

        # Each layer's weight gradients are tail jobs (bptt.runtime.wavefront): a product per direction,
        # cut in two halves of gate rows when two threads run, so that a thread whose layer is
        # done takes halves of the others' (at 2×512 the bottom layer's 80 ms tail ran on one
        # core while the other waited).
        def finish(i):
            k = L - 1 - i
            if shift and k + 1 < L:
                release(k + 1)  # layer k's chunks are done reading layer k+1's dgx
            G = self.gate_count * self.hidden_size
            parts = [slice(0, G // 2), slice(G // 2, G)] if threads > 1 else [slice(0, G)]
            left = [K * len(parts)]

            def job(d, rows):
                self._weight_grads(k, d, runs[k][d], ctx.layers[k], ctx.one_hot, rows, rows.stop == G, grads)
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:  # every part of layer k is in: its initial-state gradients, then free it
                    for dd, run in enumerate(runs[k]):
                        dh0[k * K + dd], dc_first = self._final_grads(k, dd, run, grads)
                        if dc0 is not None:
                            dc0[k * K + dd] = dc_first
                    ctx.layers[k] = None
                    release(k)

            return [functools.partial(job, d, rows) for d in range(K) for rows in parts]

        from bptt.runtime.wavefront import run_wavefront

        dh0 = np.zeros((L * K, N, P), self._dtype)
        dc0 = np.zeros((L * K, N, self.hidden_size), self._dtype) if self.mode == "lstm" else None
        with single_thread_blas(threads > 1):
            run_wavefront(L, len(chunks), layer_chunk, threads, finish)
        return dxs[0], dh0, dc0

    def _weight_grads(self, k, d, run, layer, one_hot, rows, scatter, grads):
        """Accumulate layer k, direction d's weight and bias gradients from its finished
        backward run, for the gate rows ``rows`` (a slice of 0 … G−1; two slices can run
        in two threads).  Each is one matrix product over all T·N steps and batch rows:

            ∂L/∂W_ih = dgxᵀ X_k    ∂L/∂W_hh = dghᵀ H_prev    ∂L/∂b_ih = Σ dgx    ∂L/∂b_hh = Σ dgh

        With one-hot input, ∂L/∂W_ih of layer 0 is a scatter-add instead, done (for all
        rows) by the call with ``scatter`` set.
        """
        T, N, G = run.dgx.shape
        gW_ih, gb_ih, gW_hh, gb_hh, _ = self._direction_grads(k, d, grads)
        dgx = run.dgx.reshape(T * N, G)[:, rows]  # strided column blocks: BLAS reads them in place
        if k == 0 and one_hot:  # ∂L/∂W_ih[:, v] = Σ of dgx over the steps whose input is v
            if scatter:
                dW_ihT = np.zeros((self.input_size, G), self._dtype)
                scatter_add_rows(dW_ihT, layer.x.reshape(-1), run.dgx.reshape(T * N, G))
                gW_ih += dW_ihT.T
        else:
            add_gram(gW_ih[rows], dgx, layer.x)  # layer.x: a batch slice's view, read a piece at a time
        db = dgx.sum(axis=0) if gb_ih is not None else None
        if gb_ih is not None:
            gb_ih[rows] += db
        h_prev = layer.directions[d].h_prev.reshape(T * N, -1)
        for part, dgh, is_dgx in self._dgh_parts(run, rows, dgx):  # dgh is dgx but in the GRU's n-part
            gW_hh[part] += dgh.T @ h_prev
            if gb_hh is not None:
                gb_hh[part] += db[part.start - rows.start : part.stop - rows.start] if is_dgx else dgh.sum(axis=0)

    def _dgh_parts(self, run, rows, dgx):
        """[(gate rows, ∂L/∂gh over those rows (T·N, ·), whether that is dgx's columns)] covering ``rows``:
        dgx itself where dgh equals it (every gate but the GRU's n), the run's own dgh for the GRU's
        n-rows (the fused run keeps only that part, (T, N, H); the reference loop the whole (T, N, G))."""
        if self.mode != "gru":
            return [(rows, dgx, True)]
        H = run.dgx.shape[2] // 3
        dgh = run.dgh.reshape(-1, run.dgh.shape[2])
        n0 = 0 if dgh.shape[1] == H else 2 * H  # where the n-part starts in dgh
        rz, n = slice(rows.start, min(rows.stop, 2 * H)), slice(max(rows.start, 2 * H), rows.stop)
        return [part for part in ((rz, dgx[:, : rz.stop - rz.start], True),
                                  (n, dgh[:, n0 + n.start - 2 * H : n0 + n.stop - 2 * H], False))
                if part[0].stop > part[0].start]

    def _final_grads(self, k, d, run, grads):
        """After the weight gradients: ∂L/∂W_hr of a projected LSTM (one product over all
        steps, made by the run) and the gradients of the initial state, (dh_0, dc_0)."""
        _, _, dh0, dc0, dW_hr = run.result()
        gW_hr = self._direction_grads(k, d, grads)[4]
        if gW_hr is not None:
            gW_hr += dW_hr
        return dh0, dc0

    def _start_backward(self, k, d, dy_k, dh_n, dc_n, cache, kernels, recurrent_scale=None, W_hh=None):
        """The backward time loop of layer k, direction d, ready to run chunk by chunk.

        dy_k (T, N, K·P) is ∂L/∂(layer k's output), filled by the caller chunk by
        chunk; with two directions (one chunk) each takes its contiguous half now.
        ``W_hh``: the recurrent weight the forward ran with (W̃_hh under weight drop; default the parameter).
        """
        W_param, b_hh, W_hr = self._direction_params(k, d)[2:]
        W_hh = W_param if W_hh is None else W_hh
        if self.mode != "gru":
            b_hh = None  # folded into gx in the forward pass
        P, idx = self.out_size, k * self.num_directions + d
        if self.num_directions == 2:
            dy_k = dy_k[:, :, d * P : (d + 1) * P]
        dy_k = np.ascontiguousarray(dy_k)  # a batch slice's copy lives as long as this run, no longer
        args = (dy_k, None if dh_n is None else dh_n[idx], None if dc_n is None else dc_n[idx], cache,
                recurrence.Weights(W_hh, b_hh, W_hr))
        if kernels is not None and recurrent_scale is None:
            return kernels.BackwardRun(*args)
        return recurrence.WholeSequence(dy_k.shape[0], None,
                              lambda: recurrence.sequence_backward(*args, recurrent_scale=recurrent_scale))

    # ------------------------------------------------------------------ stateful stepping
    def layer_weights(self, k: int, d: int = 0):
        """(W_ih (G, D_k), b_ih, W_hh (G, P), b_hh, W_hr (P, H) or None) of layer ``k``, direction ``d``:
        the live parameter arrays, as :mod:`bptt.nn.recurrence` and the analyses read them."""
        return self._direction_params(k, d)

    def last_forward_caches(self) -> list:
        """The caches of the last forward, per layer: ``(x, [SequenceCache per direction])`` with x the
        layer's input (T, N, D_k).  Per-step values (gates, states) are in the caches of the reference
        backend (``layer.backend = "reference"``); a forward run in batch slices has none to offer."""
        if self.regularizer is not None:
            raise ValueError("a layer with regularised or normalised cells keeps bptt.nn.regularized_loop's caches "
                             "(layer.regularizer.ctx), not these")
        ctx = self._ctx
        if ctx is None or ctx.layers is None:
            raise ValueError("no forward pass to read (the layer has no cache: none is kept in eval mode "
                             "unless forward(..., need_backward=True) or backend='reference')")
        if ctx.parts:
            raise ValueError("the last forward ran in batch slices; run it with the reference backend")
        return [(layer.x, list(layer.directions)) for layer in ctx.layers]

    def hidden_state_stats(self) -> dict[str, float]:
        """Mean and variance of h per layer over the last forward, read from its cache (no extra work).

        Uses each direction's ``h_prev`` (T, N, P), the states h_{t−1} entering the T steps (the
        carried state and the first T−1 outputs), which every backend keeps for ∂L/∂W_hh and which
        is taken before inter-layer dropout.  Returns {"h_mean_l0": …, "h_var_l0": …, "h_mean_l1": …}.
        """
        if self._reference_loop:
            return self.regularizer.hidden_state_stats()
        ctx = self._ctx
        if ctx is None or ctx.layers is None:
            raise ValueError("hidden_state_stats needs a forward pass first, one that kept its cache (training mode, "
                             "or need_backward=True)")
        out = {}
        parts = [sub for _, sub in ctx.parts] or [ctx]  # batch slices run in threads: their rows, in order
        for k in range(len(parts[0].layers)):
            h = np.concatenate([np.concatenate([d.h_prev for d in p.layers[k].directions], axis=-1) for p in parts],
                               axis=1)
            out[f"h_mean_l{k}"] = float(h.mean())
            out[f"h_var_l{k}"] = float(h.var())
        return out

    def reset_state(self):
        """Forget the state kept by :meth:`step`."""
        self.state = None

    def step(self, x):
        """One time step from the kept state, for streaming and sampling: ``y = rnn.step(x)``.

        x (N, D) or (D,) → y (N, P) or (P,); the new state is kept until :meth:`reset_state`.
        """
        if self._reference_loop:
            return self.regularizer.step(self, x)
        if self.bidirectional:
            raise ValueError("step() needs a unidirectional layer: the reverse direction reads the future")
        x = as_float_array(x, self._dtype, "input")
        if x.ndim not in (1, 2):
            raise ValueError(f"step() expects input (N, {self.input_size}) or ({self.input_size},), got {x.shape}")
        fast = self._fast_step(x)
        if fast is not None:
            return fast
        seq = x[None] if not self.batch_first or x.ndim == 1 else x[:, None]
        out, self.state = self.forward(seq, self.state, need_backward=False)
        self._ctx = None  # no backward through streaming steps
        return out[0] if (x.ndim == 1 or not self.batch_first) else out[:, 0]

    def _fast_step(self, x):
        """step() through :func:`bptt.kernels.layer_step`: the results of ``forward`` on a
        one-step sequence without its per-call bookkeeping.  None → take the general path."""
        if self.backend == "reference" or x.shape[-1] != self.input_size or \
                (self.training and (self.dropout > 0 or self.regularizer is not None)):  # masks to draw
            return None
        from bptt import kernels

        if not kernels.available(self.mode, self._dtype):
            return None
        batched = x.ndim == 2
        x2 = np.ascontiguousarray(x.reshape(-1, self.input_size))
        h0, c0 = self._initial_state(self.state, x2.shape[0], batched)
        params = [self._direction_params(k, 0) for k in range(self.num_layers)]
        y, h_n, c_n = kernels.layer_step(self.mode, params, x2, h0, c0)
        self.state = self._pack_state(h_n, c_n, batched)
        self._ctx = None
        return y if batched else y[0]


class RNN(RNNBase):
    """Elman RNN:  h_t = φ(x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh),  φ = tanh or relu.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, dtype=np.float32, rng=None)``;
    see :class:`RNNBase` for inputs, outputs and ``backward``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype=np.float32, rng=None, **regularization):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.mode = "rnn_" + nonlinearity
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, dtype, rng,
                         **regularization)


class LSTM(RNNBase):
    """Long short-term memory, gates i, f, g, o as in PyTorch:

        [a_i a_f a_g a_o] = x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh
        c_t = σ(a_f) ⊙ c_{t−1} + σ(a_i) ⊙ tanh(a_g)
        h_t = σ(a_o) ⊙ tanh(c_t)               (with proj_size: h_t = (σ(a_o) ⊙ tanh(c_t)) W_hrᵀ)

    State is ``(h, c)``; see :class:`RNNBase` for inputs, outputs and ``backward``.
    """

    mode = "lstm"


class GRU(RNNBase):
    """Gated recurrent unit, gates r, z, n, PyTorch's reset-after form:

        r = σ(x W_irᵀ + b_ir + h W_hrᵀ + b_hr),  z = σ(x W_izᵀ + b_iz + h W_hzᵀ + b_hz)
        n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn)),  h' = (1 − z) ⊙ n + z ⊙ h

    See :class:`RNNBase` for inputs, outputs and ``backward``.
    """

    mode = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, dtype=np.float32, rng=None, **regularization):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, dtype, rng,
                         **regularization)
