"""Seq2seq: whole-model gradient checks, PyTorch parity, decoding, masking, tasks, CLI end to end."""

import datetime as dt
import json

import numpy as np
import pytest

from bptt.lm.data import DataError
from bptt.nn.gradcheck import gradcheck
from bptt.nn.losses import cross_entropy
from bptt.seq2seq.model import Seq2Seq, Seq2SeqConfig, make_batch, train_step
from bptt.cli import main as cli_main
from bptt.seq2seq.decode import decode_max_len
from bptt.seq2seq.train import load_model as load_seq2seq
from bptt.seq2seq.tasks import EOS, AdditionTask, DatesTask, ReverseTask, TokenVocab, load_pairs

CONFIGS = [  # (cell, attention, bidirectional, layers, enc_hidden)
    ("lstm", "none", True, 2, 0),
    ("lstm", "dot", True, 2, 0),
    ("lstm", "general", False, 1, 5),  # encoder and decoder widths differ: the bridge maps 5 → 4
    ("gru", "additive", True, 2, 0),
    ("rnn", "general", True, 1, 3),
    ("gru", "none", False, 1, 0),
]


def tiny_model(cell, attention, bidirectional, layers, enc_hidden, dtype=np.float64, seed=0):
    cfg = Seq2SeqConfig(src_vocab=8, tgt_vocab=7, embedding=3, hidden=4, enc_hidden=enc_hidden, layers=layers,
                        cell=cell, bidirectional=bidirectional, attention=attention, attn_size=3)
    model = Seq2Seq(cfg, dtype=dtype, rng=np.random.default_rng(seed))
    if attention != "none":  # larger scores, so attention gradients stand well above finite-difference noise
        for name, p, _ in model.named_parameters():
            if name.startswith("attention."):
                p *= 6.0
    return model


def tiny_batch(seed=1, src_lens=(4, 2, 3), tgt_lens=(3, 1, 2)):
    rng = np.random.default_rng(seed)
    return make_batch([rng.integers(3, 8, k) for k in src_lens], [rng.integers(3, 7, k) for k in tgt_lens])


def summed_loss(model, b):
    return cross_entropy(model(b.src, b.src_len, b.tgt_in), b.tgt_out, mask=b.tgt_mask, reduction="sum")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_whole_model(cfg):
    model, b = tiny_model(*cfg), tiny_batch()
    model.zero_grad()
    _, dlogits = summed_loss(model, b)
    model.backward(dlogits)
    # tiny gradients (e.g. deep in the encoder) sit near round-off, so a larger step: the
    # O(ε²) truncation error stays far below the O(1/ε) rounding noise that ε = 1e-6 gives here
    gradcheck(lambda: summed_loss(model, b)[0], model.params, model.grads, eps=1e-4, tol=1e-6)


