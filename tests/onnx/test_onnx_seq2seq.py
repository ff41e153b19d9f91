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
    with pytest.raises(OnnxError, match="takes a bptt Seq2Seq"):
        export_seq2seq(object(), tmp_path / "c")
