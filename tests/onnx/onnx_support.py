"""Helpers shared by the tests of bptt.onnx (a uniquely named module, not a second conftest.py).

onnx and onnxruntime are an optional extra: ``require_onnx()`` skips the calling test
module when they are missing, unless ``BPTT_REQUIRE_TORCH=1`` is set (as in CI, where
every optional reference must be there): then a missing package is a failure.
"""

import os

import numpy as np
import pytest


def require_onnx():
    if os.environ.get("BPTT_REQUIRE_TORCH") == "1":
        import onnx.helper  # noqa: F401  (must be importable in CI: an ImportError here fails)
        import onnxruntime  # noqa: F401

        return
    pytest.importorskip("onnx.helper")
    pytest.importorskip("onnxruntime")


def random_layer(rng, dtype=np.float32, *, allow_lengths=True, allow_relu=True, allow_proj=True, standard=False):
    """A random small bptt RNN / LSTM / GRU and the options of one export of it.

    → (layer, options) with options {"lengths": bool, "initial_state": bool}.
    """
    from bptt.nn.rnn import GRU, LSTM, RNN

    kinds = ["rnn_tanh", "lstm", "gru"] + (["rnn_relu"] if allow_relu else []) + (["lstm_proj"] if allow_proj else [])
    kind = kinds[rng.integers(len(kinds))]
    H = int(rng.integers(2, 6))
    kw = dict(num_layers=int(rng.integers(1, 3)), bidirectional=bool(rng.integers(2)), batch_first=bool(rng.integers(2)),
              bias=bool(rng.random() < 0.75), dtype=dtype, rng=int(rng.integers(1 << 30)))
    D = int(rng.integers(1, 5))
    if kind.startswith("rnn"):
        layer = RNN(D, H, nonlinearity="relu" if kind == "rnn_relu" else "tanh", **kw)
    elif kind == "gru":
        layer = GRU(D, H, **kw)
    else:
        layer = LSTM(D, H, proj_size=int(rng.integers(1, H)) if kind == "lstm_proj" else 0, **kw)
    opts = {"lengths": allow_lengths and bool(rng.integers(2)), "initial_state": bool(rng.integers(2))}
    return layer.eval(), opts


def random_feeds(rng, layer, opts, T=None, N=None):
    """Inputs for an exported layer (graph feeds) and the same as bptt call arguments."""
    T = T or int(rng.integers(1, 6))
    N = N or int(rng.integers(1, 4))
    L, K, H, P, D = layer.num_layers, layer.num_directions, layer.hidden_size, layer.out_size, layer.input_size
    dt = layer.dtype
    x = rng.standard_normal((N, T, D) if layer.batch_first else (T, N, D)).astype(dt)
    feeds, state, lengths = {"input": x}, None, None
    if opts["lengths"]:
        lengths = rng.integers(1, T + 1, size=N)
        lengths[rng.integers(N)] = T  # the padded length is the longest
        feeds["lengths"] = lengths.astype(np.int64)
    if opts["initial_state"]:
        h0 = rng.standard_normal((L * K, N, P)).astype(dt)
        feeds["h_0"], state = h0, h0
        if layer.mode == "lstm":
            c0 = rng.standard_normal((L * K, N, H)).astype(dt)
            feeds["c_0"], state = c0, (h0, c0)
    return feeds, (x, state, lengths)


def bptt_outputs(layer, args):
    """[output, h_n(, c_n)] of the bptt layer: the order of the exported graph's outputs."""
    y, s = layer(*args)
    return [y] + (list(s) if isinstance(s, tuple) else [s])


def max_error(got, want):
    """The largest |got - want| over every output, relative to max(1, |want|)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
    return max(float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w)))) for g, w in zip(got, want, strict=True))
