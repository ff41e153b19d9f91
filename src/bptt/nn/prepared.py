"""A recurrent layer direction's weights as one forward call's products read them, and its input product.

Shape legend: T time steps (t of them in a chunk), N batch, D_k the input features of layer k,
G = g·H stacked gates.

:class:`bptt.nn.rnn.RNNBase` prepares each layer direction's weights once per forward call (once per
block of :meth:`bptt.nn.module.Module.frozen_weights`), and its batch slices share them:

* for the input product gx = x W_ihᵀ + b over all steps (:func:`input_product`): W_ihᵀ and the bias
  packed for the register-blocked products (``kernels.PackedAffine``: at the shapes of a batch slice
  90–109 against OpenBLAS's 73–93 GFLOP/s on one core); or W_ihᵀ contiguous for BLAS (a product reads
  W_ihᵀ untransposed faster: 198 against 217 µs for a 300×128 by 128×512 chunk), the bias added after;
  or, for a one-hot input, the table W_ihᵀ + b whose rows the input picks;
* for the recurrent product, a ``kernels.Panels`` that the first run to need it packs, so that the
  slices share one copy (packing or transposing a 1024×4096 matrix per slice took 7–30 ms of a 650 ms
  forward); its ``for_backward()`` does the same for the backward's W_hh, through the runs' caches.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Prepared", "prepare", "input_product"]


class Prepared(NamedTuple):
    """One layer direction's weights as a forward call's products read them (:func:`prepare`)."""

    table: np.ndarray | None  # W_ihᵀ (D_k, G) contiguous for BLAS, or W_ihᵀ + bias for a one-hot gather
    bias: np.ndarray | None  # the bias still to add after the BLAS product
    affine: object  # kernels.PackedAffine: x W_ihᵀ + bias on packed panels, or None
    panels: object  # kernels.Panels: the packed recurrent weights, shared by the batch slices (or None)


def prepare(W_ih, bias, one_hot, panels, kernels) -> Prepared:
    """The weights of one layer direction, W_ih (G, D_k) and the input bias (G,) or None (b_ih, plus
    b_hh where it adds to the same sum), for a forward whose input is one-hot indices (``one_hot``),
    with register-blocked products (``panels``) or BLAS; ``kernels``: :mod:`bptt.kernels`, or None
    for the reference loop."""
    shared = kernels.Panels() if kernels is not None else None
    if one_hot:
        table = np.ascontiguousarray(W_ih.T) if bias is None else np.add(W_ih.T, bias, order="C")
        return Prepared(table, None, None, shared)
    if panels:
        return Prepared(None, None, kernels.PackedAffine(W_ih, bias), shared)
    table = kernels.transposed(W_ih) if kernels is not None else np.ascontiguousarray(W_ih.T)
    return Prepared(table, bias, None, shared)


def input_product(prepared: Prepared, inp, gx, one_hot):
    """gx = inp W_ihᵀ + b, into gx: inp (t, N, D_k) → gx (t, N, G), as one (t·N, D_k)×(D_k, G)
    product (on packed panels, the bias added as the sums start, or by BLAS); for a one-hot input
    (indices (t, N)) the product picks rows of W_ihᵀ + b.  ``inp`` may be a batch slice's view
    (copied for the product), ``gx`` must be contiguous."""
    table, bias, affine, _ = prepared
    G = gx.shape[2]
    if affine is not None:
        affine(np.ascontiguousarray(inp.reshape(-1, inp.shape[2])), gx.reshape(-1, G))
        return
    if one_hot:
        # mode="clip": the indices were checked by the layer, and the default mode="raise"
        # writes through a buffer when given out= (measured 0.28 against 0.09 ms for 2,500 rows)
        np.take(table, inp.reshape(-1), axis=0, out=gx.reshape(-1, G), mode="clip")
        return
    np.matmul(inp.reshape(-1, inp.shape[2]), table, out=gx.reshape(-1, G))
    if bias is not None:
        gx += bias