# ---------------------------------------------------------------------------- PyTorch reference
def torch_loss(torch, model, b):
    """The same model written with torch.nn modules and autograd; returns (loss, {name: tensor})."""
    nn = torch.nn
    cfg = model.config
    K, He, H, L, E = cfg.directions, cfg.encoder_hidden, cfg.hidden, cfg.layers, cfg.embedding
    Cell = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell]
    mods = {
        "src_embed": nn.Embedding(cfg.src_vocab, E),
        "encoder": Cell(E, He, L, bidirectional=cfg.bidirectional),
        "bridge": nn.Linear(model.Z, L * H * (2 if cfg.cell == "lstm" else 1)),
        "tgt_embed": nn.Embedding(cfg.tgt_vocab, E),
        "decoder": Cell(E, H, L),
        "out": nn.Linear(H, cfg.tgt_vocab),
    }
    if cfg.attention != "none":
        mods["combine"] = nn.Linear(K * He + H, H, bias=False)
    params = {}
    for name, mod in mods.items():
        mod.double()
        mod.load_state_dict({k[len(name) + 1 :]: torch.tensor(v) for k, v in model.params.items() if k.startswith(name + ".")})
        params.update({f"{name}.{k}": v for k, v in mod.named_parameters()})
    att = {k[10:]: torch.tensor(v, requires_grad=True) for k, v in model.params.items() if k.startswith("attention.")}
    params.update({"attention." + k: v for k, v in att.items()})

    S, N = b.src.shape
    x = mods["src_embed"](torch.tensor(b.src))
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(b.src_len), enforce_sorted=False)
    mem, st = mods["encoder"](packed)
    mem, _ = nn.utils.rnn.pad_packed_sequence(mem, total_length=S)  # (S, N, C), zero past lengths
    hn, cn = st if cfg.cell == "lstm" else (st, None)
    top = lambda s: s[(L - 1) * K : L * K].permute(1, 0, 2).reshape(N, -1)  # noqa: E731
    z = torch.cat([top(hn)] + ([top(cn)] if cn is not None else []), dim=1)
    s = mods["bridge"](z)
    h0 = torch.tanh(s[:, : L * H]).reshape(N, L, H).permute(1, 0, 2).contiguous()
    state0 = (h0, s[:, L * H :].reshape(N, L, H).permute(1, 0, 2).contiguous()) if cfg.cell == "lstm" else h0
    h, _ = mods["decoder"](mods["tgt_embed"](torch.tensor(b.tgt_in)), state0)  # (T, N, H)
    if cfg.attention != "none":
        from torch_reference import torch_attention

        q = h.transpose(0, 1)
        mask = torch.arange(S)[None, :] < torch.tensor(b.src_len)[:, None]
        c, _ = torch_attention(torch, cfg.attention, q, mem.transpose(0, 1), mask, att)
        h = torch.tanh(mods["combine"](torch.cat([c, q], dim=2))).transpose(0, 1)
    logits = mods["out"](h)
    target = torch.tensor(np.where(b.tgt_mask, b.tgt_out, -100))
    loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.tgt_vocab), target.reshape(-1), ignore_index=-100)
    return loss, params


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_torch(cfg, torch):
    model, b = tiny_model(*cfg), tiny_batch(src_lens=(5, 2, 4, 1), tgt_lens=(3, 1, 4, 2))
    model.zero_grad()
    loss, dlogits = model.loss(b)
    model.backward(dlogits)
    tloss, tparams = torch_loss(torch, model, b)
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    assert set(tparams) == set(model.grads)
    for name, g in model.grads.items():
        np.testing.assert_allclose(g, tparams[name].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------- masking and decoding
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: "-".join(map(str, c)))
def test_padding_changes_nothing(cfg):
    model = tiny_model(*cfg)
    rng = np.random.default_rng(3)
    src, tgt = rng.integers(3, 8, 3), rng.integers(3, 7, 2)
    alone = make_batch([src], [tgt])
    padded = make_batch([src, rng.integers(3, 8, 7)], [tgt, rng.integers(3, 7, 5)])
    la = model(alone.src, alone.src_len, alone.tgt_in)
    lp = model(padded.src, padded.src_len, padded.tgt_in)
    np.testing.assert_allclose(lp[: la.shape[0], 0], la[:, 0], rtol=1e-12, atol=1e-14)
    ga = model.greedy(alone.src, alone.src_len, 8)
    gp = model.greedy(padded.src, padded.src_len, 8)
    assert ga.tokens[0] == gp.tokens[0]
    assert ga.logprob[0] == pytest.approx(gp.logprob[0], rel=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_beam_width_one_is_greedy(cfg, dtype):
    for seed in range(3):
        model = tiny_model(*cfg, dtype=dtype, seed=seed)
        b = make_batch([np.random.default_rng(seed).integers(3, 8, k) for k in (5, 1, 3, 4, 2)])
        g = model.greedy(b.src, b.src_len, 9, return_attention=True)
        r = model.beam_search(b.src, b.src_len, 1, 9, return_attention=True)
        assert g.tokens == r.tokens
        np.testing.assert_array_equal(g.logprob, r.logprob)
        if cfg[1] != "none":
            for a, c in zip(g.attention, r.attention, strict=True):
                np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: "-".join(map(str, c)))
