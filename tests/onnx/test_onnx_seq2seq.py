"""Seq2seq in ONNX: encoder.onnx + decoder_step.onnx in ONNX Runtime against Seq2Seq.encode /
decode_step, and greedy / beam decoding giving the same tokens."""

import numpy as np
import pytest
from onnx_support import require_onnx

require_onnx()

import onnx  # noqa: E402

from bptt.onnx.graph import OnnxError  # noqa: E402
from bptt.onnx.seq2seq import OnnxSeq2Seq, export_seq2seq  # noqa: E402
from bptt.seq2seq.model import Seq2Seq, Seq2SeqConfig, make_batch  # noqa: E402
from bptt.seq2seq.transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig  # noqa: E402

CASES = [("lstm", "general", True, 2), ("gru", "additive", False, 1), ("rnn", "dot", True, 1),
         ("lstm", "none", False, 2), ("gru", "dot", True, 2), ("rnn", "additive", False, 2)]


def _states(s):
    return s if isinstance(s, tuple) else (s,)


@pytest.mark.parametrize("cell, attention, bidirectional, layers", CASES)
def test_encoder_and_decoder_step_match(tmp_path, cell, attention, bidirectional, layers):
    cfg = Seq2SeqConfig(src_vocab=9, tgt_vocab=8, embedding=5, hidden=6, layers=layers, cell=cell,
                        bidirectional=bidirectional, attention=attention, dropout=0.3)
    model = Seq2Seq(cfg, rng=1).eval()
    paths = export_seq2seq(model, tmp_path, meta={"step": 5})
    for p in paths:
        onnx.checker.check_model(onnx.load(str(p)), full_check=True)
    om = OnnxSeq2Seq(tmp_path)
    assert om.meta == {"step": 5} and om.config == cfg
    rng = np.random.default_rng(0)
    b = make_batch([rng.integers(4, 9, size=k) for k in (5, 2, 4, 1)])
    want, got = model.encode(b.src, b.src_len), om.encode(b.src, b.src_len)
    assert np.array_equal(want.mask, got.mask)
    assert max(np.abs(g - w).max() for g, w in [(got.m, want.m), *zip(_states(got.state), _states(want.state))]) < 1e-5
    tokens = np.array([1, 4, 5, 6])
    la, sa, wa = model.decode_step(tokens, want.state, want)
    lb, sb, wb = om.decode_step(tokens, want.state, want)
    assert lb.dtype == np.float64 and np.abs(la - lb).max() < 1e-5
    assert max(np.abs(g - w).max() for g, w in zip(_states(sb), _states(sa), strict=True)) < 1e-5
    assert (wa is None) == (wb is None) and (wa is None or np.abs(wa - wb).max() < 1e-5)
    if wb is not None:
        assert np.all(wb[~want.mask] == 0.0)  # padded source slots get exactly no weight
    ga, gb = model.greedy(b.src, b.src_len, 12), om.greedy(b.src, b.src_len, 12)
    assert ga.tokens == gb.tokens and np.abs(ga.logprob - gb.logprob).max() < 1e-4
    ba, bb = model.translate(b.src, b.src_len, 12, beam=3), om.translate(b.src, b.src_len, 12, beam=3)
    assert ba.tokens == bb.tokens


def test_mismatched_files_are_refused(tmp_path):
    cfg = Seq2SeqConfig(src_vocab=9, tgt_vocab=8, embedding=5, hidden=6)
    export_seq2seq(Seq2Seq(cfg, rng=1), tmp_path / "a")
    export_seq2seq(Seq2Seq(Seq2SeqConfig(src_vocab=9, tgt_vocab=8, embedding=5, hidden=4), rng=1), tmp_path / "b")
    (tmp_path / "a" / "decoder_step.onnx").replace(tmp_path / "b" / "decoder_step.onnx")
    with pytest.raises(OnnxError, match="different models"):
        OnnxSeq2Seq(tmp_path / "b")
    with pytest.raises(OnnxError, match="takes a bptt Seq2Seq or TransformerSeq2Seq"):
        export_seq2seq(object(), tmp_path / "c")


@pytest.mark.parametrize("layers, heads, opset", [(1, 2, 17), (2, 4, 18)])  # ReduceMean's axes: attribute, input
def test_transformer_encoder_and_decoder_step_match(tmp_path, layers, heads, opset):
    """The Transformer's two graphs against TransformerSeq2Seq.encode / decode_step (its key/value caches as
    the state), over padded sources, and its greedy and beam decoding through them."""
    cfg = TransformerSeq2SeqConfig(src_vocab=9, tgt_vocab=8, d_model=8, heads=heads, layers=layers, ff=16, dropout=0.2,
                                   max_len=32)
    model = TransformerSeq2Seq(cfg, rng=2).eval()
    rng = np.random.default_rng(3)
    for _, p, _ in model.named_parameters():  # away from the init's small values, so the logits differ by token
        p[...] += 0.3 * rng.standard_normal(p.shape)
    export_seq2seq(model, tmp_path, opset=opset, meta={"step": 9})
    om = OnnxSeq2Seq(tmp_path)
    assert om.meta == {"step": 9} and om.config == cfg and om.use_attention
    b = make_batch([rng.integers(4, 9, size=k) for k in (5, 2, 4, 1)])
    want, got = model.encode(b.src, b.src_len), om.encode(b.src, b.src_len)
    assert np.array_equal(want.mask, got.mask) and len(got.state) == 2 and len(got.cross) == 2
    real = want.mask[:, :, None]  # the memory at padded positions is never read (its keys are masked)
    assert np.abs(np.where(real, got.m - want.m, 0)).max() < 1e-5
    assert max(np.abs(g - w).max(initial=0.0) for g, w in zip(got.state, want.state, strict=True)) < 1e-5
    assert max(np.abs(g - w).max() for g, w in zip(got.cross, want.cross, strict=True)) < 1e-5
    state_a, state_b = want.state, want.state
    for tokens in ([1, 4, 5, 6], [7, 4, 4, 5], [6, 6, 5, 4]):  # three steps: the self-attention caches grow
        la, state_a, wa = model.decode_step(np.array(tokens), state_a, want)
        lb, state_b, wb = om.decode_step(np.array(tokens), state_b, want)
        assert lb.dtype == np.float64 and np.abs(la - lb).max() < 1e-5 and np.abs(la).max() > 0.5
        assert max(np.abs(g - w).max(initial=0.0) for g, w in zip(state_b, state_a, strict=True)) < 1e-5
        assert np.abs(wa - wb).max() < 1e-5 and np.all(wb[~want.mask] == 0.0)
    assert state_b[0].shape[3] == 3
    ga, gb = model.greedy(b.src, b.src_len, 12), om.greedy(b.src, b.src_len, 12)
    assert ga.tokens == gb.tokens and np.abs(ga.logprob - gb.logprob).max() < 1e-4
    ba, bb = model.translate(b.src, b.src_len, 12, beam=3), om.translate(b.src, b.src_len, 12, beam=3)
    assert ba.tokens == bb.tokens
