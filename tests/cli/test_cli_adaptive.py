"""bptt train / eval / sample with --adaptive-softmax (a word model's output layer): a few training steps on a
tiny word corpus, the checkpoint round trip (config, torch's keys, resume), ``bptt eval``'s perplexity against
torch on the checkpoint's weights, sampling with no flag, and the combinations refused in one line."""

import json

import numpy as np
import pytest

from bptt.checkpoint import load_checkpoint
from bptt.cli import main
from bptt.lm.model import default_cutoffs, load_model

# torch's warning when it builds the zero-width projection that --hidden 12 gives the second cluster (⌊12/16⌋)
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")

TINY = ["--hidden", "12", "--embedding", "10", "--layers", "1", "--seq-len", "8", "--batch-size", "3",
        "--eval-every", "6", "--sample-length", "5", "--no-progress", "--log-every", "2", "--dtype", "float64"]


def _zipf_text(rng, lines, n_words=40):
    """Lines of words drawn with p(w_k) ∝ 1/k: a few frequent words, many rare ones (as in real text)."""
    words = [f"w{k}" for k in range(n_words)]
    p = 1.0 / np.arange(1, n_words + 1)
    return "".join(" ".join(rng.choice(words, 6, p=p / p.sum())) + " .\n" for _ in range(lines))


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, n in (("train", 150), ("valid", 20), ("test", 25)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(_zipf_text(rng, n) + ("w99 w0 .\n" if name == "test" else ""), encoding="utf-8")
    return paths


def _train(corpus, out, *extra):
    return main(["train", "--data", str(corpus["train"]), "--val-data", str(corpus["valid"]), "--test-data",
                 str(corpus["test"]), "--unit", "word", "--out", str(out), *TINY, *extra])


def _torch_perplexity(torch, path, units, text):
    """Perplexity per word of ``text`` read as one stream, computed by torch modules holding the checkpoint's
    weights (Embedding → LSTM → AdaptiveLogSoftmaxWithLoss), and the tokenisation done here by hand."""
    tensors, meta = load_checkpoint(path)
    cfg = meta["config"]
    V, H, E = cfg["vocab_size"], cfg["hidden"], cfg["embedding"]
    embed = torch.nn.Embedding(V, E, dtype=torch.float64)
    lstm = torch.nn.LSTM(E, H, cfg["layers"], dtype=torch.float64)
    asm = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, cfg["cutoffs"], div_value=cfg["div_value"], head_bias=True,
                                              dtype=torch.float64)
    for prefix, module in (("embed.", embed), ("rnn.", lstm), ("decoder.", asm)):
        module.load_state_dict({k[len(prefix):]: torch.tensor(v) for k, v in tensors["model"].items()
                                if k.startswith(prefix)})
    tokens = text.replace(".", " . ").replace("\n", " <eos> ").split()
    ids = torch.tensor([units.index.get(t, 0) for t in tokens])
    with torch.no_grad():
        h, _ = lstm(embed(ids[:-1, None]))
        out = asm(h[:, 0], ids[1:])
    return float(np.exp(out.loss.item())), len(tokens) - 1, sum(t not in units.index for t in tokens)


