"""bptt inspect: exact gradient flow (against PyTorch), the units page, gate saturation, hidden stats, errors."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest

from bptt.inspect import analyses as introspect
from bptt.inspect.page import units_page
from bptt.cli import main
from bptt.lm.data import Vocab
from bptt.lm.model import CharLM, CharLMConfig

TEXT = (
    "def f(a, b='x'):  # a comment\n"
    "    return [a,\n"
    "            b]  # closing\n"
    "\n"
    'class C:\n    """Doc (string)."""\n    x = {"k": (1, 2)}\n'
) * 12


def tiny_model(kind, V=7, H=5, L=2, seed=0):
    return CharLM(CharLMConfig(V, kind, H, L, dtype="float64"), rng=seed)


# ============================================================================ gradient flow


def torch_state_grads(torch, model, ids, y):
    """∂L_T/∂h_t^{(k)} (and c) by autograd through an unrolled stack of torch cells."""
    cfg, p = model.config, model.params
    T, N = ids.shape
    x = torch.nn.functional.one_hot(torch.as_tensor(ids), cfg.vocab_size).double()
    cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[cfg.model]
    inputs, hs, cs = [x[t] for t in range(T)], [], []
    for k in range(cfg.layers):
        cell = cls(inputs[0].shape[1], cfg.hidden).double()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data = torch.tensor(p[f"rnn.{name}_l{k}"])
        h = torch.zeros(N, cfg.hidden, dtype=torch.float64)
        c = torch.zeros_like(h)
        hk, ck = [], []
        for t in range(T):
            if cfg.model == "lstm":
                h, c = cell(inputs[t], (h, c))
                ck.append(c)
            else:
                h = cell(inputs[t], h)
            hk.append(h)
        hs.append(hk)
        cs.append(ck)
        inputs = hk
    logits = inputs[-1] @ torch.tensor(p["decoder.weight"]).T + torch.tensor(p["decoder.bias"])
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="sum")
    flat = [h for hk in hs for h in hk] + [c for ck in cs for c in ck]
    grads = torch.autograd.grad(loss, flat)
    L = cfg.layers
    dh = [np.stack([g.numpy() for g in grads[k * T : (k + 1) * T]]) for k in range(L)]
    dc = [np.stack([g.numpy() for g in grads[(L + k) * T : (L + k + 1) * T]]) for k in range(L)] if cs[0] else [None] * L
    return dh, dc


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_state_gradients_equal_pytorch_autograd(torch, kind):
    model = tiny_model(kind)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 7, size=(9, 3))
    y = rng.integers(0, 7, size=3)
    ours = introspect.state_gradients(model, ids, y)
    ref_dh, ref_dc = torch_state_grads(torch, model, ids, y)
    for k, (dh, dc) in enumerate(ours):
        np.testing.assert_allclose(dh, ref_dh[k], rtol=1e-10, atol=1e-14)
        if kind == "lstm":
            np.testing.assert_allclose(dc, ref_dc[k], rtol=1e-10, atol=1e-14)
        else:
            assert dc is None
    norms = introspect.gradient_norms(model, ids, y)
    for k, row in enumerate(norms):
        want = np.linalg.norm(ref_dh[k], axis=2).mean(axis=1)[::-1]  # distance T − t
        np.testing.assert_allclose(row["h"], want, rtol=1e-10)
        if kind == "lstm":
            np.testing.assert_allclose(row["c"], np.linalg.norm(ref_dc[k], axis=2).mean(axis=1)[::-1], rtol=1e-10)


def test_last_step_gradient_is_the_decoder_read_backwards():
    # at distance 0 the top layer's gradient is (ŷ − onehot(y)) W_dec, with no torch needed
    model = tiny_model("lstm", L=1)
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    y = np.array([0, 2])
    model.rnn.backend = "auto"
    dh, _ = introspect.state_gradients(model, ids, y)[0]
    logits, _ = model.forward(ids)
    p = np.exp(logits[-1] - logits[-1].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(2), y] -= 1
    np.testing.assert_allclose(dh[-1], p @ model.params["decoder.weight"], rtol=1e-12)
    assert model.rnn.backend == "auto"  # restored
    assert all(not g.any() for g in model.grads.values())  # no parameter gradient was touched


def test_an_adaptive_softmax_is_traced_by_its_log_probabilities_and_refused_by_gradient_flow():
    model = CharLM(CharLMConfig(7, "lstm", 5, 1, dtype="float64", adaptive_softmax=True, cutoffs=[2, 4]), rng=0)
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    logits, _ = introspect.trace(model, ids)
    np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, rtol=1e-13)  # log p of every unit
    with pytest.raises(ValueError, match="not an adaptive one"):
        introspect.state_gradients(model, ids, np.array([0, 2]))


def test_gradients_command_writes_plot_csv_json(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "g" / "flow.png"
    rc = main(["inspect", "gradients", "--model", "rnn", "--model", "lstm", "--model", "gru", "--hidden", "8",
               "--window", "12", "--batch", "3", "--text", str(text), "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "g" / "flow.csv").read_text().splitlines()
    assert rows[0] == "model,layer,state,distance,mean_norm"
    assert len(rows) == 1 + 12 * (2 + 4 + 2)  # rnn h, lstm h+c, gru h; two layers each
    summary = json.loads((tmp_path / "g" / "flow.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["rnn 2x8 untrained", "lstm 2x8 untrained", "gru 2x8 untrained"]
    assert "d=11" in capsys.readouterr().out


# ============================================================================ units page


class _Checker(HTMLParser):
    """Balanced tags, and every src/href local (no scheme, no protocol-relative URL)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags, self.scripts = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and ("//" in value or ":" in value):
                self.errors.append(f"external {name}={value}")
        if tag == "script":
            self.scripts.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def test_units_page_is_valid_and_self_contained():
    text = TEXT[:300] + "</script><b>&amp; \u00e9"
    vocab = Vocab(text)
    model = CharLM(CharLMConfig(len(vocab), "lstm", 6, 2, dtype="float64"), rng=0)
    ids = vocab.encode(text).astype(np.int64)
    logits, traces = introspect.trace(model, ids[:, None], window=64)
    assert logits.shape == (len(text), 1, len(vocab)) and traces[1].h.shape == (len(text), 1, 6)
    act = traces[1].h[:, 0]
    pid, pp = introspect.top_predictions(logits[:, 0])
    page = units_page(text, act, introspect.text_properties(text), pid, pp, vocab.chars, units=[3, 1], top=4,
                                 title="t <x>", subtitle="s")
    chk = _Checker()
    chk.feed(page)
    chk.close()
    assert not chk.errors and chk.stack == []
    assert "link" not in chk.tags and all("src" not in s for s in chk.scripts)
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert data["text"] == text  # the '</script>' inside the text did not end the element
    assert data["chosen"] == [3, 1] and set(data["acts"]) >= {"3", "1"}
    assert len(data["acts"]["3"]) == len(text) == len(data["predIds"])
    assert "<title>t &lt;x&gt;</title>" in page


