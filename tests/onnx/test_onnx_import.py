"""bptt.onnx.load: ONNX recurrent models → bptt modules; round trips and clear errors."""

import numpy as np
import pytest
from onnx_support import max_error, random_feeds, random_layer, require_onnx

require_onnx()

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bptt.onnx as bo  # noqa: E402
from bptt.lm.data import Vocab  # noqa: E402
from bptt.lm.model import CharLM, CharLMConfig  # noqa: E402
from bptt.nn.rnn import GRU, LSTM  # noqa: E402
from bptt.onnx.graph import OnnxError  # noqa: E402
from bptt.onnx.runtime import session  # noqa: E402


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_gives_identical_parameters(tmp_path, seed):
    rng = np.random.default_rng(3000 + seed)
    for j in range(8):
        layer, opts = random_layer(rng, np.float64 if j % 2 else np.float32, allow_proj=False)
        path = bo.export(layer, tmp_path / f"m{j}.onnx", **opts)
        got = bo.load(path)
        assert got.decoder is None and type(got.rnn) is type(layer) and got.rnn.mode == layer.mode
        assert got.rnn.extra_repr() == layer.extra_repr() and got.rnn.dtype == layer.dtype
        a, b = layer.state_dict(), got.rnn.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
        _, args = random_feeds(rng, layer, opts)
        want, _ = layer(*args)
        out, _ = got(*args)
        assert np.array_equal(out, want)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_keras_style_lstm_then_dense_on_the_final_state(tmp_path):
    """What tf2onnx writes for Keras LSTM(return_sequences=False) + Dense: a batch-major input
    transposed to time-major, the LSTM's Y_h squeezed, a Gemm."""
    rng = np.random.default_rng(0)
    D, H, C = 3, 4, 5
    inits = {"W": rng.standard_normal((1, 4 * H, D)).astype(np.float32),
             "R": rng.standard_normal((1, 4 * H, H)).astype(np.float32),
             "B": rng.standard_normal((1, 8 * H)).astype(np.float32),
             "Wd": rng.standard_normal((H, C)).astype(np.float32), "bd": rng.standard_normal(C).astype(np.float32),
             "ax": np.array([0], np.int64)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", "W", "R", "B"], ["", "yh"], hidden_size=H),
             helper.make_node("Squeeze", ["yh", "ax"], ["h"]),
             helper.make_node("Gemm", ["h", "Wd", "bd"], ["out"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", D])],
               [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", C])], inits)
    path = _save(tmp_path, m)
    got = bo.load(path)
    assert got.rnn.batch_first and got.head == "state" and got.decoder.params["weight"].shape == (C, H)
    x = rng.standard_normal((2, 6, D)).astype(np.float32)
    out, _ = got(x)
    assert max_error([out], session(path).run(None, {"x": x})) < 1e-5


def _bigru_dense(rng, tail=(), lbr=1, joined=True, H=3, D=2, C=4):
    inits = {"W": rng.standard_normal((2, 3 * H, D)), "R": rng.standard_normal((2, 3 * H, H)),
             "B": rng.standard_normal((2, 6 * H)), "Wd": rng.standard_normal((2 * H, C)),
             "bd": rng.standard_normal(C), "shape": np.array([0, 0, -1], np.int64)}
    inits = {k: (v if v.dtype == np.int64 else v.astype(np.float32)) for k, v in inits.items()}
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B"], ["y"], hidden_size=H, direction="bidirectional",
                              linear_before_reset=lbr)]
    if joined:
        nodes.append(helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]))
    nodes += [helper.make_node("Reshape", ["yt" if joined else "y", "shape"], ["seq"]),
              helper.make_node("MatMul", ["seq", "Wd"], ["z"]), helper.make_node("Add", ["z", "bd"], ["logits"])]
    out = "logits"
    for op in tail:
        nodes.append(helper.make_node(op, [out], [op.lower()]))
        out = op.lower()
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", D])],
                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["T", "N", C])], inits)


def test_bidirectional_gru_then_matmul_add_on_the_sequence(tmp_path):
    rng = np.random.default_rng(1)
    path = _save(tmp_path, _bigru_dense(rng))
    got = bo.load(path)
    assert isinstance(got.rnn, GRU) and got.rnn.bidirectional and got.head == "sequence"
    x = rng.standard_normal((5, 2, 2)).astype(np.float32)
    out, _ = got(x)
    assert out.shape == (5, 2, 4)
    assert max_error([out], session(path).run(None, {"x": x})) < 1e-5