def test_adaptive_softmax_trains_round_trips_evaluates_and_samples(torch, tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert _train(corpus, out, "--adaptive-softmax", "--max-iters", "12") == 0
    err = capsys.readouterr().err
    model, units, meta = load_model(out / "best.safetensors")
    V = len(units)
    assert f"adaptive softmax (cutoffs {default_cutoffs(V)}, div_value 4)" in err and "perplexity" in err
    assert meta["config"]["adaptive_softmax"] is True and meta["config"]["cutoffs"] == default_cutoffs(V)
    assert model.config.adaptive_softmax and model.config.cutoffs == default_cutoffs(V)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [6, 12]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    # the checkpoint holds torch's keys, and they reload into the same numbers
    tensors, _ = load_checkpoint(out / "last.safetensors")
    assert {"decoder.head.weight", "decoder.head.bias", "decoder.tail.0.0.weight", "decoder.tail.1.1.weight"} <= set(
        tensors["model"])
    last, _, _ = load_model(out / "last.safetensors")
    for k, v in last.state_dict().items():
        np.testing.assert_array_equal(v, tensors["model"][k])

    # bptt eval (no flag: the checkpoint says adaptive softmax) against torch on the same weights
    text = corpus["test"].read_text()
    assert main(["eval", str(out / "best.safetensors"), "--data", str(corpus["test"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ppl, words, unknown = _torch_perplexity(torch, out / "best.safetensors", units, text)
    assert res["words"] == words and res["unknown_count"] == unknown == 1
    assert res["perplexity"] == pytest.approx(ppl, rel=1e-10)
    assert main(["eval", str(out / "best.safetensors"), "--data", str(corpus["test"])]) == 0
    assert f"perplexity {ppl:.3f} per word" in capsys.readouterr().out

    assert main(["sample", str(out / "best.safetensors"), "--length", "12", "--seed", "0", "--prime", "w0 w1"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("w0 w1") and all(w in units.index or w in "." for w in sample.split())

    # resume: the adaptive softmax comes back from the checkpoint; its layout cannot change
    assert main(["train", "--out", str(out), "--resume", "--max-iters", "14", "--no-progress"]) == 0
    assert load_checkpoint(out / "last.safetensors")[1]["step"] == 14
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-iters", "16", "--cutoffs", "3,9"]) == 2
    assert "--resume cannot change --cutoffs" in capsys.readouterr().err


def test_given_cutoffs_and_div_value_are_kept(tmp_path, corpus):
    out = tmp_path / "run"
    assert _train(corpus, out, "--adaptive-softmax", "--cutoffs", "3,9,20", "--div-value", "2", "--max-iters", "3") == 0
    model, _, meta = load_model(out / "last.safetensors")
    assert meta["config"]["cutoffs"] == [3, 9, 20] and meta["config"]["div_value"] == 2.0
    shapes = {k: v.shape for k, v in model.state_dict().items() if k.startswith("decoder.")}
    V = model.config.vocab_size
    assert shapes == {"decoder.head.weight": (6, 12), "decoder.head.bias": (6,), "decoder.tail.0.0.weight": (6, 12),
                      "decoder.tail.0.1.weight": (6, 6), "decoder.tail.1.0.weight": (3, 12),
                      "decoder.tail.1.1.weight": (11, 3), "decoder.tail.2.0.weight": (1, 12),
                      "decoder.tail.2.1.weight": (V - 20, 1)}


@pytest.mark.parametrize("case", ["char", "byte", "tied", "transformer", "cutoffs-alone", "cutoffs-past-V",
                                  "cutoffs-text", "cutoffs-order", "div-value"])
def test_combinations_refused_in_one_line(tmp_path, corpus, capsys, case):
    extra, expect = {
        "char": (["--unit", "char"], "--adaptive-softmax is for word vocabularies (--unit word); a char model"),
        "byte": (["--unit", "byte"], "--adaptive-softmax is for word vocabularies (--unit word); a byte model"),
        "tied": (["--tie-weights", "--embedding", "12"], "--tie-weights and --adaptive-softmax do not combine"),
        "transformer": (["--model", "transformer"], "not of --model transformer"),
        "cutoffs-alone": (["--no-adaptive-softmax", "--cutoffs", "5"], "--cutoffs applies with --adaptive-softmax only"),
        "cutoffs-past-V": (["--cutoffs", "5,500"], "cutoffs must be increasing whole numbers in [1, V - 1]"),
        "cutoffs-text": (["--cutoffs", "5;9"], "--cutoffs must be whole numbers separated by commas"),
        "cutoffs-order": (["--cutoffs", "9,5"], "--cutoffs must be increasing word ids >= 1"),
        "div-value": (["--div-value", "0"], "--div-value must be a finite number > 0"),
    }[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["train", "--data", str(corpus["train"]), "--unit", "word", "--out", str(out), "--max-iters", "3", *TINY,
            "--adaptive-softmax", *extra]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bptt: error:")]
    assert len(lines) == 1 and expect in lines[0], lines
    assert {p.name for p in out.iterdir()} <= {"keep.txt", ".lock", "corpus.npy"}
    assert (out / "keep.txt").read_text() == "mine"
