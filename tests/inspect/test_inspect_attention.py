"""``bptt inspect attention``: the page embeds the model's own attention weights (checked against torch)."""

import json
import re

import numpy as np
import pytest

from bptt.cli import main
from bptt.inspect.attention import attention_maps
from bptt.lm.model import load_model

TINY = ["--model", "transformer", "--layers", "2", "--d-model", "16", "--heads", "2", "--seq-len", "24",
        "--batch-size", "4", "--optimizer", "adamw", "--lr", "3e-3", "--eval-every", "10", "--sample-length", "0",
        "--no-progress", "--max-iters", "10", "--dtype", "float64"]


@pytest.fixture
def checkpoint(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 50, encoding="utf-8")
    assert main(["train", "--data", str(corpus), *TINY, "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run" / "last.safetensors"


def _page_data(path):
    page = path.read_text(encoding="utf-8")
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "no data block in the page"
    return json.loads(m.group(1))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_page_weights_are_the_models(checkpoint, tmp_path, torch):
    prompt = "the dog sat on the mat."
    out = tmp_path / "att.html"
    assert main(["inspect", "attention", str(checkpoint), "--prompt", prompt, "--out", str(out)]) == 0
    data = _page_data(out)
    model, vocab, _ = load_model(checkpoint)
    T = len(prompt)
    assert data["text"] == prompt and data["layers"] == 2 and data["heads"] == 2

    # the model's weights, from torch's nn.MultiheadAttention on the same state dict (need_weights, per head)
    nn = torch.nn
    sd = {k: torch.tensor(v) for k, v in model.state_dict().items()}
    layer = nn.TransformerEncoderLayer(16, 2, 64, 0.0, "gelu", norm_first=True, dtype=torch.float64)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16, dtype=torch.float64), enable_nested_tensor=False)
    enc.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    enc.eval()
    ids = torch.tensor(vocab.encode(prompt).astype(np.int64))
    x = (sd["embed.weight"][ids] + sd["pos.weight"][:T])[:, None]
    mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    ref = []
    with torch.no_grad():
        for lyr in enc.layers:
            z = lyr.norm1(x)
            o, w = lyr.self_attn(z, z, z, attn_mask=mask, need_weights=True, average_attn_weights=False)
            ref.append(w[0].numpy())
            x = x + o
            x = x + lyr.linear2(lyr.activation(lyr.linear1(lyr.norm2(x))))
    ref = np.stack(ref)  # (L, h, T, T)
    for l in range(2):
        for j in range(2):
            for t in range(T):
                row = np.array(data["weights"][l][j][t]) / 1000
                assert len(row) == t + 1  # the causal triangle: keys 0..t
                assert np.abs(row - ref[l, j, t, : t + 1]).max() <= 0.0005 + 1e-12
                assert np.all(ref[l, j, t, t + 1:] == 0)

    # the analysis itself: exact weights, and the logits of the model's own forward
    weights, logits = attention_maps(model, vocab.encode(prompt))
    assert np.abs(weights - ref).max() < 1e-12
    full, _ = model.forward(vocab.encode(prompt).astype(np.int64)[:, None])
    assert np.abs(logits - full[:, 0]).max() < 1e-12
    assert len(data["predIds"]) == T and len(data["predIds"][0]) == 5


def test_errors_are_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "x.html"
    assert main(["inspect", "attention", str(checkpoint), "--prompt", "a" * 25, "--out", str(out)]) == 2
    assert main(["inspect", "attention", str(checkpoint), "--prompt", "the Zebra", "--out", str(out)]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and all(e.startswith("bptt: error:") for e in errs)
    assert "context" in errs[0] and "Z" in errs[1]
    assert not out.exists()