@pytest.mark.parametrize("case, message", [
    ("softmax", r"node 5 \(Softmax\) is not understood"),
    ("lbr0", r"node 0 \(GRU\) is not understood: linear_before_reset=0 has no bptt equivalent"),
    ("unjoined", r"node 1 \(Reshape\)|node 2 \(MatMul\).*perm \[0, 2, 1, 3\]"),
    ("reverse", r"node 0 \(LSTM\) is not understood: direction='reverse'"),
])
def test_unsupported_graphs_name_the_first_node(tmp_path, case, message):
    rng = np.random.default_rng(2)
    if case == "reverse":
        H = 2
        m = _model([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=H, direction="reverse")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 1, "N", H])],
                   {"W": np.ones((1, 4 * H, 3), np.float32), "R": np.ones((1, 4 * H, H), np.float32)})
    else:
        m = _bigru_dense(rng, tail=("Softmax",) if case == "softmax" else (), lbr=0 if case == "lbr0" else 1,
                         joined=case != "unjoined")
    with pytest.raises(OnnxError, match=message) as e:
        bo.load(_save(tmp_path, m))
    assert "\n" not in str(e.value)


def test_scan_and_charlm_exports_are_not_layer_stacks(tmp_path):
    with pytest.raises(OnnxError, match=r"node \d+ '.*' \(\w+\) is not understood"):
        bo.load(bo.export(LSTM(3, 4, proj_size=2).eval(), tmp_path / "p.onnx"))
    vocab = Vocab.from_json(list("abc"))
    lm = CharLM(CharLMConfig(vocab_size=3, hidden=4, layers=1), rng=0).eval()
    with pytest.raises(OnnxError, match=r"\(Gather\) is not understood"):
        bo.load(bo.export_charlm(lm, vocab, tmp_path / "lm.onnx"))


def test_file_errors_are_one_clear_line(tmp_path):
    good = bo.export(GRU(2, 3, num_layers=2).eval(), tmp_path / "good.onnx")
    data = good.read_bytes()
    cases = {
        "truncated.onnx": (data[: len(data) // 2], "truncated or corrupt"),
        "cut.onnx": (data[: len(data) - 7], "truncated or corrupt"),
        "garbage.onnx": (b"\xff\xfe not a protobuf \x00" * 10, "truncated or corrupt"),
        "empty.onnx": (b"", "truncated"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        for loader in (bo.load, bo.load_charlm):
            with pytest.raises(OnnxError, match=message) as e:
                loader(tmp_path / name)
            assert "\n" not in str(e.value), name
    with pytest.raises(OnnxError, match="no such file"):
        bo.load(tmp_path / "missing.onnx")
    old = onnx.load(str(good))
    old.opset_import[0].version = 6
    with pytest.raises(OnnxError, match="opset 6 is too old; bptt imports opset 7 and later"):
        bo.load(_save(tmp_path, old, "old.onnx"))
    with pytest.raises(OnnxError, match="not a char language model"):
        bo.load_charlm(good)


def test_missing_extra_on_load(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(OnnxError, match=r'^ONNX support needs the optional extra: pip install "bptt\[onnx\]"$'):
        bo.load(tmp_path / "x.onnx")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cell, bidirectional", [("LSTM", True), ("GRU", False), ("RNN", True)])
def test_torch_onnx_export_of_rnn_and_linear_loads(tmp_path, torch, cell, bidirectional):
    """torch.onnx.export (the TorchScript exporter) of nn.LSTM/GRU/RNN + nn.Linear: zero initial states
    built from Shape/Expand, Squeeze or Transpose+Reshape between layers, MatMul then Add(bias, ·)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(3, 4, num_layers=2, bidirectional=bidirectional)
            self.lin = torch.nn.Linear(8 if bidirectional else 4, 5)

        def forward(self, x):
            return self.lin(self.rnn(x)[0])

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(6, 2, 3)
    path = tmp_path / "t.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    got = bo.load(path)
    assert got.rnn.bidirectional == bidirectional and got.rnn.num_layers == 2 and got.head == "sequence"
    for k, v in net.rnn.state_dict().items():
        assert np.array_equal(got.rnn.state_dict()[k], v.numpy()), k
    out, _ = got(x.numpy())
    with torch.no_grad():
        want = net(x).numpy()
    assert max_error([out], [want]) < 1e-5


def test_a_batch_major_sequence_cannot_feed_the_next_layer(tmp_path):
    H = 2
    inits = {k: np.ones((1, 3 * H, d), np.float32) for k, d in (("W", 3), ("R", H), ("W2", H), ("R2", H))}
    inits["ax"] = np.array([1], np.int64)
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["y"], hidden_size=H, linear_before_reset=1),
             helper.make_node("Squeeze", ["y", "ax"], ["y3"]),
             helper.make_node("Transpose", ["y3"], ["yb"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["yb", "W2", "R2"], ["z"], hidden_size=H, linear_before_reset=1)]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", 3])],
               [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["T", 1, "N", H])], inits)
    with pytest.raises(OnnxError, match=r"node 3 \(GRU\) is not understood: its input X is batch-major"):
        bo.load(_save(tmp_path, m))
