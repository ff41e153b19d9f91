"""Building ONNX graphs: the lazy import, a small graph builder, the recurrent layers as ONNX nodes, atomic saving.

Shape legend: T time steps, N batch, D input features, H hidden units, P = proj_size or H
(the width of h), L layers, K directions (2 if bidirectional else 1), G = g·H stacked gates.

A bptt layer of L layers becomes, per layer k (input X_k time-major (T, N, D_k))::

    Y, Y_h[, Y_c] = RNN | LSTM | GRU (X_k, W, R, B, sequence_lens, initial_h[, initial_c])
                    Y (T, K, N, P),  Y_h (K, N, P),  Y_c (K, N, H)
    X_{k+1}       = Reshape(Transpose(Y, [0, 2, 1, 3]), [0, 0, K·P])      (T, N, K·P)
    h_n           = Concat(Y_h of every layer, axis 0)                    (L·K, N, P)

with the gate blocks of W (K, G, D_k), R (K, G, P) and B = [Wb, Rb] (K, 2G) reordered from
torch's to ONNX's (see ``TORCH_TO_ONNX``).  An LSTM with proj_size has no standard
operator: each layer and direction is a ``Scan`` over the cell in basic operators (see
:func:`_scan_lstm_direction`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_OPSET", "EXPORT_OPSETS", "OnnxError", "require_onnx", "Builder", "TORCH_TO_ONNX",
           "emit_recurrent", "save_model", "elem_type"]

#: The opset every export pins unless told otherwise.  ONNX Runtime 1.32 runs the RNN, LSTM,
#: GRU and Scan operators of opsets 14 to 21 (it has no kernel for RNN-22, the version opset 22
#: brings); 14 is the first with the ``layout`` attribute and Scan, Squeeze, Unsqueeze and Split
#: take their axes/splits as inputs from opset 13 on, so one graph builder serves the whole range.
DEFAULT_OPSET = 17
EXPORT_OPSETS = range(14, 22)

#: Gate blocks: ONNX block j holds torch block TORCH_TO_ONNX[mode][j].
#: LSTM torch (i, f, g, o) → ONNX (i, o, f, c);  GRU torch (r, z, n) → ONNX (z, r, h).
TORCH_TO_ONNX = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn_tanh": [0], "rnn_relu": [0]}
ONNX_OP = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}

_INSTALL = 'ONNX support needs the optional extra: pip install "bptt[onnx]"'


class OnnxError(ValueError):
    """An ONNX file that cannot be written, read or understood (one-line message)."""


def require_onnx():
    """(onnx, onnxruntime), imported now; an OnnxError saying what to install when either is missing."""
    try:
        import onnx
        import onnx.checker  # noqa: F401  (a real package, not a namespace folder named onnx)
        import onnx.helper  # noqa: F401
        import onnx.numpy_helper  # noqa: F401
        import onnxruntime
    except ImportError:
        raise OnnxError(_INSTALL) from None
    return onnx, onnxruntime


def elem_type(dtype) -> int:
    """The ONNX TensorProto element type of a NumPy float dtype."""
    onnx, _ = require_onnx()
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return onnx.TensorProto.FLOAT
    if dtype == np.float64:
        return onnx.TensorProto.DOUBLE
    raise OnnxError(f"only float32 and float64 models can be exported, got {dtype}")


class Builder:
    """Nodes, initializers, inputs and outputs of one graph, with unique names.

    ``sub()`` makes the builder of a subgraph (a Scan body): its names never clash
    with the outer graph's.
    """

    def __init__(self, dtype, opset: int, names: set | None = None):
        self.onnx, _ = require_onnx()
        self.dtype = np.dtype(dtype)
        self.elem = elem_type(self.dtype)
        self.opset = opset
        self.names = names if names is not None else set()
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []

    def sub(self) -> Builder:
        return Builder(self.dtype, self.opset, self.names)

    def name(self, base: str) -> str:
        n, i = base, 1
        while n in self.names:
            i += 1
            n = f"{base}_{i}"
        self.names.add(n)
        return n

    def const(self, array, base: str) -> str:
        """An initializer holding ``array`` (its own dtype)."""
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values, base: str = "ints") -> str:
        return self.const(np.asarray(values, np.int64), base)

    def node(self, op: str, inputs, outputs=1, base: str | None = None, **attrs):
        """Add one node; its output name (or list of names when ``outputs`` > 1 or a list of bases)."""
        base = base or op.lower()
        if isinstance(outputs, int):
            outs = [self.name(base if outputs == 1 else f"{base}_{j}") for j in range(outputs)]
        else:
            outs = [self.name(o) if o else "" for o in outputs]
        while inputs and inputs[-1] == "":  # optional inputs left out at the end
            inputs = inputs[:-1]
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), outs, name=self.name(f"{base}_node"), **attrs))
        return outs[0] if len(outs) == 1 else outs

    def input(self, name: str, elem: int, shape) -> str:
        self.names.add(name)
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape) -> str:
        """Expose ``value`` as the graph output ``name`` (through an Identity when the names differ)."""
        if value != name:
            self.names.add(name)
            self.nodes.append(self.onnx.helper.make_node("Identity", [value], [name], name=self.name(f"{name}_out")))
        self.outputs.append(self.onnx.helper.make_tensor_value_info(name, elem, shape))
        return name

    def graph(self, name: str):
        return self.onnx.helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)

    def model(self, name: str, metadata: dict | None = None):
        from bptt import __version__

        m = self.onnx.helper.make_model(self.graph(name), producer_name="bptt", producer_version=__version__,
                                        opset_imports=[self.onnx.helper.make_opsetid("", self.opset)])
        m.ir_version = min(m.ir_version, 10)  # what ONNX Runtime 1.18 (the oldest the extra allows) reads
        for k, v in (metadata or {}).items():
            m.metadata_props.add(key=k, value=v)
        return m

    # ------------------------------------------------------------------ small compositions
    def dim(self, x: str, axis: int) -> str:
        """The length of x's axis as a 1-element int64 tensor."""
        return self.node("Gather", [self.node("Shape", [x]), self.ints([axis])], base="dim", axis=0)

    def zeros_state(self, x: str, width: int) -> str:
        """Zeros (N, width) of the graph's dtype, N the batch axis of time-major x (T, N, D)."""
        shape = self.node("Concat", [self.dim(x, 1), self.ints([width])], axis=0)
        zero = self.onnx.helper.make_tensor("zero", self.elem, [1], [0.0])
        return self.node("ConstantOfShape", [shape], base="zeros", value=zero)

    def flip_time(self, x: str) -> str:
        """x reversed along axis 0 (time)."""
        return self.node("Slice", [x, self.ints([-1]), self.ints([np.iinfo(np.int64).min]), self.ints([0]),
                                   self.ints([-1])], base=f"{x}_flipped")

    def mean(self, x: str, axes) -> str:
        """ReduceMean over ``axes``, kept (their axes became an input at opset 18)."""
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.ints(list(axes))], keepdims=1)
        return self.node("ReduceMean", [x], axes=list(axes), keepdims=1)

    def affine(self, linear, x: str, base: str) -> str:
        """x Wᵀ + b of a bptt Linear (W (out, in); the bias left out when it has none)."""
        y = self.node("MatMul", [x, self.const(np.ascontiguousarray(linear.params["weight"].T), f"{base}_weight_T")])
        bias = linear.params.get("bias")
        return self.node("Add", [y, self.const(bias, f"{base}_bias")], base=base) if bias is not None else y

    def layer_norm(self, norm, x: str, base: str) -> str:
        """A bptt LayerNorm over the last axis in basic operators, in the graph's own precision (the
        LayerNormalization operator, opset 17, would hold its mean and variance in float32 unless told,
        and neither ONNX's reference evaluator nor ONNX Runtime runs it told otherwise):

            μ = mean(x),  x̂ = (x − μ) / √(mean((x − μ)²) + ε),  y = γ x̂ + β"""
        xc = self.node("Sub", [x, self.mean(x, [-1])], base=f"{base}_centred")
        var = self.mean(self.node("Mul", [xc, xc]), [-1])
        std = self.node("Sqrt", [self.node("Add", [var, self.const(np.array(norm.eps, self.dtype), f"{base}_eps")])])
        y = self.node("Div", [xc, std])
        if norm.params.get("weight") is not None:
            y = self.node("Mul", [y, self.const(norm.params["weight"], f"{base}_weight")])
        if norm.params.get("bias") is not None:
            y = self.node("Add", [y, self.const(norm.params["bias"], f"{base}_bias")], base=base)
        return y

    def activation(self, module, x: str, base: str) -> str:
        """A feed-forward activation of :mod:`bptt.nn.feedforward`: ReLU, or GELU exact (x ½ (1 + erf(x/√2)))
        or in its tanh form (½ x (1 + tanh(√(2/π) (x + 0.044715 x³))))."""
        from bptt.nn.feedforward import GELU, ReLU

        def c(v, name):
            return self.const(np.array(v, self.dtype), f"{base}_{name}")

        if isinstance(module, ReLU):
            return self.node("Relu", [x], base=base)
        if not isinstance(module, GELU):
            raise OnnxError(f"no ONNX form for the activation {type(module).__name__}")
        if module.approximate == "tanh":
            inner = self.node("Mul", [c(np.sqrt(2 / np.pi), "k"), self.node("Add", [
                x, self.node("Mul", [c(0.044715, "a"), self.node("Mul", [x, self.node("Mul", [x, x])])])])])
            phi2 = self.node("Add", [c(1.0, "one"), self.node("Tanh", [inner])])
        else:
            phi2 = self.node("Add", [c(1.0, "one"), self.node("Erf", [self.node("Mul", [x, c(1 / np.sqrt(2), "inv_sqrt2")])])])
        return self.node("Mul", [self.node("Mul", [x, c(0.5, "half")]), phi2], base=base)  # x Φ(x); 1 + erf = 2Φ

    def time_mask(self, x: str, lengths: str) -> str:
        """(T, N, 1) bool, True where t < lengths[n], for time-major x (T, N, D) and lengths (N,) int64."""
        T = self.node("Squeeze", [self.dim(x, 0), self.ints([0])])
        t = self.node("Range", [self.const(np.array(0, np.int64), "t0"), T, self.const(np.array(1, np.int64), "dt")])
        valid = self.node("Less", [self.node("Unsqueeze", [t, self.ints([1])]), lengths])  # (T, 1) < (N,) → (T, N)
        return self.node("Unsqueeze", [valid, self.ints([2])], base="mask")


