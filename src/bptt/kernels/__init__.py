"""Compiled whole-sequence kernels: the time loop of :mod:`bptt.nn.recurrence`, fused, and a few fused passes.

Shape legend: T time steps, N batch, H hidden units, G = g·H stacked gate
pre-activations (:func:`bptt.nn.gates.gate_count`), P the width of h, D input features.

The package, one concern a module (each opens with what it owns):

* :mod:`~bptt.kernels.mathfn`  vectorisable exp / tanh / sigmoid, the shared Numba options;
* :mod:`~bptt.kernels.steps`   each cell's forward step and its backward, side by side;
* :mod:`~bptt.kernels.gemm`    the step products: hand loops, register-blocked panels, BLAS from compiled code;
* :mod:`~bptt.kernels.loops`   the time loops and their drivers (``ForwardRun`` / ``BackwardRun``,
  ``sequence_forward`` / ``sequence_backward``, ``sequence_impl``, ``layer_step``);
* :mod:`~bptt.kernels.fused`   softmax cross-entropy, the RMSprop and Adam updates, scatter-add, dropout masks;
* :mod:`~bptt.kernels.transformer`  the exact GELU, LayerNorm, the attention softmax, forward and backward;
  a Transformer language model's generation step.

Which way a step runs and on how many threads is :mod:`bptt.runtime.policy`'s; BLAS's
thread count is :mod:`bptt.runtime.threads`'s.  Importing this package imports Numba
(slow), so the layers import it on first use.
"""

from __future__ import annotations

from bptt.kernels.fused import (adam_step, keep_scaled, keep_scaled_draws, rmsprop_step, scatter_add_rows,
                                softmax_cross_entropy)
from bptt.kernels.gemm import PackedAffine, Panels, aligned_empty, panels_enabled, transposed
from bptt.kernels.loops import (BackwardRun, ForwardRun, KernelCache, available, layer_step, sequence_backward,
                                sequence_forward, sequence_impl)
from bptt.kernels.transformer import (gelu_forward, layer_norm_backward, layer_norm_forward, lm_step, relu_backward,
                                      softmax_rows, softmax_rows_backward)
from bptt.runtime.threads import blas_threads, single_thread_blas

__all__ = ["sequence_impl", "sequence_forward", "sequence_backward", "ForwardRun", "BackwardRun", "KernelCache",
           "available", "blas_threads", "single_thread_blas", "scatter_add_rows", "softmax_cross_entropy",
           "rmsprop_step", "adam_step", "keep_scaled", "keep_scaled_draws", "layer_step", "gelu_forward", "layer_norm_forward",
           "layer_norm_backward", "lm_step", "relu_backward", "softmax_rows", "softmax_rows_backward", "PackedAffine", "Panels",
           "panels_enabled", "transposed", "aligned_empty"]
