"""``bptt seq2seq train | translate | eval``: the command line of :mod:`bptt.seq2seq.model`.

``register(subparsers)`` adds the ``seq2seq`` command to an argparse parser;
each handler takes the parsed ``args`` and returns an exit code.  User mistakes
raise :class:`bptt.lm.data.DataError` (a ValueError) with a one-line message.

A run directory (``--out``) holds ``model.safetensors`` (weights, optimizer
state, and JSON meta: config, vocabularies, task or data, step, RNG), its JSON
sidecar ``model.json``, and ``log.jsonl`` (one JSON object per evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from bptt.checkpoint import CheckpointError, load_checkpoint, restore_rng, rng_state, save_checkpoint
from bptt.lm.data import DataError
from bptt.seq2seq.model import Seq2Seq, Seq2SeqConfig, make_batch, train_step
from bptt.nn.optim import clip_grad_norm, make_optimizer, make_schedule
from bptt.seq2seq.tasks import TASKS, TokenVocab, detokenize, get_task, load_pairs, tokenize

__all__ = ["register", "cmd_train", "cmd_translate", "cmd_eval", "load_model", "evaluate", "SeqData"]

CKPT_NAME = "model.safetensors"
KIND = "seq2seq"


# ============================================================================ data
class SeqData:
    """Where training pairs come from: a built-in task (endless stream) or a TSV file."""

    def __init__(self, task=None, pairs=None, level="char", valid=None, src_vocab=None, tgt_vocab=None,
                 max_src_len=0, max_tgt_len=0):
        self.task, self.pairs, self.level, self.valid = task, pairs, level, valid
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len

    @classmethod
    def from_task(cls, name):
        task = get_task(name)
        sv, tv = task.vocabs()
        valid = [(list(s), list(t)) for s, t in task.test_set()]
        return cls(task=task, level="char", valid=valid, src_vocab=sv, tgt_vocab=tv,
                   max_src_len=task.max_src_len, max_tgt_len=task.max_tgt_len)

    @classmethod
    def from_file(cls, path, level, seed=0, log=print):
        pairs, skipped = load_pairs(path, level)
        if skipped:
            log(f"{path}: skipped {skipped} empty line(s)")
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_valid = len(pairs) // 20 if len(pairs) >= 40 else 0  # hold out 5% for validation when there is enough
        valid = [pairs[i] for i in order[:n_valid]] or pairs[: min(len(pairs), 200)]
        train = [pairs[i] for i in order[n_valid:]]
        sv = TokenVocab.build(s for s, _ in pairs)
        tv = TokenVocab.build(t for _, t in pairs)
        return cls(pairs=train, level=level, valid=valid, src_vocab=sv, tgt_vocab=tv,
                   max_src_len=max(len(s) for s, _ in pairs), max_tgt_len=max(len(t) for _, t in pairs))

    def batches(self, rng, batch_size, bucket=20):
        """Endless batches of ids; ``bucket`` batches at a time are sorted by source length."""
        stream = self.task.train_stream(rng) if self.task else None
        while True:
            if stream is not None:
                chunk = [(list(s), list(t)) for s, t in (next(stream) for _ in range(batch_size * bucket))]
                chunks = [chunk]
            else:
                order = rng.permutation(len(self.pairs))
                chunks = [[self.pairs[i] for i in order[k : k + batch_size * bucket]]
                          for k in range(0, len(order), batch_size * bucket)]
            for chunk in chunks:
                chunk.sort(key=lambda p: (len(p[0]), len(p[1])))
                groups = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
                for g in (groups[i] for i in rng.permutation(len(groups))):
                    yield make_batch([self.src_vocab.encode(s) for s, _ in g], [self.tgt_vocab.encode(t) for _, t in g])


def decode_max_len(max_tgt_len):
    return int(max_tgt_len * 1.5) + 2


# ============================================================================ evaluation
def translate_batch(model, src_vocab, srcs, max_len, beam=1, alpha=0.0, return_attention=False, batch_size=256):
    """Token lists in, DecodeResult fields out (lists), batched by similar length."""
    order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))
    outs, logps, atts = [None] * len(srcs), np.zeros(len(srcs)), [None] * len(srcs)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        b = make_batch([src_vocab.encode(srcs[i]) for i in idx])
        r = model.translate(b.src, b.src_len, max_len, beam, alpha, return_attention)
        for j, i in enumerate(idx):
            outs[i], logps[i] = r.tokens[j], r.logprob[j]
            if r.attention is not None:
                atts[i] = r.attention[j]
    return outs, logps, atts


def evaluate(model, data: SeqData, pairs, beam=1, alpha=0.0, bleu=False):
    """Exact match and token accuracy (position-wise, over reference tokens) of decoded outputs."""
    srcs = [s for s, _ in pairs]
    outs, logps, _ = translate_batch(model, data.src_vocab, srcs, decode_max_len(data.max_tgt_len), beam, alpha)
    exact = correct = total = 0
    hyps, refs = [], []
    for (_, ref), ids in zip(pairs, outs):
        hyp = data.tgt_vocab.decode(ids)
        exact += hyp == list(ref)
        correct += sum(a == b for a, b in zip(hyp, ref))
        total += len(ref)
        hyps.append(detokenize(hyp, data.level))
        refs.append(detokenize(ref, data.level))
    res = {"n": len(pairs), "exact_match": exact / len(pairs), "token_accuracy": correct / max(total, 1),
           "mean_logprob": float(np.mean(logps))}
    if bleu:
        try:
            import sacrebleu
        except ImportError:
            res["bleu"] = None
            res["bleu_note"] = "install sacrebleu (pip install 'bptt[bleu]') for BLEU"
        else:
            tok = "char" if data.level == "char" else "13a"
            res["bleu"] = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tok).score
    return res, outs, logps


# ============================================================================ checkpoints
def _meta(model, data, args, step, rng, opt_meta, sched_cfg, extra=None):
    return {
        "kind": KIND,
        "config": model.config.to_json(),
        "src_vocab": data.src_vocab.to_json(),
        "tgt_vocab": data.tgt_vocab.to_json(),
        "task": data.task.name if data.task else None,
        "data": None if data.task else str(args.data),
        "level": data.level,
        "max_src_len": data.max_src_len,
        "max_tgt_len": data.max_tgt_len,
        "step": step,
        "optimizer": opt_meta,
        "schedule": sched_cfg,
        "train": {k: getattr(args, k) for k in ("batch_size", "lr", "clip", "teacher_forcing", "seed", "optimizer")},
        "rng": rng_state(rng),
        **(extra or {}),
    }


def load_model(path):
    """(model, meta, SeqData without training pairs) from a checkpoint."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path} is a {meta.get('kind')!r} checkpoint; expected a seq2seq checkpoint")
    model = Seq2Seq(Seq2SeqConfig.from_json(meta["config"]))
    model.load_state_dict(tensors.get("model", {}))
    model.eval()
    data = SeqData(level=meta["level"], src_vocab=TokenVocab.from_json(meta["src_vocab"]),
                   tgt_vocab=TokenVocab.from_json(meta["tgt_vocab"]),
                   max_src_len=meta["max_src_len"], max_tgt_len=meta["max_tgt_len"])
    if meta.get("task"):
        data.task = get_task(meta["task"])
    return model, meta, data