def test_text_properties_follow_python_syntax():
    text = 'x = f("a#b", [1,\n  2])  # c\n'
    p = introspect.text_properties(text)
    at = {name: "".join(str(int(v)) for v in arr) for name, arr in p.items()}
    assert at["in_quotes"] == "000000111110000000000000000000"[: len(text)]
    assert at["in_comment"][text.index("# c") :] == "1110"
    assert at["in_brackets"][text.index("[") : text.index("]")] == "1" * (text.index("]") - text.index("["))
    assert p["indent"][text.index("2")] == 2 and p["column"][text.index("2")] == 3


def test_unit_correlations_find_a_planted_unit():
    props = introspect.text_properties(TEXT)
    rng = np.random.default_rng(0)
    act = rng.uniform(-0.2, 0.2, size=(len(TEXT), 4))
    act[:, 2] = 0.8 * props["in_comment"] - 0.4
    r = introspect.unit_correlations(act, props)
    names = list(props)
    assert names[int(np.abs(r[2]).argmax())] == "in_comment" and r[2, names.index("in_comment")] == pytest.approx(1.0)
    assert np.all(np.abs(r[[0, 1, 3]]) < 0.3)


# ============================================================================ gates and hidden stats


def test_gate_saturation_fractions():
    H = 2
    gates = np.full((4, 1, 4 * H), 0.5)
    gates[:3, 0, H] = 0.95  # forget unit 0 right-saturated 3 steps of 4
    gates[:, 0, 0] = 0.05  # input unit 0 always left-saturated
    sat = introspect.gate_saturation(gates, "lstm", H)
    assert list(sat) == ["input", "forget", "output"]
    np.testing.assert_allclose(sat["forget"]["right"], [0.75, 0.0])
    np.testing.assert_allclose(sat["input"]["left"], [1.0, 0.0])
    np.testing.assert_allclose(sat["output"]["left"] + sat["output"]["right"], [0.0, 0.0])


