"""bptt.onnx.export: recurrent layers as standard ONNX nodes, checked against bptt's own forward.

float32 graphs run in ONNX Runtime (to 1e-5); float64 graphs run in onnx.reference's
ReferenceEvaluator (to 1e-10), because ONNX Runtime has no float64 recurrent kernels
(test_onnxruntime_float64_gaps pins that down).
"""

import os
import sys

import numpy as np
import pytest
from onnx_support import bptt_outputs, max_error, random_feeds, random_layer, require_onnx

require_onnx()

import onnx  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import bptt.onnx as bo  # noqa: E402
from bptt.nn.rnn import GRU, LSTM, RNN  # noqa: E402
from bptt.onnx.graph import DEFAULT_OPSET, OnnxError  # noqa: E402
from bptt.onnx.runtime import session  # noqa: E402


def _checked(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
    return model


@pytest.mark.parametrize("seed", range(6))
def test_float32_sweep_matches_onnxruntime(tmp_path, seed):
    """Random configurations: every layer kind, stacked, bidirectional, batch_first, bias or not,
    padded lengths, initial states, proj_size; two input shapes through one session (dynamic axes)."""
    rng = np.random.default_rng(1000 + seed)
    for j in range(8):
        layer, opts = random_layer(rng)
        path = bo.export(layer, tmp_path / f"m{j}.onnx", **opts)
        _checked(path)
        sess = session(path)
        for _ in range(2):
            feeds, args = random_feeds(rng, layer, opts)
            got = sess.run(None, feeds)
            err = max_error(got, bptt_outputs(layer, args))
            assert err < 1e-5, (layer, opts, err)


def test_every_option_is_covered_by_the_float32_sweep():
    """The sweep above draws each option both ways (so a seed change cannot quietly drop one)."""
    seen = set()
    for seed in range(6):
        rng = np.random.default_rng(1000 + seed)
        for _ in range(8):
            layer, opts = random_layer(rng)
            seen |= {("mode", layer.mode), ("proj", layer.proj_size > 0), ("L", layer.num_layers),
                     ("bi", layer.bidirectional), ("bf", layer.batch_first), ("bias", layer.bias),
                     ("lengths", opts["lengths"]), ("init", opts["initial_state"])}
            random_feeds(rng, layer, opts)
            random_feeds(rng, layer, opts)
    want = {("mode", m) for m in ("rnn_tanh", "rnn_relu", "lstm", "gru")}
    for k, vals in (("proj", (0, 1)), ("L", (1, 2)), ("bi", (0, 1)), ("bf", (0, 1)), ("bias", (0, 1)),
                    ("lengths", (0, 1)), ("init", (0, 1))):
        want |= {(k, v) for v in vals}
    assert want <= seen, want - seen


@pytest.mark.parametrize("seed", range(3))
def test_float64_sweep_matches_reference_evaluator(tmp_path, seed):
    """float64 to 1e-10 in onnx.reference.  Its RNN/LSTM/GRU ignore sequence_lens and its RNN
    knows only Tanh, so padded lengths are drawn only for proj_size LSTMs (the Scan graph, built
    of basic operators) and no Relu RNN."""
    rng = np.random.default_rng(2000 + seed)
    for j in range(6):
        layer, opts = random_layer(rng, np.float64, allow_relu=False)
        if layer.proj_size == 0:
            opts["lengths"] = False
        path = bo.export(layer, tmp_path / f"m{j}.onnx", **opts)
        _checked(path)
        ref = ReferenceEvaluator(str(path))
        feeds, args = random_feeds(rng, layer, opts)
        got = ref.run(None, feeds)
        err = max_error(got, bptt_outputs(layer, args))
        assert err < 1e-10, (layer, opts, err)


@pytest.mark.parametrize("cls", [LSTM, GRU, RNN])
def test_float64_padded_batch_sequence_by_sequence(tmp_path, cls):
    """float64 with lengths on the standard nodes, which the reference evaluator runs without
    sequence_lens: each sequence alone, cut to its length (where sequence_lens changes nothing),
    against its rows of bptt's padded batch (the padding itself is checked in ONNX Runtime, float32)."""
    rng = np.random.default_rng(9)
    layer = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=np.float64, rng=2).eval()
    opts = {"lengths": True, "initial_state": True}
    path = bo.export(layer, tmp_path / "b.onnx", **opts)
    ref = ReferenceEvaluator(str(path))
    feeds, (x, state, _) = random_feeds(rng, layer, opts, T=5, N=3)
    lengths = np.array([2, 5, 4])
    y, s_n = layer(x, state, lengths)
    s_n = s_n if isinstance(s_n, tuple) else (s_n,)
    for n, T_n in enumerate(lengths):
        one = {"input": x[n : n + 1, :T_n], "lengths": lengths[n : n + 1]}
        for name in ("h_0", "c_0"):
            if name in feeds:
                one[name] = feeds[name][:, n : n + 1]
        got = ref.run(None, one)
        err = max_error(got, [y[n : n + 1, :T_n]] + [s[:, n : n + 1] for s in s_n])
        assert err < 1e-10, (n, err)