def _gates_to_onnx(w, mode):
    """Reorder the gate blocks (axis 0, G = g·H rows) from torch's order to ONNX's."""
    blocks = np.split(np.asarray(w), len(TORCH_TO_ONNX[mode]), axis=0)
    return np.concatenate([blocks[j] for j in TORCH_TO_ONNX[mode]], axis=0)


def layer_params(layer, k):
    """Layer k's parameters per direction: [(W_ih, W_hh, b_ih | None, b_hh | None, W_hr | None)] in torch layout."""
    out, p = [], layer.params
    for sfx in ("", "_reverse")[: layer.num_directions]:
        out.append(tuple(p.get(f"{n}_l{k}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")))
    return out


def emit_recurrent(b: Builder, layer, x: str, lengths: str | None = None, h0: str | None = None,
                   c0: str | None = None):
    """The nodes of a bptt RNN / LSTM / GRU over time-major x (T, N, D).

    lengths (N,) int64 or None; h0 (L·K, N, P), c0 (L·K, N, H) or None (zeros).
    Returns (y (T, N, K·P), h_n (L·K, N, P), c_n (L·K, N, H) or None).
    """
    reg = layer.regularizer  # dropouts and weight drop are the identity in eval mode; these change the function
    if reg is not None and (reg.opts.layer_norm or reg.opts.peephole or reg.opts.zoneout or reg.opts.z_c):
        raise OnnxError(f"ONNX export does not support layer_norm, peephole or zoneout yet ({layer!r})")
    L, K, H, P = layer.num_layers, layer.num_directions, layer.hidden_size, layer.out_size
    lstm = layer.mode == "lstm"
    seq_lens = b.node("Cast", [lengths], base="seq_lens", to=b.onnx.TensorProto.INT32) if lengths else ""
    mask = b.time_mask(x, lengths) if lengths and layer.proj_size else None
    hs, cs = [], []
    for k in range(L):
        rows = (b.ints([k * K]), b.ints([(k + 1) * K]), b.ints([0])) if h0 or c0 else ()
        h0_k = b.node("Slice", [h0, *rows], base=f"h0_l{k}") if h0 else ""  # (K, N, P): layer k's directions
        c0_k = b.node("Slice", [c0, *rows], base=f"c0_l{k}") if c0 else ""
        params = layer_params(layer, k)
        if layer.proj_size:
            x, h_k, c_k = _scan_lstm_layer(b, params, k, x, mask, h0_k, c0_k, H, P)
        else:
            x, h_k, c_k = _standard_layer(b, layer, params, k, x, seq_lens, h0_k, c0_k)
        hs.append(h_k)
        cs.append(c_k)
    h_n = hs[0] if L == 1 else b.node("Concat", hs, base="h_n", axis=0)
    c_n = None if not lstm else cs[0] if L == 1 else b.node("Concat", cs, base="c_n", axis=0)
    return x, h_n, c_n


