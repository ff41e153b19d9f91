"""Scheduling policy: which way each recurrent step product runs, and on how many threads.

Shape legend: T time steps, N batch, H hidden units, P the width of h, G = g·H
stacked gates; ``macs`` = N·G·P, the multiply-adds of one step's recurrent
product h_{t−1} W_hhᵀ.

The thresholds are public module-level names, read as ``policy.NAME`` at run time
(so a test can monkeypatch them here); those with a ``BPTT_*`` environment variable
(named in the comments) read it once, at import.  Every figure was measured on 2 shared cores (AMD EPYC); see
the comments and BENCHMARKS.md.

* ``SMALL_MACS``: at or below it a layer's step products call no BLAS: they run on the
  register-blocked panels where the CPU has them, else as hand loops
  (:mod:`bptt.kernels.gemm`); above, on the panels or BLAS (:class:`bptt.kernels.gemm.Panels`).
* ``ONE_THREAD_MACS``: below it a step's BLAS call runs on one thread
  (:func:`step_blas_limit`).
* ``PANEL_PRODUCTS``: whether register-blocked products may be used at all.
* ``SPLIT_MIN_ROWS`` / ``SPLIT_MAX_MACS``: when a batch runs as slices in
  threads (:func:`batch_parts`); otherwise a stack may run as a wavefront
  over its layers (:func:`time_chunks`).
* ``STEP_THREADS_BYTES``: when one sampling step lets BLAS use its threads.
* ``INFER_WINDOW_BYTES``: the input pre-activations and outputs an inference
  forward holds at once, per thread (:func:`inference_chunks`).
* ``SPIN_SECONDS``: how long a batch slice's thread polls for its next job, and the
  calling thread for the slices' results, before sleeping (:mod:`bptt.runtime.spin`).
* ``ATTENTION_TILES_MIN_BYTES`` / ``ATTENTION_TILE_BYTES``: when attention runs in
  cache-sized tiles, and how large a tile is (:mod:`bptt.nn.attention_tiles`).
* ``MIN_ROWS_PER_THREAD`` / ``MIN_MACS_PER_THREAD`` / ``ELEMENT_MACS``: when a product
  or a row-wise pass splits its rows among bptt's threads (:func:`row_slices`).
"""

from __future__ import annotations

import contextlib
import os

from bptt.runtime import threads

__all__ = ["SMALL_MACS", "ONE_THREAD_MACS", "PANEL_PRODUCTS", "SPLIT_MIN_ROWS", "SPLIT_MAX_MACS",
           "MODEL_SPLIT_MIN_MACS", "STEP_THREADS_BYTES", "WAVEFRONT_CHUNKS", "INFER_WINDOW_BYTES", "SPIN_SECONDS",
           "ATTENTION_TILES_MIN_BYTES", "ATTENTION_TILE_BYTES",
           "MIN_ROWS_PER_THREAD", "MIN_MACS_PER_THREAD", "ELEMENT_MACS",
           "step_blas_limit", "sampling_blas_limit", "batch_parts", "row_slices", "even_slices", "time_chunks",
           "inference_chunks"]

# Below this many multiply-adds per recurrent product, a step's product calls no BLAS (a call
# would cost more than the product): panels where the CPU has them, else hand loops.
SMALL_MACS = int(os.environ.get("BPTT_SMALL_MACS", 48_000))

# Per-step products below this many multiply-adds run with one BLAS thread.  A
# sequence makes 2T small BLAS calls in a row; with two OpenBLAS threads each call
# waits for the other thread, which on a shared 2-core machine (measured: a
# 50×1024×256 step product, other processes running) made a training step 5×
# slower than with one thread.  Above the threshold the product is long enough
# for threads to pay.  Uses threadpoolctl (a dependency); BPTT_STEP_THREADS_MACS=0
# turns the limit off.
ONE_THREAD_MACS = int(os.environ.get("BPTT_STEP_THREADS_MACS", 16_000_000))

# Register-blocked step products on packed weights (bptt.kernels.gemm) where the CPU has
# them; BPTT_PANEL_PRODUCTS=0 keeps every such product with BLAS.
PANEL_PRODUCTS = os.environ.get("BPTT_PANEL_PRODUCTS", "1") != "0"

