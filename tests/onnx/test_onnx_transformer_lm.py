"""Transformer language models in ONNX: the sequence graph against TransformerLM.forward (ONNX Runtime in
float32, the reference evaluator in float64), generation through OnnxTransformerLM against the key/value
cache of TransformerLM.step, and `bptt export` / `sample` / `eval` on a trained checkpoint."""

import json
import math

import numpy as np
import pytest
from onnx_support import require_onnx

require_onnx()

import onnx  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.op_run import OpRun  # noqa: E402

from bptt.cli import main  # noqa: E402
from bptt.lm.data import Vocab  # noqa: E402
from bptt.lm.sample import generate  # noqa: E402
from bptt.lm.transformer import TransformerLM, TransformerLMConfig  # noqa: E402
from bptt.onnx.graph import OnnxError  # noqa: E402
from bptt.onnx.runtime import OnnxTransformerLM, load_charlm  # noqa: E402
from bptt.onnx.transformer_lm import export_transformer_lm  # noqa: E402

VOCAB = Vocab.from_json(list("abcdefghijk"))
CONTEXT = 12


def _model(dtype="float32", seed=0, layers=2):
    """A small TransformerLM with weights far from their init (N(0, 0.02²) would leave the logits near 0)."""
    cfg = TransformerLMConfig(vocab_size=len(VOCAB), layers=layers, d_model=16, heads=4, context=CONTEXT, dropout=0.1,
                              dtype=dtype)
    model = TransformerLM(cfg, rng=seed)
    rng = np.random.default_rng(seed + 1)
    for name, p, _ in model.named_parameters():
        gamma = "norm" in name and name.endswith("weight")  # a LayerNorm's γ: around 1
        p[...] = float(gamma) + 0.3 * rng.standard_normal(p.shape)
    return model.eval()


