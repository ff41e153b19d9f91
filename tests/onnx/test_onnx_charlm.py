"""Char LMs in ONNX: one-step and whole-sequence graphs, OnnxCharLM in ONNX Runtime, sampling and
evaluation identical to the bptt model, and the `bptt export` command's handler."""

import argparse
import json

import numpy as np
import pytest
from onnx_support import require_onnx

require_onnx()

import onnx  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import bptt.onnx as bo  # noqa: E402
from bptt import checkpoint as ckpt  # noqa: E402
from bptt.cli import export as export_cli  # noqa: E402
from bptt.lm.data import Vocab  # noqa: E402
from bptt.lm.model import CharLM, CharLMConfig  # noqa: E402
from bptt.lm.sample import generate  # noqa: E402
from bptt.lm.evaluate import evaluate_text  # noqa: E402
from bptt.lm.model import CHECKPOINT_KIND, load_model  # noqa: E402
from bptt.onnx.graph import OnnxError  # noqa: E402
from bptt.onnx.runtime import OnnxCharLM, load_charlm  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 3
VOCAB = Vocab.from_json(sorted(set(TEXT)))


def _lm(model="lstm", embedding=0, layers=2, dtype="float32", seed=0):
    cfg = CharLMConfig(vocab_size=len(VOCAB), model=model, hidden=6, layers=layers, embedding=embedding,
                       dropout=0.25, dtype=dtype)
    return CharLM(cfg, rng=seed).eval()


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("embedding", [0, 5])
def test_both_graphs_match_the_charlm(tmp_path, model, embedding):
    lm = _lm(model, embedding)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(VOCAB), (7, 3))
    want, want_state = lm.forward(ids)
    for graph in ("sequence", "step"):
        path = bo.export_charlm(lm, VOCAB, tmp_path / f"{graph}.onnx", graph=graph, meta={"step": 12})
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        om, vocab, meta = load_charlm(path)
        assert isinstance(om, OnnxCharLM) and list(vocab.chars) == VOCAB.chars  # loaded as character units
        assert meta["step"] == 12 and meta["config"] == lm.config.to_dict() and meta["kind"] == "charlm"
        got, got_state = om.forward(ids)
        assert got.shape == want.shape and np.max(np.abs(got - want)) < 1e-5
        for g, w in zip(*(s if isinstance(s, tuple) else (s,) for s in (got_state, want_state)), strict=True):
            assert np.max(np.abs(g - w)) < 1e-5
        lm.reset_state()  # step by step, state kept, against the CharLM's own step
        om.reset_state()
        for t in range(3):
            assert np.max(np.abs(om.step(ids[t]) - lm.step(ids[t]))) < 1e-5


def test_metadata_holds_everything_a_loader_needs(tmp_path):
    lm = _lm("gru", 4)
    model = onnx.load(str(bo.export_charlm(lm, VOCAB, tmp_path / "m.onnx", graph="step")))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["bptt.kind"] == "charlm" and props["bptt.graph"] == "step"
    assert json.loads(props["bptt.vocab"]) == VOCAB.to_json()
    assert json.loads(props["bptt.config"]) == lm.config.to_dict()
    assert [i.name for i in model.graph.input] == ["ids", "h_0"]
    assert [o.name for o in model.graph.output] == ["logits", "h_n"]


def _checkpoint(tmp_path, lm, name="lm.safetensors"):
    path = tmp_path / name
    ckpt.save_checkpoint(path, {"model": lm.state_dict()},
                         {"kind": CHECKPOINT_KIND, "config": lm.config.to_dict(), "vocab": VOCAB.to_json(),
                          "step": 40, "eval": {"val_loss": 2.5}})
    return path


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_seeded_sampling_gives_the_same_text(tmp_path, model):
    """The safetensors checkpoint (bptt) and its ONNX export (ONNX Runtime), same seed, same text."""
    src = _checkpoint(tmp_path, _lm(model, seed=3))
    args = argparse.Namespace(checkpoint=str(src), out=str(tmp_path / "lm.onnx"), opset=17, graph="sequence")
    assert export_cli.cmd_export(args) == 0
    a, va, _ = load_model(src)
    b, vb, meta = load_charlm(tmp_path / "lm.onnx")
    assert meta["step"] == 40 and meta["eval"]["val_loss"] == 2.5
    for kw in ({"prime": "the "}, {"prime": "", "temperature": 0.7, "top_k": 5}, {"prime": "fox", "argmax": True}):
        ta = generate(a, va, 300, rng=np.random.default_rng(7), **kw)
        tb = generate(b, vb, 300, rng=np.random.default_rng(7), **kw)
        assert ta == tb and len(ta) == 300
    ea, eb = evaluate_text(a, va, TEXT, window=20), evaluate_text(b, vb, TEXT, window=20)
    assert abs(ea["loss"] - eb["loss"]) < 1e-5 and ea["characters"] == eb["characters"]