# Batches of at least twice this many rows run in slices, one thread each (batch_parts); BPTT_SPLIT_MIN_ROWS=0
# turns that off.
SPLIT_MIN_ROWS = int(os.environ.get("BPTT_SPLIT_MIN_ROWS", 8)) or 1 << 62

# In training, step products of this many multiply-adds and more would run as a wavefront instead
# (BPTT_SPLIT_MAX_MACS); by default there is no such bound: every cell trains in slices at every size.
# The split pays a second set of weight gradients, so it once had a bound of 12 M for all cells, then
# for the RNN alone.  The LSTM's forward activates the gates in place, so its split stays below PyTorch's
# peak memory at every size of the layer table (2×256 54.9 against 75.7 MB, 2×512 137 against 147, 1×1024
# 364 against 539), and with the step products in tall blocks (bptt.kernels.gemm.TALL_ROWS) it beat the
# wavefront: 1.19× at 2×256, 1.05× at 2×512, 1.10× at 1×1024 (Intel Xeon, 2 cores, same process,
# alternating).  The GRU followed once its backward kept only the n-part of dgh and a slice's own weight
# gradients were made layer by layer (bptt.nn.batch_slices.ZerosOnDemand): 100 against PyTorch's 111–125 MB
# at 2×512, 287 against 349–408 at 1×1024, 1.07× and 1.13× faster than the wavefront.  The RNN followed
# once a slice read its input and wrote its input gradient in place (bptt.nn.batch_slices.add_gram,
# matmul_into) instead of copying both: its split peaks at 50 MB against PyTorch's 59–62 at 2×512 (before:
# 57) and at 140 against 163–221 at 1×1024 (before: 172), and runs 1.07× (2×512) and 1.10× (1×1024)
# faster than the wavefront (same machine, medians of 21 and 15 steps, three alternating runs each).
SPLIT_MAX_MACS = int(os.environ.get("BPTT_SPLIT_MAX_MACS", 1 << 62))

# A language model's step in batch slices, each through the whole model (bptt.lm.model.CharLM.train_step,
# CharLM.nll), runs the Python of a whole model in every thread, one at a time under the GIL, for one
# hand-off instead of four.  That pays once the window's recurrent work is large enough: below this many
# multiply-adds of one layer's step products over the window (T·N·G·P) the layer slices the batch itself.
# Measured (LSTM, 2 threads, same process, alternating): 2×128, N = 50: T = 1 0.87×, 10 0.98×, 15 1.02×,
# 20 1.05×, 50 1.04×, 100 1.05×; N = 32, T = 10 0.97×; 2×256, N = 50: T = 5 (65 M) 1.01×, T = 10 1.05×.
MODEL_SPLIT_MIN_MACS = int(os.environ.get("BPTT_MODEL_SPLIT_MIN_MACS", 64_000_000))

# One step at a small batch (sampling) is a few matrix–vector products, limited by how
# fast the weights stream from memory, not by arithmetic.  Once a layer's recurrent
# weights outgrow a core's cache a second BLAS thread adds bandwidth: measured per
# character of a 2-layer LSTM (N = 1), one thread against BLAS's two: H = 384
# (2.4 MB) 540 → 324 µs, H = 512 (4.2 MB) 745 → 493 µs, H = 1024 4533 → 1555 µs;
# at H = 128 and 256 (≤ 1 MB) no difference.  Below this size the one-thread rule of
# step_blas_limit stands.
STEP_THREADS_BYTES = 2 * 1024 * 1024

# A wavefront cuts T into this many chunks (fewer if T is shorter), so the pipeline fills
# after 1/8 of a layer's steps: 4, 8, 12 and 16 chunks measured alike, within noise, for
# a 2×128 LSTM training step at T = 50.
WAVEFRONT_CHUNKS = 8

