"""Import ONNX recurrent models as bptt modules.

Shape legend: T time steps, N batch, D input features, H hidden units, L layers, K directions,
G = g·H stacked gates, C output classes of the final linear layer.

What is understood (anything else: an OnnxError naming the first node not understood):

* a stack of standard ``LSTM``, ``GRU`` or ``RNN`` nodes of one kind, each fed the previous
  one's output Y (T, K, N, H) through layout-only nodes (Transpose, Reshape, Squeeze,
  Unsqueeze, Identity, Cast, Flatten); a bidirectional node's Y must pass a Transpose with
  perm [0, 2, 1, 3] (the directions' features side by side, as torch and bptt lay them out);
* forward or bidirectional direction, default activations (RNN: Tanh or Relu), no clip, no
  peepholes, input_forget 0, layout 0, GRU with linear_before_reset = 1 (torch's and bptt's
  GRU; linear_before_reset = 0, the Keras ``reset_after=False`` GRU, has no bptt equivalent);
* a Transpose with perm [1, 0, 2] between the graph input and the first node (a batch-major
  input, as tf2onnx writes Keras models): the layer is made ``batch_first``; the same
  Transpose of a layer's output is accepted on the way to the graph output or the linear
  layer, not into the next recurrent layer (other Transposes of the sequence are refused);
* optionally a final linear layer on the output sequence, or on the last layer's final h
  (a Keras ``LSTM(return_sequences=False)`` + ``Dense``): ``Gemm``, or ``MatMul`` + ``Add``,
  weights in initializers.

Nodes on side paths (the initial states, sequence_lens, Shape reads, the final states' Concat) are not
part of the modules: ``sequence_lens`` becomes the ``lengths`` argument and initial states the
``state`` argument of ``forward``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bptt.nn.layers import Linear
from bptt.nn.module import Module
from bptt.onnx.graph import TORCH_TO_ONNX, OnnxError, require_onnx

__all__ = ["Imported", "load", "read_model", "MIN_IMPORT_OPSET"]

#: Opset 7 is the first with today's RNN / LSTM / GRU (opset 1's had an ``output_sequence`` attribute).
MIN_IMPORT_OPSET = 7
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten"}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


class Imported(Module):
    """An imported ONNX model: ``rnn`` (a bptt RNN, LSTM or GRU) and ``decoder`` (a Linear, or None).

    ``forward(x, state=None, lengths=None)`` → ``(out, state_n)``: ``y, state_n = rnn(x, state,
    lengths)``; ``out = y`` without a decoder, else ``decoder(y)`` (``head == "sequence"``,
    out (T, N, C)) or ``decoder(h_n[-1])`` (``head == "state"``, out (N, C)).
    """

    def __init__(self, rnn, decoder=None, head="sequence"):
        super().__init__()
        self.rnn = self.add_module("rnn", rnn)
        self.decoder = self.add_module("decoder", decoder) if decoder is not None else None
        self.head = head

    def forward(self, x, state=None, lengths=None):
        y, state_n = self.rnn(x, state, lengths)
        if self.decoder is None:
            return y, state_n
        if self.head == "state":
            h = state_n[0] if isinstance(state_n, tuple) else state_n
            return self.decoder(h[-1]), state_n
        return self.decoder(y), state_n

    def extra_repr(self):
        return f"head={self.head}"


def read_model(path):
    """The ModelProto in ``path``, checked: one OnnxError line for a missing, truncated or corrupt
    file, a file that fails the ONNX checker, or an opset older than :data:`MIN_IMPORT_OPSET`."""
    onnx, _ = require_onnx()
    p = Path(path)
    if not p.is_file():
        raise OnnxError(f"{p}: no such file")
    try:
        model = onnx.load(str(p))
    except Exception:  # protobuf's DecodeError and friends: the bytes are not a model
        raise OnnxError(f"{p}: not a readable ONNX model (truncated or corrupt file?)") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not model.graph.node:
        raise OnnxError(f"{p}: not a readable ONNX model (no graph or no default-domain opset; truncated file?)")
    if opset < MIN_IMPORT_OPSET:
        raise OnnxError(f"{p}: opset {opset} is too old; bptt imports opset {MIN_IMPORT_OPSET} and later")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxError(f"{p}: fails the ONNX checker (truncated or corrupt file?): {first}") from None
    return model


def _attrs(node):
    onnx, _ = require_onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _to_torch_gates(w, mode):
    """Reorder gate blocks (axis 0) from ONNX's order to torch's (the inverse of TORCH_TO_ONNX)."""
    perm = TORCH_TO_ONNX[mode]
    blocks = np.split(np.asarray(w), len(perm), axis=0)
    return np.concatenate([blocks[j] for j in np.argsort(perm)], axis=0)


class _Reader:
    """Walks the nodes in order, following the main tensor from the graph input to the output."""

    def __init__(self, model, path):
        onnx, _ = require_onnx()
        self.path = path
        g = model.graph
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
        inputs = [i.name for i in g.input if i.name not in self.consts]
        if not inputs:
            raise OnnxError(f"{path}: the graph has no input")
        self.kind = {inputs[0]: ("input", None)}  # tensor name -> (what it is, detail)
        self.layers, self.linear, self.head, self.batch_first = [], None, "sequence", False
        self.pending_matmul = None  # (output name, weight (D, C)) of a MatMul waiting for its Add
        self.nodes = list(g.node)

    def fail(self, i, node, why):
        name = f" '{node.name}'" if node.name else ""
        raise OnnxError(f"{self.path}: node {i}{name} ({node.op_type}) is not understood: {why}")

    def run(self):
        for i, node in enumerate(self.nodes):
            if node.op_type == "Constant":
                onnx, _ = require_onnx()
                a = _attrs(node)
                if "value" in a:
                    self.consts[node.output[0]] = onnx.numpy_helper.to_array(a["value"])
                    continue
            main = [x for x in node.input if x in self.kind]
            if not main:
                continue  # a side path: initial states, sequence lengths, final states' Concat, shapes
            self.visit(i, node, main)
        if not self.layers:
            raise OnnxError(f"{self.path}: no RNN, LSTM or GRU node found")
        return self

    def visit(self, i, node, main):
        op = node.op_type
        src = node.input[0] if node.input else ""
        what, detail = self.kind.get(src, (None, None))
        kinds = {self.kind[x][0] for x in main}
        if op in ("Shape", "Size"):
            return  # a shape read (e.g. for zero initial states): a side path, whatever it reads
        if kinds <= {"state", "states"} and (op == "Concat" or (op in _LAYOUT_OPS and kinds == {"states"})):
            self.kind[node.output[0]] = ("states", None)  # the final states gathered: a side path
        elif op in ("LSTM", "GRU", "RNN"):
            if what is None or self.linear is not None:
                self.fail(i, node, "a recurrent node must read the previous layer's output")
            self.recurrent(i, node, what, detail)
        elif op in _LAYOUT_OPS:
            if what is None or len(main) > 1:
                self.fail(i, node, "expected a layout change of the sequence")
            if op == "Transpose":
                perm = list(_attrs(node).get("perm", []))
                if what == "input" and perm == [1, 0, 2] and not self.layers:
                    what, detail = "input_tnd", None  # batch-major graph input made time-major
                    self.batch_first = True
                elif what == "y" and perm == [0, 2, 1, 3]:
                    detail = dict(detail, joined=True)
                elif what == "y" and perm == [1, 0, 2]:  # to batch-major: fine for the output or a linear layer
                    detail = dict(detail, batch_major=not detail.get("batch_major", False))
                elif what != "linear":  # after the linear layer, any layout of the result is the caller's
                    self.fail(i, node, f"a Transpose with perm {perm} here is not a known layout change")
            self.kind[node.output[0]] = (what, detail)
        elif op == "MatMul" and what in ("y", "state") and self.linear is None and node.input[1] in self.consts:
            self.head_from(i, node, what, detail)
            self.pending_matmul = (node.output[0], self.consts[node.input[1]])
            self.linear = self.make_linear(i, node, self.consts[node.input[1]].T, None)
            self.kind[node.output[0]] = ("linear", None)
        elif op == "Add" and self.pending_matmul and len(main) == 1 and main[0] == self.pending_matmul[0]:
            other = [x for x in node.input if x != main[0]]  # the bias may come first or second
            bias = self.consts.get(other[0]) if len(other) == 1 else None
            if bias is None:
                self.fail(i, node, "the bias must be an initializer")
            self.linear = self.make_linear(i, node, self.pending_matmul[1].T, bias.reshape(-1))
            self.pending_matmul = None
            self.kind[node.output[0]] = ("linear", None)
        elif op == "Gemm" and what in ("y", "state") and self.linear is None and node.input[1] in self.consts:
            self.head_from(i, node, what, detail)
            a = _attrs(node)
            if a.get("transA", 0):
                self.fail(i, node, "transA=1 is not a linear layer on the sequence")
            w = self.consts[node.input[1]] * a.get("alpha", 1.0)
            w = w if a.get("transB", 0) else w.T  # (C, D), Linear's layout
            bias = None
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in self.consts:
                    self.fail(i, node, "the bias C must be an initializer")
                bias = (self.consts[node.input[2]] * a.get("beta", 1.0)).reshape(-1)
            self.linear = self.make_linear(i, node, w, bias)
            self.kind[node.output[0]] = ("linear", None)
        else:
            self.fail(i, node, "only RNN/LSTM/GRU, layout changes and a final Gemm or MatMul + Add are supported")

    def head_from(self, i, node, what, detail):
        if what == "state":
            if detail["layer"] != len(self.layers) - 1 or self.layers[-1]["K"] != 1:
                self.fail(i, node, "a linear layer on a final state must read the last unidirectional layer's h")
            self.head = "state"
        elif self.layers[-1]["K"] == 2 and not detail.get("joined"):
            self.fail(i, node, "a bidirectional output must be transposed with perm [0, 2, 1, 3] first")

    def make_linear(self, i, node, w, bias):
        w = np.asarray(w)
        if w.ndim != 2 or (bias is not None and bias.shape != (w.shape[0],)):
            self.fail(i, node, f"weights of shape {w.shape} and bias {None if bias is None else bias.shape} "
                               "are not a linear layer")
        lin = Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=self.layers[-1]["W"].dtype)
        lin.load_state_dict({"weight": w, **({"bias": bias} if bias is not None else {})})
        return lin

    def recurrent(self, i, node, what, detail):
        op, a = node.op_type, _attrs(node)
        if what == "y" and detail["K"] == 2 and not detail.get("joined"):
            self.fail(i, node, "a bidirectional layer's output must be transposed with perm [0, 2, 1, 3] first")
        if what == "y" and detail.get("batch_major"):
            self.fail(i, node, "its input X is batch-major (transposed with perm [1, 0, 2]); expected time-major")
        if what not in ("input", "input_tnd", "y"):
            self.fail(i, node, f"its input X is a {what}, not a sequence")
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "bidirectional"):
            self.fail(i, node, f"direction={direction!r} has no bptt equivalent (forward or bidirectional only)")
        K = 2 if direction == "bidirectional" else 1
        acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
        if op == "RNN":
            acts = acts or ["Tanh"] * K
            if acts not in (["Tanh"] * K, ["Relu"] * K):
                self.fail(i, node, f"activations {acts}: only Tanh or Relu (the same in both directions)")
            mode = "rnn_relu" if acts[0] == "Relu" else "rnn_tanh"
        else:
            if acts and acts != _DEFAULT_ACTS[op] * K:
                self.fail(i, node, f"activations {acts}: only the defaults {_DEFAULT_ACTS[op]}")
            mode = op.lower()
        for name, ok in (("clip", None), ("input_forget", 0), ("layout", 0), ("activation_alpha", None),
                         ("activation_beta", None)):
            if name in a and a[name] != ok and not (ok == 0 and a[name] == 0):
                self.fail(i, node, f"{name}={a[name]} is not supported")
        if op == "GRU" and a.get("linear_before_reset", 0) != 1:
            self.fail(i, node, "linear_before_reset=0 has no bptt equivalent (torch's and bptt's GRU use 1)")
        ins = list(node.input) + [""] * 8
        W, R, B = (self.consts.get(ins[j]) if ins[j] else None for j in (1, 2, 3))
        if W is None or R is None or (ins[3] and B is None):
            self.fail(i, node, "W, R and B must be initializers")
        if W.dtype not in (np.float32, np.float64):
            self.fail(i, node, f"weights of dtype {W.dtype}: float32 or float64 only")
        inits = [ins[5], ins[6]] if op == "LSTM" else [ins[5]]
        for j in inits:
            if j in self.consts and np.any(self.consts[j]):
                self.fail(i, node, "a constant non-zero initial state is not part of a bptt layer")
        if op == "LSTM" and ins[7] and (ins[7] not in self.consts or np.any(self.consts[ins[7]])):
            self.fail(i, node, "peephole weights P are not supported")
        G, H = R.shape[1], R.shape[2]
        if W.shape[0] != K or R.shape[0] != K or G != {"LSTM": 4, "GRU": 3, "RNN": 1}[op] * H:
            self.fail(i, node, f"W {W.shape} and R {R.shape} do not fit direction={direction}, hidden_size={H}")
        if self.layers:
            prev = self.layers[-1]
            if (prev["mode"], prev["K"], prev["H"]) != (mode, K, H) or W.shape[2] != K * H:
                self.fail(i, node, "every layer of a stack must be the same kind, direction and size")
        self.layers.append({"mode": mode, "K": K, "H": H, "W": W, "R": R, "B": B, "D": W.shape[2], "op": op})
        k = len(self.layers) - 1
        outs = list(node.output) + ["", "", ""]
        if outs[0]:
            self.kind[outs[0]] = ("y", {"K": K, "joined": K == 1})
        for o in outs[1:3]:
            if o:
                self.kind[o] = ("state", {"layer": k})

    def build(self):
        from bptt.nn.rnn import GRU, LSTM, RNN

        first = self.layers[0]
        mode, K, H = first["mode"], first["K"], first["H"]
        bias = any(lay["B"] is not None for lay in self.layers)
        dtype = first["W"].dtype
        kw = {"nonlinearity": "relu"} if mode == "rnn_relu" else {}
        cls = {"lstm": LSTM, "gru": GRU, "rnn_tanh": RNN, "rnn_relu": RNN}[mode]
        rnn = cls(first["D"], H, num_layers=len(self.layers), bias=bias, batch_first=self.batch_first,
                  bidirectional=K == 2, dtype=dtype, rng=0, **kw)
        state = {}
        G = R_rows = first["R"].shape[1]
        for k, lay in enumerate(self.layers):
            for d, sfx in enumerate(("", "_reverse")[:K]):
                state[f"weight_ih_l{k}{sfx}"] = _to_torch_gates(lay["W"][d], mode)
                state[f"weight_hh_l{k}{sfx}"] = _to_torch_gates(lay["R"][d], mode)
                if bias:
                    Bd = lay["B"][d] if lay["B"] is not None else np.zeros(2 * G, dtype)
                    state[f"bias_ih_l{k}{sfx}"] = _to_torch_gates(Bd[:R_rows], mode)
                    state[f"bias_hh_l{k}{sfx}"] = _to_torch_gates(Bd[R_rows:], mode)
        rnn.load_state_dict(state)
        rnn.eval()
        model = Imported(rnn, self.linear, self.head if self.linear is not None else "sequence")
        model.eval()
        return model


def load(path) -> Imported:
    """An ONNX model of standard recurrent nodes (+ a final linear layer) as a bptt :class:`Imported`.

    See the module docstring for what is understood; anything else raises an OnnxError (a
    ValueError) naming the first node not understood.  Parameters come over exactly (the gate
    blocks reordered back to torch's order).  For char language models written by
    :func:`bptt.onnx.export_charlm`, use :func:`bptt.onnx.load_charlm` instead.
    """
    model = read_model(path)
    return _Reader(model, Path(path)).run().build()