def test_beam_scores_are_model_logprobs(cfg):
    model = tiny_model(*cfg)
    b = make_batch([np.random.default_rng(5).integers(3, 8, k) for k in (5, 1, 3)])
    for beam in (2, 4):
        r = model.beam_search(b.src, b.src_len, beam, 6)
        ended = [n for n, t in enumerate(r.tokens) if len(t) < 6]  # stopped by </s>, so scored with it
        if ended:
            want = model.score(b.src[:, ended], b.src_len[ended], [r.tokens[n] for n in ended])
            np.testing.assert_allclose(r.logprob[ended], want, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_never_scores_below_greedy(alpha):
    """On its own objective (log p, or log p / lp(|y|)), wider beams never lose to greedy."""
    for seed in range(4):
        model = tiny_model(*CONFIGS[seed % len(CONFIGS)], seed=seed)
        b = make_batch([np.random.default_rng(seed).integers(3, 8, k) for k in (5, 1, 3, 4, 2, 6)])
        g = model.greedy(b.src, b.src_len, 7)
        for beam in (2, 3, 5):
            r = model.beam_search(b.src, b.src_len, beam, 7, alpha=alpha)
            lp = lambda res: np.array([((5.0 + min(len(t) + 1, 7)) / 6.0) ** alpha for t in res.tokens])
            assert np.all(r.logprob / lp(r) >= g.logprob / lp(g) - 1e-12)


def test_scheduled_sampling_step_runs_and_full_forcing_is_plain_loss():
    model, b = tiny_model(*CONFIGS[1]), tiny_batch()
    model.zero_grad()
    loss = train_step(model, b, teacher_forcing=1.0)
    assert loss == pytest.approx(model.loss(b)[0])
    model.zero_grad()
    loss2 = train_step(model, b, teacher_forcing=0.0, rng=np.random.default_rng(0))
    assert np.isfinite(loss2) and all(np.all(np.isfinite(g)) for g in model.grads.values())


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown cell"):
        Seq2SeqConfig(5, 5, cell="transformer")
    with pytest.raises(ValueError, match="unknown attention"):
        Seq2SeqConfig(5, 5, attention="luong")
    with pytest.raises(ValueError, match="dot attention"):
        Seq2Seq(Seq2SeqConfig(5, 5, hidden=4, enc_hidden=3, attention="dot"))


# ---------------------------------------------------------------------------- tasks and data
def test_task_examples_are_correct_and_disjoint():
    rng = np.random.default_rng(0)
    for task in (DatesTask(), AdditionTask(), ReverseTask()):
        sv, tv = task.vocabs()
        test = dict(task.test_set())
        assert len(test) == task.test_size
        stream = task.train_stream(rng)
        for _ in range(3000):
            s, t = next(stream)
            assert s not in test
            assert len(s) <= task.max_src_len and len(t) <= task.max_tgt_len
            sv.encode(s), tv.encode(t)  # inside the vocabularies
            if task.name == "addition":
                a, c = s.split("+")
                assert int(t) == int(a) + int(c) and len(a) <= 4 and len(c) <= 4
            elif task.name == "reverse":
                assert t == s[::-1]
            else:
                dt.date.fromisoformat(t)
    # the example says "saturday 9 may 2018", but 9 May 2018 was a Wednesday: weekdays are real
    from bptt.seq2seq.tasks import _date_formats

    want = {"wednesday 9 may 2018", "9/5/18", "May 9, 2018", "2018.05.09", "09 May 18"}
    assert want <= set(_date_formats(dt.date(2018, 5, 9)))
    assert "saturday 12 may 2018" in _date_formats(dt.date(2018, 5, 12))


def test_load_pairs_errors(tmp_path):
    p = tmp_path / "pairs.tsv"
    p.write_text("ab\tba\n\n  \ncd\tdc\n", encoding="utf-8")
    pairs, skipped = load_pairs(p, "char")
    assert pairs == [(["a", "b"], ["b", "a"]), (["c", "d"], ["d", "c"])] and skipped == 2
    p.write_text("the cat\tle chat\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.tsv:2: no tab"):
        load_pairs(p, "word")
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.tsv")
    with pytest.raises(DataError, match=r"not in the model's vocabulary: 'z'"):
        TokenVocab(["a", "b"]).encode(["a", "z"])


# ---------------------------------------------------------------------------- CLI end to end
TINY = ["--hidden", "16", "--embedding", "8", "--batch-size", "16", "--eval-size", "20", "--quiet"]


def test_cli_task_train_resume_translate_eval(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["seq2seq", "train", "--task", "reverse", "--attention", "additive", "--bidirectional",
            "--max-steps", "12", "--eval-every", "6", "--out", str(out), *TINY]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 12
    args[args.index("12")] = "20"
    assert cli_main([*args, "--resume"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "exact_match" in r] == [6, 12, 18, 20]  # evaluations
    assert [r["step"] for r in log if "train_loss" in r] == [12, 20]  # train records: --log-every 50, and the end
    capsys.readouterr()

    ckpt = str(out / "model.safetensors")
    png = tmp_path / "att.png"
    assert cli_main(["seq2seq", "translate", ckpt, "abc", "--beam", "3", "--attention-png", str(png)]) == 0
    assert set(capsys.readouterr().out.strip()) <= set("abcdefghijklmnopqrstuvwxyz")
    assert png.stat().st_size > 1000
    assert cli_main(["seq2seq", "eval", ckpt, "--json", "--beam", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    # the same figure computed here, decoding one input at a time: eval's batching and scoring agree with it
    model, _, data = load_seq2seq(ckpt)
    pairs = ReverseTask().test_set()
    hits = 0
    for src, tgt in pairs:
        b = make_batch([data.src_vocab.encode(list(src))])
        r = model.translate(b.src, b.src_len, decode_max_len(data.max_tgt_len), beam=2)
        hits += data.tgt_vocab.decode(r.tokens[0]) == list(tgt)
    assert res["n"] == len(pairs) == ReverseTask.test_size
    assert res["exact_match"] == hits / len(pairs)

    assert cli_main(["seq2seq", "translate", ckpt, "ABC"]) == 2
    assert "outside the model's vocabulary: 'A', 'B', 'C'" in capsys.readouterr().err
    assert cli_main(["seq2seq", "translate", ckpt, "a" * 21]) == 2
    assert "maximum input length is 20" in capsys.readouterr().err


def test_cli_tsv_data(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    words = ["cat", "dog", "bird", "fish", "cow"]
    lines = [f"{a} {b}\t{b} {a}" for a in words for b in words] + [""]
    data.write_text("\n".join(lines[:7] + [""] + lines[7:]), encoding="utf-8")
    out = tmp_path / "run"
    assert cli_main(["seq2seq", "train", "--data", str(data), "--level", "word", "--max-steps", "4",
                     "--eval-every", "2", "--out", str(out), "--attention", "dot", *TINY[:-1]]) == 0
    assert "skipped 1 empty line(s)" in capsys.readouterr().err
    ckpt = str(out / "model.safetensors")
    assert cli_main(["seq2seq", "eval", ckpt, "--data", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 25 and "bleu" in res and res["skipped_empty_lines"] == 1
    assert cli_main(["seq2seq", "translate", ckpt, "cat horse"]) == 2
    assert "'horse'" in capsys.readouterr().err
    assert cli_main(["seq2seq", "translate", ckpt, "cat dog cow"]) == 2
    assert "maximum input length is 2" in capsys.readouterr().err
    assert cli_main(["seq2seq", "eval", ckpt]) == 2  # trained on --data: needs --data to evaluate
    bad = tmp_path / "bad.tsv"
    bad.write_text("cat dog\tdog cat\ncat dog dog cat\n", encoding="utf-8")
    assert cli_main(["seq2seq", "train", "--data", str(bad), "--out", str(tmp_path / "bad_run"), *TINY]) == 2
    assert "bad.tsv:2: no tab" in capsys.readouterr().err
    # a fresh run into the occupied directory is refused, nothing overwritten; --overwrite replaces the run
    before = (out / "model.safetensors").read_bytes()
    assert cli_main(["seq2seq", "train", "--data", str(data), "--out", str(out), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert cli_main(["seq2seq", "train", "--data", str(data), "--out", str(out), "--overwrite", "--max-steps", "2",
                     "--eval-every", "2", *TINY]) == 0
    assert (out / "model.safetensors").read_bytes() != before


def test_greedy_output_ends_before_eos():
    model = tiny_model(*CONFIGS[0])
    b = make_batch([np.array([3, 4, 5])])
    r = model.greedy(b.src, b.src_len, 7)
    assert EOS not in r.tokens[0]