def test_float64_charlm_in_the_reference_evaluator(tmp_path):
    lm = _lm("lstm", 0, layers=2, dtype="float64")
    path = bo.export_charlm(lm, VOCAB, tmp_path / "m.onnx")
    ids = np.random.default_rng(2).integers(0, len(VOCAB), (4, 2))
    h0 = np.zeros((2, 2, 6))
    got = ReferenceEvaluator(str(path)).run(None, {"ids": ids, "h_0": h0, "c_0": h0})
    want, (h, c) = lm.forward(ids)
    for g, w in zip(got, (want, h, c), strict=True):
        assert g.dtype == np.float64 and np.max(np.abs(g - w)) < 1e-10


def test_onnx_charlm_is_inference_only(tmp_path):
    om, _, _ = load_charlm(bo.export_charlm(_lm(), VOCAB, tmp_path / "m.onnx"))
    assert not om.training and om.vocab_size == len(VOCAB) and om.dtype == np.float32
    with pytest.raises(ValueError, match="inference only"):
        om.train()
    with pytest.raises(ValueError, match="ids must be in"):
        om.step([len(VOCAB)])


def test_export_charlm_errors(tmp_path):
    with pytest.raises(OnnxError, match="takes a bptt CharLM"):
        bo.export_charlm(object(), VOCAB, tmp_path / "m.onnx")
    with pytest.raises(OnnxError, match="graph must be"):
        bo.export_charlm(_lm(), VOCAB, tmp_path / "m.onnx", graph="loop")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_adaptive_softmax_exports_its_log_probabilities(tmp_path, dtype, tol):
    """A model with an adaptive softmax (two tail clusters, head bias) exports the exact log-probability of
    every unit, as CharLM.forward gives them: both graphs against the model (ONNX Runtime for float32, the
    reference evaluator for float64), rows that sum to one; sampling and evaluation from the file equal
    the model's."""
    cfg = CharLMConfig(len(VOCAB), "lstm", 8, 1, embedding=4, adaptive_softmax=True, cutoffs=[5, 12], dtype=dtype)
    lm = CharLM(cfg, rng=0).eval()
    lm.decoder.head.params["bias"][...] = np.linspace(-1, 1, lm.decoder.head_size)  # CharLM's head has a bias
    ids = np.random.default_rng(2).integers(0, len(VOCAB), (6, 3))
    want, _ = lm.forward(ids)
    for graph in ("sequence", "step"):
        path = bo.export_charlm(lm, VOCAB, tmp_path / f"{graph}_{dtype}.onnx", graph=graph)
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        if dtype == "float32":
            om, _, _ = load_charlm(path)
            got = om.forward(ids)[0] if graph == "sequence" else np.stack([om.step(ids[t]) for t in range(6)])
        else:
            sess = ReferenceEvaluator(str(path))
            h0 = np.zeros((1, 3, 8)), np.zeros((1, 3, 8))
            if graph == "sequence":
                got = sess.run(["logits"], {"ids": ids, "h_0": h0[0], "c_0": h0[1]})[0]
            else:
                got, h, c = [], *h0
                for t in range(6):
                    z, h, c = sess.run(["logits", "h_n", "c_n"], {"ids": ids[t], "h_0": h, "c_0": c})
                    got.append(z)
                got = np.stack(got)
        assert got.shape == want.shape and np.max(np.abs(got - want)) < tol
        assert np.allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    if dtype == "float32":
        om, _, _ = load_charlm(tmp_path / "sequence_float32.onnx")
        lm.reset_state()
        assert generate(om, VOCAB, 40, prime="the ", temperature=0.8, rng=np.random.default_rng(3)) == \
            generate(lm, VOCAB, 40, prime="the ", temperature=0.8, rng=np.random.default_rng(3))
        ours = evaluate_text(lm, VOCAB, TEXT[:120], window=20)
        theirs = evaluate_text(om, VOCAB, TEXT[:120], window=20)
        assert theirs["loss"] == pytest.approx(ours["loss"], abs=1e-5)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bptt")
    export_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_export_parser_and_handler(tmp_path, capsys):
    src = _checkpoint(tmp_path, _lm("rnn", 3))
    out = tmp_path / "out" / "lm.onnx"
    args = _parse(["export", str(src), "--out", str(out), "--opset", "18", "--graph", "step"])
    assert args.func(args) == 0
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 18
    assert {p.key: p.value for p in model.metadata_props}["bptt.graph"] == "step"
    assert "wrote" in capsys.readouterr().err
    assert _parse(["export", str(src), "--out", "x.onnx"]).opset == bo.DEFAULT_OPSET


def test_cli_export_bad_input_is_one_line_and_writes_nothing(tmp_path):
    lm = _lm()
    good = _checkpoint(tmp_path, lm)
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    other_kind = tmp_path / "s2s.safetensors"
    ckpt.save_checkpoint(other_kind, {"model": lm.state_dict()}, {"kind": "seq2seq"})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["export", str(not_ckpt), "--out", str(existing)],
                 ["export", str(other_kind), "--out", str(existing)],
                 ["export", str(tmp_path / "missing.safetensors"), "--out", str(existing)],
                 ["export", str(good), "--out", str(blocker / "m.onnx")],
                 ["export", str(good), "--out", str(existing), "--opset", "9"]):
        args = _parse(argv)
        with pytest.raises(ValueError) as e:
            args.func(args)
        assert "\n" not in str(e.value) and str(e.value), argv
    assert existing.read_bytes() == b"keep me"
