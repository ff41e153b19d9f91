"""``bptt seq2seq train | translate | eval``: the command line of :mod:`bptt.seq2seq`.

User mistakes raise :class:`bptt.errors.DataError` (a ValueError) with a one-line message, which
:func:`bptt.cli.main` prints as ``bptt: error: ...`` with exit status 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bptt.checkpoint import checkpoints_in
from bptt.cli.options import add_dataclass_options
from bptt.lm.data import DataError
from bptt.seq2seq.data import SeqData
from bptt.seq2seq.decode import decode_max_len, evaluate, translate_batch
from bptt.seq2seq.tasks import detokenize, load_pairs, tokenize
from bptt.seq2seq.train import Seq2SeqTrainConfig, load_model, train
from bptt.viz import plot_attention, plot_attention_heads

__all__ = ["register", "cmd_train", "cmd_translate", "cmd_eval"]


def cmd_train(args) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "seq2seq_command", "func", "no_verify")}
    cfg = Seq2SeqTrainConfig(**given)
    summary = train(cfg)
    from bptt.dist import current_world

    if current_world().is_main:  # under mpiexec: once
        print(json.dumps({"checkpoint": str(Path(cfg.out) / "model.safetensors"), **(summary["eval"] or {})}))
    return 0


def load_any_model(path):
    """(model, meta, SeqData) from a checkpoint of bptt seq2seq train, or from the folder its ONNX export wrote
    (encoder.onnx + decoder_step.onnx, decoded in ONNX Runtime with the same greedy and beam search)."""
    from bptt.seq2seq.tasks import TokenVocab, get_task

    if Path(path).is_dir():
        from bptt.onnx.seq2seq import OnnxSeq2Seq

        checkpoints = checkpoints_in(path)
        if checkpoints and not (Path(path) / "encoder.onnx").exists():  # a training run's folder, not an export
            raise DataError(f"{path} is a folder with no ONNX export in it (no encoder.onnx); give a checkpoint "
                            f"file instead: {checkpoints}")

        model = OnnxSeq2Seq(path)
        meta = model.meta
        try:
            data = SeqData(level=meta["level"], src_vocab=TokenVocab.from_json(meta["src_vocab"]),
                           tgt_vocab=TokenVocab.from_json(meta["tgt_vocab"]),
                           max_src_len=meta["max_src_len"], max_tgt_len=meta["max_tgt_len"])
        except KeyError as e:
            raise DataError(f"{path}: the ONNX files carry no {e} (export them with bptt export)") from None
        if meta.get("task"):
            data.task = get_task(meta["task"])
        return model, meta, data
    return load_model(path)


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
    model, meta, data = load_any_model(args.checkpoint)
    texts = [args.text]
    toks = [_encode_input(t, data) for t in texts]
    outs, logps, atts = translate_batch(model, data.src_vocab, toks, decode_max_len(data.max_tgt_len),
                                        args.beam, args.alpha, return_attention=bool(args.attention_png))
    for ids in outs:
        print(detokenize(data.tgt_vocab.decode(ids), data.level))
    if args.attention_png and hasattr(model, "cross_attention_heads"):  # a Transformer: one heatmap per head
        heads = model.cross_attention_heads(data.src_vocab.encode(toks[0]), outs[0])  # (h, T_out + 1, S)
        plot_attention_heads(heads, toks[0], data.tgt_vocab.decode(outs[0]) + ["</s>"], args.attention_png)
    elif args.attention_png:
        if atts[0] is None:
            raise DataError("--attention-png needs a model trained with attention (this one has --attention none)")
        out_toks = data.tgt_vocab.decode(outs[0]) + ["</s>"]
        plot_attention(atts[0], toks[0], out_toks[: atts[0].shape[0]], args.attention_png)
    return 0


def cmd_eval(args) -> int:
    model, meta, data = load_any_model(args.checkpoint)
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


def register(subparsers):
    p = subparsers.add_parser("seq2seq", help="encoder-decoder with attention: train, translate, eval")
    sub = p.add_subparsers(dest="seq2seq_command", metavar="{train,translate,eval}", required=True)

    t = sub.add_parser("train", help="train on a built-in task or a TSV file of pairs")
    add_dataclass_options(t, Seq2SeqTrainConfig, suppress=False)
    t.set_defaults(func=cmd_train)

    for name, helptext in (("translate", "decode one input"), ("eval", "score a held-out set")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("checkpoint", help="model.safetensors of bptt seq2seq train, or the folder of its ONNX export")
        if name == "translate":
            q.add_argument("text")
            q.add_argument("--attention-png", help="save the attention heatmap here (transformer: the last decoder "
                                                   "layer's cross-attention, one heatmap per head)")
            q.set_defaults(func=cmd_translate)
        else:
            q.add_argument("--data", help="TSV file of pairs (default: the task's held-out set)")
            q.add_argument("--json", action="store_true", help="print machine-readable JSON")
            q.set_defaults(func=cmd_eval)
        q.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
        q.add_argument("--alpha", type=float, default=0.0, help="length normalisation ((5+|y|)/6)^alpha (0: off)")
    return p