# An inference forward (no backward caches) runs the stack a chunk of steps at a time: each
# layer's input pre-activations gx = X W_ihᵀ and its outputs y go to windows of the chunk's
# steps (one gx window for all layers, a y window per layer), together at most this many bytes
# per thread, instead of (T, N, G) and L (T, N, P) arrays (gx alone: 105 MB for the 1×1024 LSTM
# at T = 100, N = 64); see inference_chunks.  2 MB, one core's L2 on the machines measured: at 4 MB the
# LSTM 2×512 forward peaked above PyTorch's (32.2 against 28.3 MB; 27.0 at 2 MB, every size below
# PyTorch's).  Time at 2 MB over 4 MB, alternating in one process (2026-12-05, X): LSTM 2×128 1.00-1.01 (one
# chunk: see inference_chunks), 2×256 0.99-1.01, 2×512 0.99-1.00, 1×1024 0.99-1.01; GRU and RNN 0.96-1.04.
# BPTT_INFER_WINDOW_BYTES=0: the whole sequence at once.
INFER_WINDOW_BYTES = int(os.environ.get("BPTT_INFER_WINDOW_BYTES", 2 << 20)) or 1 << 62

# Attention in tiles (bptt.nn.attention_tiles) when the scores (B, L, S) take at least this many bytes,
# each tile's scores at most ATTENTION_TILE_BYTES (a quarter of one core's 2 MB L2 on the machine measured,
# leaving room for the tile's q, k, v and the products' packing).
ATTENTION_TILES_MIN_BYTES = int(os.environ.get("BPTT_ATTENTION_TILES_MIN_BYTES", 2 << 20))
ATTENTION_TILE_BYTES = 512 * 1024

# The threads of run_parallel (the batch slices, in the wavefront module) wait for each other, and for
# their next job, by polling this long before they sleep: a vCPU that sleeps runs slower for a
# while after it wakes.  2×128 LSTM, two slices, alternating in one process (12 rounds, a slow
# spell): inference 7.06 → 6.95 ms, training step 24.03 → 22.85 ms, GRU inference 5.51 → 5.26 ms;
# 0.5 ms gained less than 2 ms, 10 ms no more.  BPTT_SPIN_SECONDS=0: sleep at once.
SPIN_SECONDS = float(os.environ.get("BPTT_SPIN_SECONDS", 0.002))


def step_blas_limit(macs, blas=True):
    """A context manager limiting BLAS to one thread for per-step products of ``macs``, or a no-op: for
    long products, and when the steps call no BLAS (``blas`` false: panels or hand loops, where
    entering and leaving the limit cost 4 µs of a 150 µs LSTM forward at N = 1)."""
    if macs >= ONE_THREAD_MACS or not blas:
        return contextlib.nullcontext()
    return threads.single_thread_blas()


def sampling_blas_limit(weight_bytes, macs):
    """The BLAS limit for one sampling step whose largest recurrent weight has ``weight_bytes``:
    memory-bound products (``STEP_THREADS_BYTES`` and more) keep BLAS's threads for their
    bandwidth, smaller ones follow :func:`step_blas_limit`."""
    if weight_bytes >= STEP_THREADS_BYTES:
        return contextlib.nullcontext()
    return step_blas_limit(macs)