@pytest.mark.parametrize("T,N", [(1, 1), (5, 3), (CONTEXT, 2)])
def test_sequence_graph_matches_the_model_in_onnx_runtime(tmp_path, T, N):
    model = _model()
    lm, vocab, meta = load_charlm(export_transformer_lm(model, VOCAB, tmp_path / "t.onnx", meta={"step": 7}))
    assert isinstance(lm, OnnxTransformerLM) and meta["step"] == 7 and list(vocab.chars) == VOCAB.chars
    ids = np.random.default_rng(T).integers(0, len(VOCAB), (T, N))
    want, _ = model.forward(ids)
    got, state = lm.forward(ids)
    assert state is None and got.shape == (T, N, len(VOCAB)) and np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _Erf64(OpRun):
    """Erf in the input's precision: the reference evaluator's own rounds every value to float32."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


_Erf64.__name__ = "Erf"  # the operator it replaces


def test_float64_graph_matches_in_the_reference_evaluator(tmp_path):
    """ONNX Runtime runs no float64 Erf (docs/onnx.md, float64): the reference evaluator checks the graph, and
    ONNX Runtime's refusal is one OnnxError line."""
    model = _model("float64")
    path = export_transformer_lm(model, VOCAB, tmp_path / "t64.onnx")
    ids = np.random.default_rng(0).integers(0, len(VOCAB), (7, 2)).astype(np.int64)
    (got,) = ReferenceEvaluator(onnx.load(str(path)), new_ops=[_Erf64]).run(None, {"ids": ids})
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, model.forward(ids)[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(OnnxError, match="ONNX Runtime cannot run this model") as exc:
        load_charlm(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("graph", ["sequence", "step"])
def test_generation_matches_the_key_value_cache(tmp_path, graph):
    """Step by step against TransformerLM.step: the step graph with its own cache fed back, the sequence
    graph over the prefix; and generation past the context, which slides the window."""
    model = _model(seed=3)
    lm, _, _ = load_charlm(export_transformer_lm(model, VOCAB, tmp_path / "t.onnx", graph=graph))
    assert lm.graph == graph
    ids = np.random.default_rng(1).integers(0, len(VOCAB), (CONTEXT, 2))
    for t in range(CONTEXT):  # step by step: the cache's logits, and the file's run over the prefix
        np.testing.assert_allclose(lm.step(ids[t]), model.step(ids[t]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the context"):
        lm.step(ids[0])
    lm.reset_state()
    assert lm.step(ids[0]).shape == (2, len(VOCAB))
    # generation past the context slides the window the same way for both (argmax: no sampling ties)
    a = generate(model, VOCAB, 3 * CONTEXT, prime="abc", argmax=True)
    b = generate(lm, VOCAB, 3 * CONTEXT, prime="abc", argmax=True)
    assert a == b and len(a) == 3 * CONTEXT
    ids = np.random.default_rng(2).integers(0, len(VOCAB), (7, 3))  # forward: the step graph position by position
    np.testing.assert_allclose(lm.forward(ids)[0], model.forward(ids)[0], rtol=1e-5, atol=1e-5)


def test_float64_step_graph_in_the_reference_evaluator(tmp_path):
    model = _model("float64", seed=4)
    run = ReferenceEvaluator(onnx.load(str(export_transformer_lm(model, VOCAB, tmp_path / "s.onnx", graph="step"))),
                             new_ops=[_Erf64])
    c = model.config
    kv = {f"past_{k}_{i}": np.zeros((2, c.heads, 0, c.d_model // c.heads)) for i in range(c.layers) for k in ("key", "value")}
    model.reset_state()
    for t, ids in enumerate(np.random.default_rng(5).integers(0, len(VOCAB), (4, 2))):
        logits, *presents = run.run(None, {"ids": ids.astype(np.int64), "position": np.array([t], np.int64), **kv})
        np.testing.assert_allclose(logits, model.step(ids), rtol=1e-10, atol=1e-10)
        kv = {f"past_{k}_{i}": presents[2 * i + j] for i in range(c.layers) for j, k in enumerate(("key", "value"))}
        assert kv["past_key_0"].shape == (2, c.heads, t + 1, c.d_model // c.heads)


def test_export_sample_eval_from_the_command_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 30, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--model", "transformer", "--layers", "2",
                 "--d-model", "16", "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--max-iters", "30",
                 "--eval-every", "30", "--sample-length", "0", "--no-progress"]) == 0
    ckpt, path = run / "best.safetensors", tmp_path / "t.onnx"
    assert main(["export", str(ckpt), "--out", str(path)]) == 0
    capsys.readouterr()
    texts = []
    for model in (ckpt, path):
        assert main(["sample", str(model), "--seed", "5", "--length", "60", "--prime", "the "]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > 60  # a 16-position context: the window slid four times
    scores = []
    for model in (ckpt, path):
        assert main(["eval", str(model), "--data", str(corpus), "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[1]["characters"] == scores[0]["characters"]
    assert scores[1]["loss"] == pytest.approx(scores[0]["loss"], rel=1e-5)
    step_path = tmp_path / "t_step.onnx"
    assert main(["export", str(ckpt), "--out", str(step_path), "--graph", "step"]) == 0
    capsys.readouterr()
    assert main(["sample", str(step_path), "--seed", "5", "--length", "60", "--prime", "the "]) == 0
    assert capsys.readouterr().out == texts[0]


def test_export_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(OnnxError, match="takes a bptt TransformerLM"):
        export_transformer_lm(object(), VOCAB, tmp_path / "x.onnx")
    with pytest.raises(OnnxError, match="graph must be"):
        export_transformer_lm(_model(), VOCAB, tmp_path / "x.onnx", graph="window")
    with pytest.raises(OnnxError, match="opset must be"):
        export_transformer_lm(_model(), VOCAB, tmp_path / "x.onnx", opset=13)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("opset", [14, 17, 18, 21])  # ReduceMean's axes: an attribute to 17, an input from 18
def test_every_export_opset_runs(tmp_path, opset):
    model = _model(seed=opset)
    lm, _, _ = load_charlm(export_transformer_lm(model, VOCAB, tmp_path / "t.onnx", opset=opset))
    ids = np.random.default_rng(opset).integers(0, len(VOCAB), (6, 2))
    np.testing.assert_allclose(lm.forward(ids)[0], model.forward(ids)[0], rtol=1e-5, atol=1e-5)