# ============================================================================ train
def cmd_train(args) -> int:
    out = Path(args.out)
    ckpt = out / CKPT_NAME
    if args.task is None and args.data is None:
        raise DataError("give --task (dates, addition, reverse) or --data FILE.tsv")
    if args.task is not None and args.data is not None:
        raise DataError("give either --task or --data, not both")
    if not 0.0 <= args.teacher_forcing <= 1.0:
        raise DataError(f"--teacher-forcing must be in [0, 1], got {args.teacher_forcing}")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    data = SeqData.from_task(args.task) if args.task else SeqData.from_file(args.data, args.level, args.seed, log)

    step = 0
    if args.resume:
        if not ckpt.exists():
            raise DataError(f"--resume: no checkpoint at {ckpt}")
        tensors, meta = load_checkpoint(ckpt)
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{ckpt} is not a seq2seq checkpoint")
        if TokenVocab.from_json(meta["src_vocab"]) != data.src_vocab or TokenVocab.from_json(meta["tgt_vocab"]) != data.tgt_vocab:
            raise DataError(f"--resume: the data's vocabularies differ from the checkpoint's ({ckpt})")
        config = Seq2SeqConfig.from_json(meta["config"])
        step = int(meta["step"])
        rng = restore_rng(meta["rng"])
    else:
        config = Seq2SeqConfig(
            src_vocab=len(data.src_vocab), tgt_vocab=len(data.tgt_vocab), embedding=args.embedding,
            hidden=args.hidden, layers=args.layers, cell=args.cell, bidirectional=args.bidirectional,
            attention=args.attention, dropout=args.dropout,
        )
        rng = np.random.default_rng(args.seed)
    model = Seq2Seq(config, rng=np.random.default_rng(args.seed))
    opt = make_optimizer(args.optimizer, model, args.lr)
    sched_kw = {"lr": args.lr} if args.schedule == "constant" else {"lr": args.lr, "total_steps": args.max_steps}
    sched = make_schedule(args.schedule, **sched_kw)
    if args.resume:
        model.load_state_dict(tensors["model"])
        opt.load_state_dict(tensors.get("optim", {}), meta["optimizer"])
    log(f"seq2seq: {model.num_parameters():,} parameters, {model!r}")

    def save(extra=None):
        arrays, ometa = opt.state_dict()
        save_checkpoint(ckpt, {"model": model.state_dict(), "optim": arrays},
                        _meta(model, data, args, step, rng, ometa, sched.config(), extra))

    valid = data.valid[: args.eval_size] if args.eval_size else data.valid
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.max_time * 60 if args.max_time else math.inf
    batches = data.batches(rng, args.batch_size)
    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, initial=step, disable=args.quiet or None, desc="train", unit="step")
    losses, last = [], {}
    model.train()
    while step < args.max_steps and time.monotonic() < deadline:
        batch = next(batches)
        opt.zero_grad()
        loss = train_step(model, batch, args.teacher_forcing, rng)
        norm = clip_grad_norm(model, args.clip) if args.clip > 0 else None
        opt.lr = sched(step)
        opt.step()
        step += 1
        losses.append(loss)
        bar.update(1)
        if step % args.eval_every == 0 or step == args.max_steps:
            model.eval()
            res, _, _ = evaluate(model, data, valid)
            model.train()
            last = {"step": step, "loss": float(np.mean(losses)), "exact_match": res["exact_match"],
                    "token_accuracy": res["token_accuracy"], "lr": opt.lr,
                    "grad_norm": None if norm is None else float(norm),
                    "elapsed_s": round(time.monotonic() - start, 1)}
            losses = []
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", em=f"{last['exact_match']:.3f}")
            save()
    bar.close()
    if not last or last["step"] != step:  # stopped by --max-time between evaluations
        model.eval()
        res, _, _ = evaluate(model, data, valid)
        last = {"step": step, "loss": float(np.mean(losses)) if losses else None, "exact_match": res["exact_match"],
                "token_accuracy": res["token_accuracy"], "lr": opt.lr, "elapsed_s": round(time.monotonic() - start, 1)}
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(last) + "\n")
        save()
    print(json.dumps({"checkpoint": str(ckpt), **last}))
    return 0