def _standard_layer(b, layer, params, k, x, seq_lens, h0_k, c0_k):
    """One layer as one standard ONNX RNN / LSTM / GRU node (both directions in it)."""
    mode, K, H = layer.mode, layer.num_directions, layer.hidden_size
    W = b.const(np.stack([_gates_to_onnx(p[0], mode) for p in params]), f"W_l{k}")  # (K, G, D_k)
    R = b.const(np.stack([_gates_to_onnx(p[1], mode) for p in params]), f"R_l{k}")  # (K, G, H)
    B = ""
    if layer.bias:  # B = [Wb, Rb] per direction (K, 2G)
        B = b.const(np.stack([np.concatenate([_gates_to_onnx(p[2], mode), _gates_to_onnx(p[3], mode)])
                              for p in params]), f"B_l{k}")
    attrs = {"hidden_size": H, "direction": "bidirectional" if K == 2 else "forward"}
    if mode == "gru":
        attrs["linear_before_reset"] = 1  # torch's n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    if mode.startswith("rnn"):
        attrs["activations"] = ["Relu" if mode == "rnn_relu" else "Tanh"] * K
    ins = [x, W, R, B, seq_lens, h0_k]
    outs = [f"Y_l{k}", f"Y_h_l{k}"]
    if mode == "lstm":
        ins.append(c0_k)
        outs.append(f"Y_c_l{k}")
    res = b.node(ONNX_OP[mode], ins, outs, base=f"{ONNX_OP[mode].lower()}_l{k}", **attrs)
    Y, h_k, c_k = res[0], res[1], (res[2] if mode == "lstm" else None)
    # (T, K, N, H) → (T, N, K, H) → (T, N, K·H): the directions' features side by side, as torch
    y = b.node("Reshape", [b.node("Transpose", [Y], perm=[0, 2, 1, 3]), b.ints([0, 0, K * H])], base=f"x_l{k + 1}")
    return y, h_k, c_k


