"""The one training loop (bptt.trainer) and its checkpoint schema."""

import numpy as np
import pytest

from bptt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, upgrade_meta
from bptt.lm.data import Vocab
from bptt.lm.model import CharLM, CharLMConfig, load_model
from bptt.seq2seq.model import Seq2Seq, Seq2SeqConfig
from bptt.seq2seq.train import load_model as load_seq2seq


def test_old_charlm_schema_loads(tmp_path):
    """Checkpoints written before the one loop named step/config/train/best differently; they still load."""
    model = CharLM(CharLMConfig(vocab_size=5, hidden=6, layers=1), rng=0)
    vocab = Vocab("abcde")
    old_meta = {"kind": "charlm", "model_config": model.config.to_dict(), "train_config": {"seq_len": 9},
                "vocab": vocab.to_json(), "iteration": 17, "best_val": 1.25, "val_loss": 1.3}
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, old_meta)
    loaded, v, meta = load_model(path)
    assert meta["step"] == 17 and meta["best"] == 1.25 and meta["train"] == {"seq_len": 9}
    assert "iteration" not in meta and v == vocab
    for (name, p, _), (name2, q, _) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == name2
        np.testing.assert_array_equal(p, q)


def test_upgrade_leaves_current_schema_alone():
    meta = {"kind": "seq2seq", "step": 3, "config": {"a": 1}, "train": {}, "best": 0.5}
    assert upgrade_meta(meta) == meta


def test_seq2seq_checkpoint_of_another_kind_is_refused(tmp_path):
    model = CharLM(CharLMConfig(vocab_size=5, hidden=6, layers=1), rng=0)
    path = tmp_path / "lm.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, {"kind": "charlm", "step": 1, "config": model.config.to_dict()})
    with pytest.raises(CheckpointError, match="not a seq2seq model"):
        load_seq2seq(path)


def test_old_seq2seq_schema_loads(tmp_path):
    """seq2seq checkpoints already used step/config/train; one written before the one loop still loads."""
    cfg = Seq2SeqConfig(src_vocab=6, tgt_vocab=7, embedding=4, hidden=8)
    model = Seq2Seq(cfg, rng=np.random.default_rng(0))
    meta = {"kind": "seq2seq", "config": cfg.to_dict(), "src_vocab": ["<pad>", "<s>", "</s>", "a", "b", "c"],
            "tgt_vocab": ["<pad>", "<s>", "</s>", "a", "b", "c", "d"], "task": None, "data": "x.tsv", "level": "char",
            "max_src_len": 5, "max_tgt_len": 5, "step": 40, "optimizer": {}, "train": {"lr": 0.002}}
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, meta)
    loaded, m, data = load_seq2seq(path)
    assert m["step"] == 40 and len(data.tgt_vocab) == 7
    np.testing.assert_array_equal(loaded.state_dict()["decoder.weight_hh_l0"], model.state_dict()["decoder.weight_hh_l0"])
    assert load_checkpoint(path)[1]["step"] == 40