# ============================================================================ translate
def _encode_input(text, data: SeqData):
    toks = tokenize(text, data.level)
    if not toks:
        raise DataError("empty input; expected some text to translate")
    bad = data.src_vocab.unknown(toks)
    if bad:
        shown = ", ".join(repr(t) for t in bad[:10])
        raise DataError(f"input has {len(bad)} token(s) outside the model's vocabulary: {shown}")
    if len(toks) > data.max_src_len:
        raise DataError(f"input is {len(toks)} tokens long; the model's maximum input length is {data.max_src_len}")
    return toks


def cmd_translate(args) -> int:
    model, meta, data = load_model(args.checkpoint)
    texts = [args.text]
    toks = [_encode_input(t, data) for t in texts]
    outs, logps, atts = translate_batch(model, data.src_vocab, toks, decode_max_len(data.max_tgt_len),
                                        args.beam, args.alpha, return_attention=bool(args.attention_png))
    for ids in outs:
        print(detokenize(data.tgt_vocab.decode(ids), data.level))
    if args.attention_png:
        if atts[0] is None:
            raise DataError("--attention-png needs a model trained with attention (this one has --attention none)")
        out_toks = data.tgt_vocab.decode(outs[0]) + ["</s>"]
        save_attention_png(atts[0], toks[0], out_toks[: atts[0].shape[0]], args.attention_png)
    return 0