@pytest.mark.parametrize("split", [False, True])
def test_hidden_stats_read_the_last_forward(split, monkeypatch):
    model = tiny_model("gru", L=2)
    with pytest.raises(ValueError, match="forward pass first"):
        model.rnn.hidden_state_stats()
    if split:  # the batch run as slices in threads: the stats read every slice's cache
        from bptt.runtime import policy, threads

        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1)
        monkeypatch.setattr(policy, "SMALL_MACS", -1)
        monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    ids = np.random.default_rng(0).integers(0, 7, size=(6, 2))
    model.forward(ids)
    assert len(model.rnn._ctx.parts) == (2 if split else 0)
    stats = model.rnn.hidden_state_stats()
    _, traces = introspect.trace(model, ids)
    for k, t in enumerate(traces):
        h_prev = np.concatenate([np.zeros((1, 2, 5)), t.h[:-1]])  # the states entering each step
        assert stats[f"h_mean_l{k}"] == pytest.approx(h_prev.mean())
        assert stats[f"h_var_l{k}"] == pytest.approx(h_prev.var())


def test_training_plot_shows_hidden_stats(tmp_path):
    from bptt.viz import plot_training_log

    log = tmp_path / "log.jsonl"
    recs = [{"iter": i, "train_loss": 3.0 / i} for i in range(1, 6)]
    recs += [{"iter": i, "h_mean_l0": 0.01 * i, "h_var_l0": 0.1, "h_mean_l1": 0.0, "h_var_l1": 0.2} for i in (1, 3, 5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    plot_training_log(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


# ============================================================================ the command on checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from bptt.lm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("inspect")
    data = root / "corpus.txt"
    data.write_text(TEXT * 3)
    paths = {}
    for kind in ("lstm", "rnn"):
        out = root / kind
        train(TrainConfig(data=str(data), out=str(out), model=kind, hidden=8, layers=2, seq_len=10, batch_size=4,
                          max_iters=2, eval_every=2, sample_length=0, progress=False), log=lambda m: None)
        paths[kind] = out / "last.safetensors"
    return root, data, paths


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("bptt: error:") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_units_and_gates_commands(checkpoints, tmp_path, capsys):
    root, data, paths = checkpoints
    html_out = tmp_path / "u.html"
    assert main(["inspect", "units", str(paths["lstm"]), "--text", str(data), "--max-chars", "400", "--units", "3,7",
                 "--layer", "0", "--kind", "c", "--out", str(html_out)]) == 0
    page = html_out.read_text()
    assert page.startswith("<!DOCTYPE html>") and '"chosen":[3,7]' in page
    gates_out = tmp_path / "gates.png"
    assert main(["inspect", "gates", str(paths["lstm"]), "--data", str(data), "--max-chars", "500", "--streams", "5",
                 "--out", str(gates_out)]) == 0
    assert gates_out.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(gates_out.with_suffix(".json").read_text())
    assert list(summary["layers"][1]) == ["input", "forget", "output"] and len(summary["layers"][1]["forget"]["left"]) == 8
    assert summary["text"] == str(data)  # --data, train's name for it, is --text
    assert main(["inspect", "gradients", str(paths["lstm"]), "--model", "gru", "--hidden", "8", "--text", str(data),
                 "--window", "20", "--batch", "2", "--out", str(tmp_path / "gf.png")]) == 0
    assert (tmp_path / "gf.png").exists()


def test_bad_inputs_give_one_line_errors(checkpoints, tmp_path, capsys):
    root, data, paths = checkpoints
    lstm = str(paths["lstm"])
    assert main(["inspect", "units", str(tmp_path / "nope.safetensors"), "--text", str(data)]) == 2
    _one_line_error(capsys, "not found")
    odd = tmp_path / "odd.txt"
    odd.write_text("def f(): return '\u00e9\u00e9', '\u2603'\n")
    assert main(["inspect", "units", lstm, "--text", str(odd), "--out", str(tmp_path / "x.html")]) == 2
    _one_line_error(capsys, "3 characters outside the vocabulary", "'\u00e9'", "'\u2603'")
    assert main(["inspect", "units", lstm, "--text", str(data), "--units", "3,99", "--out", str(tmp_path / "x.html")]) == 2
    _one_line_error(capsys, "99", "out of range", "8 units")
    assert main(["inspect", "units", lstm, "--text", str(data), "--units", "a,b"]) == 2
    _one_line_error(capsys, "comma-separated")
    assert main(["inspect", "units", lstm, "--text", str(data), "--layer", "2"]) == 2
    _one_line_error(capsys, "--layer 2 is out of range", "2 layers")
    assert main(["inspect", "gates", str(paths["rnn"]), "--text", str(data)]) == 2
    _one_line_error(capsys, "LSTM or GRU")
    assert main(["inspect", "units", str(paths["rnn"]), "--text", str(data), "--kind", "c"]) == 2
    _one_line_error(capsys, "cell state")
    assert main(["inspect", "gradients", "--text", str(data)]) == 2
    _one_line_error(capsys, "--model")
    assert main(["inspect", "gradients", "--model", "rnn", "--text", str(odd), "--window", "500"]) == 2
    _one_line_error(capsys, "window of 500")
    assert not (tmp_path / "x.html").exists()
