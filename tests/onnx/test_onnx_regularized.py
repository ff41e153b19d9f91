"""ONNX export of models with regularised cells: dropouts and weight drop (the identity in eval mode)
and tied weights export; layer norm, peepholes and zoneout are refused in one line."""

import numpy as np
import pytest
from onnx_support import require_onnx

require_onnx()

import bptt  # noqa: E402
import bptt.onnx as bo  # noqa: E402
from bptt.lm.data import Vocab  # noqa: E402
from bptt.lm.model import CharLM, CharLMConfig  # noqa: E402
from bptt.onnx.graph import OnnxError  # noqa: E402
from bptt.onnx.runtime import load_charlm  # noqa: E402

VOCAB = Vocab.from_json(sorted(set("the quick brown fox jumps over the lazy dog")))


def test_tied_charlm_with_dropouts_exports_and_matches(tmp_path):
    cfg = CharLMConfig(vocab_size=len(VOCAB), hidden=6, layers=2, embedding=6, tie_weights=True,
                       recurrent_dropout=0.3, weight_drop=0.3, embedding_dropout=0.2)
    lm = CharLM(cfg, rng=0).eval()
    ids = np.random.default_rng(1).integers(0, len(VOCAB), (5, 2))
    want, _ = lm.forward(ids)
    om, _, _ = load_charlm(bo.export_charlm(lm, VOCAB, tmp_path / "lm.onnx"))
    got, _ = om.forward(ids)
    assert np.max(np.abs(got - want)) < 1e-5


@pytest.mark.parametrize("opts", [dict(layer_norm=True), dict(peephole=True), dict(zoneout=0.1)])
def test_options_onnx_cannot_express_are_refused(tmp_path, opts):
    layer = bptt.LSTM(3, 4, **opts).eval()
    with pytest.raises(OnnxError, match="^ONNX export does not support layer_norm, peephole or zoneout yet"):
        bo.export(layer, tmp_path / "l.onnx")