def batch_parts(N, macs, training, fused):
    """The batch slices a recurrent stack runs in parallel threads, each slice through the
    whole stack: one per core when every slice keeps at least ``SPLIT_MIN_ROWS`` rows,
    else [0:N].  ``macs`` is one step's product N·G·P, ``fused`` whether the layer runs on
    the compiled kernels (the reference loop never splits).

    A per-step product of N rows is too small for BLAS threads, so a layer's time
    loop keeps one core busy; the wavefront gives the other core the next layer,
    with a pipeline to fill and drain and work to balance.  Slices of the batch are
    independent through every step of every layer, bidirectional and one-layer
    stacks too; only the weight gradients are summed.  Against the wavefront, same
    process, alternating (2 cores, T = 50, training step): 2×128 at N = 50 1.03-1.24×
    (LSTM), 0.93-1.21× (GRU), 1.09-1.21× (RNN) over three runs; 2×128 LSTM at N = 32
    and 16 1.20× and 1.26×; one-layer stacks, which have no wavefront, 1.24-1.44×.
    In training mode, products of ``SPLIT_MAX_MACS`` multiply-adds and more (by default
    none) stay with the wavefront: the backward of a split needs a second set of weight
    gradients.  In eval mode, which keeps nothing for a backward (unless ``need_backward=True``),
    every size splits: forward only, against the wavefront, LSTM 2×256 1.26×, 2×512
    1.16×, 1×1024 (N = 64) 1.05×; GRU 1.14-1.18×, RNN 1.15-1.16× at 2×512 and 1×1024
    (same process, alternating, outputs identical up to summation order).
    """
    whole = [slice(0, N)]
    if not fused or N < 2 * SPLIT_MIN_ROWS:
        return whole
    if macs <= SMALL_MACS or (training and macs >= SPLIT_MAX_MACS):
        return whole  # a step of µs (compiled loops), or products for the wavefront (see SPLIT_MAX_MACS)
    n = min(threads.blas_threads(), N // SPLIT_MIN_ROWS)
    if n < 2:
        return whole
    return even_slices(N, n)


# Products (bptt.nn.ops) and row-wise passes (bptt.kernels.transformer) split their rows among threads only
# where BLAS is held to one thread (threads.single_thread_blas) because bptt runs threads of its own: a model
# step whose recurrent layers run in threads, or a Transformer layer whose attention runs in tiles.  A slice
# keeps at least MIN_ROWS_PER_THREAD rows (a 2,500-row decoder product is 0.4-0.6 ms; handing half of it to
# another thread costs some tens of µs), or fewer for wide rows: MIN_MACS_PER_THREAD multiply-adds (about
# 0.1 ms on one core) are worth a thread.  ELEMENT_MACS: one element of a compiled element-wise pass costs
# about as much as this many multiply-adds of a product (the exact GELU 1.5 ns; a product 0.013 ns a
# multiply-add on one core of the machine measured).
MIN_ROWS_PER_THREAD = 512
MIN_MACS_PER_THREAD = 16_000_000
ELEMENT_MACS = 100


def row_slices(rows: int, macs_per_row: int) -> list[slice]:
    """Slices of ``rows`` to run in parallel threads (:func:`bptt.runtime.wavefront.run_parallel`), or one
    slice: several only inside :func:`bptt.runtime.threads.single_thread_blas`, one per core
    (:func:`bptt.runtime.threads.blas_threads`), each of at least the rows the constants above ask."""
    least = max(1, min(MIN_ROWS_PER_THREAD, -(-MIN_MACS_PER_THREAD // max(1, macs_per_row))))
    if not threads.inside_single_thread_blas() or rows < 2 * least:
        return [slice(0, rows)]
    return even_slices(rows, min(threads.blas_threads(), rows // least))


def even_slices(n: int, parts: int) -> list[slice]:
    """[0, n) cut into ``parts`` contiguous slices whose lengths differ by at most one."""
    bounds = [round(n * i / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def time_chunks(T, macs, num_layers, bidirectional, fused):
    """``(chunks, threads)`` for :func:`bptt.runtime.wavefront.run_wavefront`: the time
    chunks [(t0, t1)] a stack's layers run in, and the threads running them.

    One chunk and one thread (layer after layer) unless this is a unidirectional
    stack on the fused kernels' BLAS path and BLAS may use more than one thread:
    then ``WAVEFRONT_CHUNKS`` chunks (fewer if T is shorter).  Bidirectional stacks
    need a layer's whole output before the next layer's reverse direction can start.
    """
    whole = [(0, T)], 1
    if not fused or num_layers < 2 or bidirectional or T < 2:
        return whole
    if macs <= SMALL_MACS:
        return whole  # compiled-loop sizes: a step takes µs, less than handing a chunk over
    n = threads.blas_threads()
    if n < 2:
        return whole
    c = min(T, WAVEFRONT_CHUNKS)
    bounds = [round(T * i / c) for i in range(c + 1)]
    return list(zip(bounds[:-1], bounds[1:])), n


def inference_chunks(T, step_bytes):
    """The time chunks [(t0, t1)] of an inference forward run a window at a time: as many steps a
    chunk as fit ``INFER_WINDOW_BYTES`` of windows (``step_bytes``: one step's rows of them, e.g.
    N·(G + L·P)·itemsize; at least one step), cut evenly; one chunk when the whole sequence fits in
    two windows: cutting it in two saves little memory and costs the char-rnn size (LSTM 2×128,
    T = 50, slices of 25 rows: 3.8 MB) 1-2% of its validation pass."""
    if T * step_bytes <= 2 * INFER_WINDOW_BYTES:
        return [(0, T)]
    c = -(-T // max(1, min(T, INFER_WINDOW_BYTES // max(step_bytes, 1))))  # the number of chunks
    bounds = [round(T * i / c) for i in range(c + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