def _reference_with_relu(path):
    """The reference evaluator with Relu added to its RNN's activations (it knows Tanh and Affine
    only); everything else is the reference's own code.  ONNX's Relu: max(0, x)."""
    from onnx.reference.ops.op_rnn import RNN_14

    def choose_act(self, name, alpha, beta):
        if name in ("Relu", "relu"):
            return lambda x: np.maximum(x, 0)
        return RNN_14.choose_act(self, name, alpha, beta)

    return ReferenceEvaluator(str(path), new_ops=[type("RNN", (RNN_14,), {"op_domain": "", "choose_act": choose_act})])


def test_float64_relu_rnn_reference(tmp_path):
    rng = np.random.default_rng(11)
    layer = RNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="relu", dtype=np.float64, rng=3).eval()
    opts = {"lengths": False, "initial_state": True}
    path = bo.export(layer, tmp_path / "r.onnx", **opts)
    feeds, args = random_feeds(rng, layer, opts, T=5, N=3)
    err = max_error(_reference_with_relu(path).run(None, feeds), bptt_outputs(layer, args))
    assert err < 1e-10


def test_float64_padded_proj_lstm_reference(tmp_path):
    """The Scan graph's masking in float64: bidirectional, two layers, padded lengths, initial states."""
    rng = np.random.default_rng(5)
    layer = LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=np.float64, rng=1).eval()
    opts = {"lengths": True, "initial_state": True}
    path = bo.export(layer, tmp_path / "p.onnx", **opts)
    feeds, args = random_feeds(rng, layer, opts, T=5, N=3)
    feeds["lengths"] = args[2][:] = np.array([5, 1, 3])
    err = max_error(ReferenceEvaluator(str(path)).run(None, feeds), bptt_outputs(layer, args))
    assert err < 1e-10


def test_onnxruntime_float64_gaps(tmp_path):
    """What docs/onnx.md says: ONNX Runtime has no float64 RNN kernel at all, and its float64
    LSTM and GRU kernels refuse to run ("does not support double yet").  If this fails, ONNX
    Runtime has gained them: update the docs and test float64 there too."""
    x = np.zeros((2, 1, 3))
    rnn = bo.export(RNN(3, 2, dtype=np.float64).eval(), tmp_path / "rnn.onnx")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        session(rnn)
    for cls in (LSTM, GRU):
        path = bo.export(cls(3, 2, dtype=np.float64).eval(), tmp_path / f"{cls.__name__}.onnx")
        with pytest.raises(Exception, match="does not support double"):
            session(path).run(None, {"input": x})


def test_one_standard_node_per_layer(tmp_path):
    for cls, op in ((RNN, "RNN"), (LSTM, "LSTM"), (GRU, "GRU")):
        layer = cls(3, 4, num_layers=3, bidirectional=True).eval()
        model = _checked(bo.export(layer, tmp_path / "s.onnx"))
        nodes = [n for n in model.graph.node if n.op_type == op]
        assert len(nodes) == 3
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["hidden_size"] == 4 and attrs["direction"] == b"bidirectional"
        if op == "GRU":
            assert attrs["linear_before_reset"] == 1


def test_proj_lstm_is_a_scan_of_basic_operators(tmp_path):
    model = _checked(bo.export(LSTM(3, 4, proj_size=2, bidirectional=True).eval(), tmp_path / "p.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Scan" in ops and "LSTM" not in ops
    body = next(n for n in model.graph.node if n.op_type == "Scan").attribute[0].g
    assert {n.op_type for n in body.node} <= {"MatMul", "Add", "Mul", "Sigmoid", "Tanh", "Split", "Where", "Identity"}


@pytest.mark.parametrize("opset", [14, 21])
def test_other_opsets_run(tmp_path, opset):
    rng = np.random.default_rng(opset)
    layer = GRU(2, 3, num_layers=2, bidirectional=True).eval()
    opts = {"lengths": True, "initial_state": True}
    path = bo.export(layer, tmp_path / "o.onnx", opset=opset, **opts)
    assert onnx.load(str(path)).opset_import[0].version == opset
    feeds, args = random_feeds(rng, layer, opts)
    assert max_error(session(path).run(None, feeds), bptt_outputs(layer, args)) < 1e-5


def test_export_errors_leave_files_alone(tmp_path):
    layer = LSTM(2, 3).eval()
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"old")
    with pytest.raises(OnnxError, match="opset must be an integer in"):
        bo.export(layer, target, opset=9)
    with pytest.raises(OnnxError, match="takes a bptt.RNN, LSTM or GRU"):
        bo.export(object(), target)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OnnxError, match="cannot write") as e:
        bo.export(layer, blocker / "sub" / "m.onnx")
    assert "\n" not in str(e.value)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OnnxError, match="cannot write"):
        bo.export(layer, tmp_path / "dir.onnx")  # a directory in the way: the rename fails
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dir.onnx", "keep.onnx"]  # no temp file left


def test_missing_onnx_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(OnnxError) as e:
        bo.export(LSTM(2, 3), os.devnull)
    assert 'pip install "bptt[onnx]"' in str(e.value) and "\n" not in str(e.value)