def save_attention_png(weights, src_tokens, out_tokens, path):
    """Heatmap of the attention weights: source tokens on x, output tokens on y."""
    from bptt.viz import pyplot

    plt = pyplot()
    T, S = weights.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.32 * S + 1.5), max(3, 0.32 * T + 1.2)))
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(S), [repr(t)[1:-1] if t != " " else "␣" for t in src_tokens])
    ax.set_yticks(range(T), out_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ eval
def cmd_eval(args) -> int:
    model, meta, data = load_model(args.checkpoint)
    if args.data:
        pairs, skipped = load_pairs(args.data, data.level)
        for s, _ in pairs:
            _encode_input(detokenize(s, data.level), data)  # unknown tokens / too long: a clear error
        bleu = True
    elif data.task is not None:
        pairs = [(list(s), list(t)) for s, t in data.task.test_set()]
        skipped, bleu = 0, False
    else:
        raise DataError("this checkpoint was trained on --data; give --data FILE.tsv to evaluate on")
    t0 = time.monotonic()
    res, outs, _ = evaluate(model, data, pairs, args.beam, args.alpha, bleu=bleu)
    res.update({"beam": args.beam, "alpha": args.alpha, "set": args.data or f"{data.task.name} held-out",
                "skipped_empty_lines": skipped, "seconds": round(time.monotonic() - t0, 2)})
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['set']}: {res['n']} pairs, beam {args.beam}")
        print(f"exact match     {100 * res['exact_match']:.2f}%")
        print(f"token accuracy  {100 * res['token_accuracy']:.2f}%")
        if "bleu" in res:
            print(f"BLEU            {res['bleu']:.2f}" if res["bleu"] is not None else res["bleu_note"])
    return 0


# ============================================================================ argparse
def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("seq2seq", help="encoder-decoder with attention: train, translate, eval")
    sub = p.add_subparsers(dest="seq2seq_command", metavar="{train,translate,eval}", required=True)

    t = sub.add_parser("train", help="train on a built-in task or a TSV file of pairs")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--task", choices=sorted(TASKS), help="built-in task, generated on the fly")
    src.add_argument("--data", help="TSV file, one 'source<TAB>target' pair per line")
    t.add_argument("--level", choices=("char", "word"), default="char", help="tokens of --data (default char)")
    t.add_argument("--attention", choices=("none", "dot", "general", "additive"), default="general")
    t.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    t.add_argument("--hidden", type=int, default=128, help="decoder hidden size (encoder: half per direction if bidirectional)")
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--bidirectional", action="store_true", help="bidirectional encoder")
    t.add_argument("--embedding", type=int, default=32)
    t.add_argument("--dropout", type=float, default=0.0, help="between stacked recurrent layers")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", default="adam")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine decays to 0 at --max-steps")
    t.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping (0: off)")
    t.add_argument("--max-steps", type=int, default=10000)
    t.add_argument("--max-time", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--eval-size", type=int, default=500, help="held-out pairs scored at each evaluation (0: all)")
    t.add_argument("--out", default="runs/seq2seq")
    t.add_argument("--resume", action="store_true", help=f"continue from OUT/{CKPT_NAME}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--teacher-forcing", type=float, default=1.0,
                   help="probability of feeding the gold previous token (<1: two-pass scheduled sampling)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    for name, helptext in (("translate", "decode one input"), ("eval", "score a held-out set")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("checkpoint")
        if name == "translate":
            q.add_argument("text")
            q.add_argument("--attention-png", help="save the attention heatmap here")
            q.set_defaults(func=cmd_translate)
        else:
            q.add_argument("--data", help="TSV file of pairs (default: the task's held-out set)")
            q.add_argument("--json", action="store_true")
            q.set_defaults(func=cmd_eval)
        q.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
        q.add_argument("--alpha", type=float, default=0.0, help="length normalisation ((5+|y|)/6)^alpha (0: off)")
    return p


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m bptt.seq2seq.app seq2seq ...``) until bptt.cli wires it."""
    parser = argparse.ArgumentParser(prog="bptt")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