def _scan_lstm_layer(b, params, k, x, mask, h0_k, c0_k, H, P):
    """An LSTM layer with projections: one Scan per direction, outputs joined as the standard nodes' are."""
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        pick = b.ints([d])
        h0 = b.node("Squeeze", [b.node("Gather", [h0_k, pick], axis=0), b.ints([0])]) if h0_k else b.zeros_state(x, P)
        c0 = b.node("Squeeze", [b.node("Gather", [c0_k, pick], axis=0), b.ints([0])]) if c0_k else b.zeros_state(x, H)
        y, h, c = _scan_lstm_direction(b, p, f"l{k}" + ("_reverse" if d else ""), x, mask, h0, c0, reverse=d == 1)
        ys.append(y)
        hs.append(b.node("Unsqueeze", [h, b.ints([0])]))
        cs.append(b.node("Unsqueeze", [c, b.ints([0])]))
    if len(params) == 1:
        return ys[0], hs[0], cs[0]
    return (b.node("Concat", ys, base=f"x_l{k + 1}", axis=2), b.node("Concat", hs, axis=0),
            b.node("Concat", cs, axis=0))


def _scan_lstm_direction(b, p, tag, x, mask, h0, c0, reverse):
    """One direction of an LSTM layer with projections as a Scan over time.

    Outside the loop, one product for all steps: gx = X W_ihᵀ + b_ih + b_hh  (T, N, 4H).
    The body, per step t (torch's gate order, written out here)::

        i, f, g, o = split(gx_t + h W_hhᵀ)              (N, H) each
        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)                   (N, H)
        h' = (σ(o) ⊙ tanh(c')) W_hrᵀ                      (N, P)
        with lengths: h, c ← where(t < len, h', c' ; h, c), y_t = where(t < len, h', 0)

    so the state freezes after each sequence's end (the forward direction's h_n is taken at
    the last valid step) and, scanning backwards, stays the initial one until it starts.
    """
    W_ih, W_hh, b_ih, b_hh, W_hr = p
    H = W_hh.shape[0] // 4
    gx = b.node("MatMul", [x, b.const(np.ascontiguousarray(W_ih.T), f"W_ih_T_{tag}")])
    if b_ih is not None:
        gx = b.node("Add", [gx, b.const(b_ih + b_hh, f"b_{tag}")], base=f"gx_{tag}")

    s = b.sub()
    onnx = s.onnx
    h_in = s.input(s.name(f"h_in_{tag}"), s.elem, None)
    c_in = s.input(s.name(f"c_in_{tag}"), s.elem, None)
    gx_t = s.input(s.name(f"gx_t_{tag}"), s.elem, None)
    gates = s.node("Add", [gx_t, s.node("MatMul", [h_in, s.const(np.ascontiguousarray(W_hh.T), f"W_hh_T_{tag}")])])
    i, f, g, o = s.node("Split", [gates, s.ints([H] * 4)], 4, base=f"gates_{tag}", axis=1)
    c = s.node("Add", [s.node("Mul", [s.node("Sigmoid", [f]), c_in]),
                       s.node("Mul", [s.node("Sigmoid", [i]), s.node("Tanh", [g])])], base=f"c_{tag}")
    h = s.node("MatMul", [s.node("Mul", [s.node("Sigmoid", [o]), s.node("Tanh", [c])]),
                          s.const(np.ascontiguousarray(W_hr.T), f"W_hr_T_{tag}")], base=f"h_{tag}")
    y = s.node("Identity", [h], base=f"y_{tag}")
    if mask is not None:
        m_t = s.input(s.name(f"mask_t_{tag}"), onnx.TensorProto.BOOL, None)
        h = s.node("Where", [m_t, h, h_in], base=f"h_kept_{tag}")
        c = s.node("Where", [m_t, c, c_in], base=f"c_kept_{tag}")
        y = s.node("Where", [m_t, y, s.const(np.zeros(1, b.dtype), "zero")], base=f"y_{tag}")
    for v in (h, c, y):
        s.output(v, s.name(f"{v}_out"), s.elem, None)
    scans = [gx] + ([mask] if mask is not None else [])
    if reverse:  # time flipped around the Scan (a forward Scan runs everywhere, ONNX's reference evaluator too)
        scans = [b.flip_time(v) for v in scans]
    h_n, c_n, ys = b.node("Scan", [h0, c0, *scans], [f"h_n_{tag}", f"c_n_{tag}", f"y_{tag}"], base=f"scan_{tag}",
                          body=s.graph(f"lstm_cell_{tag}"), num_scan_inputs=len(scans))
    return (b.flip_time(ys) if reverse else ys), h_n, c_n


def save_model(model, path) -> Path:
    """Check ``model`` (``onnx.checker.check_model(full_check=True)``) and write it atomically:
    a temporary file next to ``path``, then ``os.replace``; ``path`` is untouched on any failure."""
    onnx, _ = require_onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # a bug of the exporter, not of the user's input: say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxError(f"the exported graph fails the ONNX checker: {first}") from None
    data = model.SerializeToString()
    final = Path(path)
    directory = final.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise OnnxError(f"cannot write {final}: {e.strerror or e} (expected a path in a writable directory)") from None
    try:
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        raise OnnxError(f"cannot write {final}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return final
