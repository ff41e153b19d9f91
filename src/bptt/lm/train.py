"""Training a character language model, readable top to bottom.

    corpus → vocabulary → ids → train/val/test split → TBPTT windows (T, N)
    for each step:  lr_at(step) · forward · loss · backward · clip · optimizer step
                    · log · every --eval-every: validation loss, sample, checkpoint, plot

Shape legend: T = seq_len time steps per window, N = batch_size parallel streams, V vocabulary.

The run directory (``--out``) holds ``last.safetensors`` and ``best.safetensors``
(each one file, replaced atomically, with a ``.json`` twin for people),
``log.jsonl`` (one line per logged step) and ``loss.png``.  A checkpoint holds
the weights, the optimizer state, the carried hidden state, the RNG state and
the position in the data, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from bptt import checkpoint as ckpt
from bptt.lm.data import (
    DataError,
    TBPTTBatches,
    Vocab,
    default_corpus,
    encode_file,
    encode_text,
    show_chars,
    split_corpus,
)
from bptt.inspect.analyses import hidden_stats
from bptt.nn.losses import cross_entropy
from bptt.lm.model import CharLM, CharLMConfig
from bptt.nn.optim import clip_grad_norm, clip_grad_value, make_optimizer, make_schedule

__all__ = ["TrainConfig", "TrainingError", "train", "evaluate", "evaluate_text", "load_model"]

CHECKPOINT_KIND = "charlm"


class TrainingError(ValueError):
    """Training stopped for a reason the user must hear about (NaN loss, explosion)."""


@dataclass
class TrainConfig:
    """Every option of ``bptt train`` (the CLI flags are generated from these fields)."""

    data: str | None = field(default=None, metadata={"help": "text file to train on (default: the Python standard library's source)"})
    encoding: str = field(default="utf-8", metadata={"help": "text encoding of --data"})
    out: str = field(default="runs/charlm", metadata={"help": "run directory for checkpoints, log and plot"})
    # model
    model: str = field(default="lstm", metadata={"help": "recurrent cell", "choices": ["lstm", "gru", "rnn"]})
    hidden: int = field(default=128, metadata={"help": "hidden units per layer"})
    layers: int = field(default=2, metadata={"help": "stacked recurrent layers"})
    dropout: float = field(default=0.0, metadata={"help": "dropout between layers and before the decoder"})
    embedding: int = field(default=0, metadata={"help": "embedding size; 0 = one-hot input"})
    init: str = field(default="torch", metadata={"help": "weight init: torch U(±1/√H) or charrnn U(±0.08)", "choices": ["torch", "charrnn"]})
    forget_bias: float = field(default=0.0, metadata={"help": "added to the LSTM forget-gate bias at init"})
    dtype: str = field(default="float32", metadata={"help": "float type", "choices": ["float32", "float64"]})
    # data layout
    seq_len: int = field(default=50, metadata={"help": "time steps per window (truncated BPTT length)"})
    batch_size: int = field(default=50, metadata={"help": "parallel streams per batch"})
    val_frac: float = field(default=0.1, metadata={"help": "fraction of the text held out for validation (the end of it)"})
    test_frac: float = field(default=0.0, metadata={"help": "fraction held out for test (after validation)"})
    # optimisation
    optimizer: str = field(default="rmsprop", metadata={"help": "optimizer", "choices": ["sgd", "adagrad", "rmsprop", "adam", "adamw"]})
    lr: float = field(default=2e-3, metadata={"help": "learning rate"})
    momentum: float = field(default=0.0, metadata={"help": "momentum (sgd, rmsprop)"})
    alpha: float = field(default=0.95, metadata={"help": "RMSprop smoothing constant (char-rnn's decay_rate)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    schedule: str = field(default="charrnn", metadata={"help": "learning-rate schedule", "choices": ["constant", "step", "charrnn", "cosine"]})
    lr_decay: float = field(default=0.97, metadata={"help": "charrnn/step: factor per decay"})
    lr_decay_after: int = field(default=10, metadata={"help": "charrnn: epochs before the decay starts; step: epochs per decay"})
    warmup_iters: int = field(default=0, metadata={"help": "cosine: linear warm-up steps"})
    min_lr: float = field(default=0.0, metadata={"help": "cosine: final learning rate"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient clip threshold (0 = off)"})
    clip_mode: str = field(default="value", metadata={"help": "clip by global norm or element-wise value (char-rnn: value)", "choices": ["norm", "value"]})
    # length of the run
    max_epochs: float = field(default=50.0, metadata={"help": "stop after this many passes over the training text"})
    max_iters: int = field(default=0, metadata={"help": "stop after this many steps (0 = no limit)"})
    max_time: float = field(default=0.0, metadata={"help": "stop after this many minutes (0 = no limit)"})
    eval_every: int = field(default=1000, metadata={"help": "steps between validation, sample and checkpoint"})
    eval_windows: int = field(default=0, metadata={"help": "validation windows per evaluation (0 = the whole split)"})
    sample_length: int = field(default=200, metadata={"help": "characters of the sample shown at each evaluation (0 = none)"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    log_hidden_stats: int = field(default=0, metadata={"help": "every K steps, log the mean and variance of h per layer (0 = off)"})
    seed: int = field(default=123, metadata={"help": "random seed (init, dropout)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from last.safetensors"})
    init_from: str | None = field(default=None, metadata={"help": "start from the weights of this checkpoint (new optimizer)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def model_config(self, vocab_size: int) -> CharLMConfig:
        return CharLMConfig(vocab_size, self.model, self.hidden, self.layers, self.dropout, self.embedding,
                            self.init, self.forget_bias, self.dtype).validate()

    def validate(self) -> TrainConfig:
        problems = []
        for name in ("seq_len", "batch_size", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "eval_windows", "warmup_iters", "sample_length", "lr_decay_after", "log_hidden_stats"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "max_epochs", "max_time", "weight_decay", "momentum", "min_lr"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                problems.append(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            problems.append("--lr must be > 0")
        if not 0 < self.alpha < 1:
            problems.append(f"--alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.lr_decay <= 1:
            problems.append(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if problems:
            raise ValueError("; ".join(problems))
        self.model_config(1)  # model fields
        return self

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ============================================================================ data


def load_corpus(cfg: TrainConfig, out_dir: Path, vocab: Vocab | None, log):
    """The corpus as ids (memory-mapped for files) and its vocabulary."""
    if cfg.data is None:
        text, description = default_corpus()
        log(f"corpus: built-in default, {description}")
        vocab = vocab or Vocab(text)
        _check_known(vocab, text, "the built-in corpus")
        return encode_text(text, vocab), vocab
    corpus_vocab, ids = encode_file(cfg.data, out_dir / "corpus.npy", encoding=cfg.encoding)
    log(f"corpus: {cfg.data}, {len(ids):,} characters, {len(corpus_vocab)} distinct")
    if vocab is None:
        return ids, corpus_vocab
    if corpus_vocab.chars == vocab.chars:
        return ids, vocab
    missing = [c for c in corpus_vocab.chars if c not in set(vocab.chars)]
    if missing:
        raise DataError(f"{cfg.data} has characters the checkpoint's vocabulary lacks: {show_chars(missing)}")
    remap = vocab.encode("".join(corpus_vocab.chars)).astype(vocab.dtype)
    return remap[np.asarray(ids)], vocab  # same characters, different ids: translate (in memory)


def _check_known(vocab: Vocab, text: str, what: str):
    unknown = vocab.unknown(text)
    if unknown:
        raise DataError(f"{what} has characters outside the model's vocabulary: {show_chars(unknown)}")


# ============================================================================ evaluation


def evaluate(model: CharLM, batches: TBPTTBatches, max_windows: int = 0) -> float:
    """Mean loss in nats/char over the windows of ``batches``, the state carried across them."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    n = len(batches) if not max_windows else min(max_windows, len(batches))
    for k in range(n):
        x, y = batches.batch(k)
        with model.blas_scope(*x.shape):
            logits, state = model.forward(x, state)
            loss, _ = cross_entropy(logits, y, reduction="sum", need_grad=False)
        total += loss
        count += y.size
    model.train(was_training)
    return total / max(count, 1)


def evaluate_text(model: CharLM, vocab: Vocab, text: str, window: int = 100, streams: int = 32) -> dict:
    """Loss of ``model`` on ``text``: nats/char, bits/char, perplexity.

    Characters outside the vocabulary are left out of the text and reported
    (count and which).  The text is cut into up to ``streams`` contiguous
    streams read in parallel, each in windows of ``window`` steps with the state
    carried; every character but the first of each stream is predicted from
    all that precedes it in its stream.  The last stream is padded and the
    padding masked out of the loss, so no character is skipped.
    """
    unknown = vocab.unknown(text)
    unknown_count = 0
    if unknown:
        bad = set(unknown)
        unknown_count = sum(1 for ch in text if ch in bad)
        text = "".join(ch for ch in text if ch not in bad)
    ids = vocab.encode(text).astype(np.int64)
    if len(ids) < 2:
        raise DataError(f"need at least 2 known characters to evaluate, got {len(ids)}")
    x, y = ids[:-1], ids[1:]
    N = max(1, min(streams, len(x) // (4 * window)))
    S = -(-len(x) // N)  # ceil: stream length
    pad = N * S - len(x)
    valid = np.concatenate([np.ones(len(x), bool), np.zeros(pad, bool)]).reshape(N, S).T  # (S, N)
    x = np.concatenate([x, np.zeros(pad, np.int64)]).reshape(N, S).T
    y = np.concatenate([y, np.zeros(pad, np.int64)]).reshape(N, S).T
    model.eval()
    state, total = None, 0.0
    for t0 in range(0, S, window):
        with model.blas_scope(*x[t0 : t0 + window].shape):
            logits, state = model.forward(x[t0 : t0 + window], state)
            loss, _ = cross_entropy(logits, y[t0 : t0 + window], mask=valid[t0 : t0 + window], reduction="sum",
                                    need_grad=False)
        total += loss
    nats = total / len(ids[1:])
    return {"loss": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(nats),
            "characters": int(len(ids) - 1), "unknown_count": unknown_count, "unknown_chars": unknown}


def _load_charlm_checkpoint(path):
    """(tensors, meta) of a checkpoint, which must have been written by ``bptt train``."""
    tensors, meta = ckpt.load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ckpt.CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not a character language model")
    return tensors, meta


def load_model(path, dtype: str | None = None):
    """(model, vocab, meta) from a checkpoint written by ``bptt train``."""
    tensors, meta = _load_charlm_checkpoint(path)
    try:
        config = CharLMConfig.from_dict(meta["model_config"])
        if dtype:
            config.dtype = dtype
        vocab = Vocab.from_json(meta["vocab"])
        model = CharLM(config, rng=0)
        model.load_state_dict(tensors.get("model", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: checkpoint contents do not fit a CharLM ({e})") from None
    model.eval()
    return model, vocab, meta


# ============================================================================ the loop


class _Run:
    """The mutable state of a run: everything a checkpoint must hold to resume exactly."""

    def __init__(self, model, optimizer, vocab, cfg, iteration=0, best_val=math.inf, state=None):
        self.model, self.optimizer, self.vocab, self.cfg = model, optimizer, vocab, cfg
        self.iteration, self.best_val, self.state = iteration, best_val, state
        self.first_loss = None
        self.last_plot = -math.inf  # time.time() of the last loss.png
        self.saved_at: dict[Path, int] = {}  # checkpoint path -> the iteration it holds, once written

    def save(self, path: Path, val_loss=None):
        arrays, opt_meta = self.optimizer.state_dict()
        tensors = {"model": self.model.state_dict(), "optim": arrays}
        if self.state is not None:
            h, c = self.state if isinstance(self.state, tuple) else (self.state, None)
            tensors["state"] = {"h": h} if c is None else {"h": h, "c": c}
        meta = {
            "kind": CHECKPOINT_KIND,
            "model_config": self.model.config.to_dict(),
            "train_config": asdict(self.cfg),
            "vocab": self.vocab.to_json(),
            "iteration": self.iteration,
            "best_val": None if not math.isfinite(self.best_val) else self.best_val,
            "val_loss": val_loss,
            "first_loss": self.first_loss,
            "optimizer": opt_meta,
            "rng": ckpt.rng_state(self.model.rng),
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        ckpt.save_checkpoint(path, tensors, meta)
        self.saved_at[path] = self.iteration


def _make_schedule(cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    if cfg.schedule == "charrnn":
        return make_schedule("charrnn", lr=cfg.lr, steps_per_epoch=steps_per_epoch,
                             decay_after_epochs=cfg.lr_decay_after, decay_rate=cfg.lr_decay)
    if cfg.schedule == "step":
        return make_schedule("step", lr=cfg.lr, step_size=max(1, cfg.lr_decay_after) * steps_per_epoch, gamma=cfg.lr_decay)
    if cfg.schedule == "cosine":
        return make_schedule("cosine", lr=cfg.lr, total_steps=max(total_steps, cfg.warmup_iters, 1),
                             warmup_steps=cfg.warmup_iters, min_lr=cfg.min_lr)
    return make_schedule("constant", lr=cfg.lr)


def _make_optimizer(cfg: TrainConfig, model):
    kw = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = cfg.momentum
    if cfg.optimizer == "rmsprop":
        kw["alpha"] = cfg.alpha
    return make_optimizer(cfg.optimizer, model, cfg.lr, **kw)


def _check_out_dir(out_dir: Path):
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None


# what the saved weights and optimizer state were made with
_FIXED_ON_RESUME = ("model", "hidden", "layers", "embedding", "dtype", "optimizer")


def train(cfg: TrainConfig, log=None, explicit: set[str] | None = None) -> dict:
    """Train (or resume) a character language model; returns a summary dict.

    ``explicit`` names the options the user set on the command line: on
    ``--resume`` the saved configuration is used except for those (so a run can
    be extended with a larger ``--max-iters``).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg.validate()
    out_dir = Path(cfg.out)
    _check_out_dir(out_dir)
    last_path, best_path = out_dir / "last.safetensors", out_dir / "best.safetensors"

    # ---------------------------------------------------------------- model, vocab, optimizer
    resume_from = None
    if cfg.resume:
        if not last_path.exists():
            raise DataError(f"--resume: no checkpoint to resume in {out_dir} (expected {last_path.name})")
        tensors, meta = _load_charlm_checkpoint(last_path)
        saved = TrainConfig.from_dict(meta["train_config"])
        fixed = [n for n in _FIXED_ON_RESUME if n in (explicit or ()) and getattr(cfg, n) != getattr(saved, n)]
        if fixed:
            changes = ", ".join(f"--{n.replace('_', '-')} {getattr(saved, n)} -> {getattr(cfg, n)}" for n in fixed)
            raise DataError(f"--resume cannot change {changes}; use --init-from to start a new run from these weights")
        for name in explicit or ():
            setattr(saved, name, getattr(cfg, name))
        saved.resume, cfg = True, saved.validate()
        resume_from = (tensors, meta)
        vocab = Vocab.from_json(meta["vocab"])
    elif cfg.init_from:
        init_model, vocab, _ = load_model(cfg.init_from)
    else:
        vocab = None

    ids, vocab = load_corpus(cfg, out_dir, vocab, log)
    train_ids, val_ids, test_ids = split_corpus(ids, cfg.val_frac, cfg.test_frac)
    batches = TBPTTBatches(train_ids, cfg.batch_size, cfg.seq_len)
    val_batches = None
    if cfg.val_frac > 0:
        try:
            val_batches = TBPTTBatches(val_ids, cfg.batch_size, cfg.seq_len)
        except DataError as e:
            raise DataError(f"validation split ({len(val_ids)} characters) is too short: {e}") from None

    model = CharLM(cfg.model_config(len(vocab)), rng=cfg.seed)
    if cfg.init_from and not cfg.resume:
        if init_model.config.to_dict() | {"dtype": cfg.dtype} != model.config.to_dict():
            log(f"--init-from: using the checkpoint's architecture {init_model.config.to_dict()}")
            model = CharLM(CharLMConfig.from_dict(init_model.config.to_dict() | {"dtype": cfg.dtype}), rng=cfg.seed)
        model.load_state_dict(init_model.state_dict())
    optimizer = _make_optimizer(cfg, model)
    steps_per_epoch = len(batches)
    max_iters = int(cfg.max_epochs * steps_per_epoch)
    if cfg.max_iters:
        max_iters = min(max_iters, cfg.max_iters) if cfg.max_epochs else cfg.max_iters
    schedule = _make_schedule(cfg, steps_per_epoch, max_iters)
    run = _Run(model, optimizer, vocab, cfg)

    if resume_from is not None:
        tensors, meta = resume_from
        model.load_state_dict(tensors["model"])
        optimizer.load_state_dict(tensors.get("optim", {}), meta["optimizer"])
        model.rng.bit_generator.state = ckpt.restore_rng(meta["rng"]).bit_generator.state
        run.iteration = int(meta["iteration"])
        run.best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
        run.first_loss = meta.get("first_loss")
        st = tensors.get("state")
        if st:
            run.state = (st["h"], st["c"]) if "c" in st else st["h"]
        log(f"resuming {last_path} at step {run.iteration}")

    log(f"model: {model!r}, {model.num_parameters():,} parameters; {steps_per_epoch} steps per epoch "
        f"(T={cfg.seq_len}, N={cfg.batch_size}); train {len(train_ids):,} / val {len(val_ids):,} characters")

    # ---------------------------------------------------------------- loop
    log_file = open(out_dir / "log.jsonl", "a", encoding="utf-8")
    start_time = time.time()
    deadline = start_time + cfg.max_time * 60 if cfg.max_time else math.inf
    bar = _progress(cfg, run.iteration, max_iters)
    stop_reason = "finished"
    window_loss, window_chars, window_start = 0.0, 0, time.time()
    model.train()

    def evaluate_and_save():
        _evaluate_and_save(run, val_batches, last_path, best_path, log_file, out_dir, log, bar, start_time,
                           steps_per_epoch)

    try:
        while run.iteration < max_iters:
            if time.time() >= deadline:
                stop_reason = "time limit"
                if run.iteration % cfg.eval_every:  # steps since the last evaluation: evaluate them too, so
                    # that a run shorter than --eval-every still leaves best.safetensors and a sample
                    evaluate_and_save()
                break
            it = run.iteration
            k = it % steps_per_epoch
            if k == 0:
                run.state = None  # streams restart at the beginning of the text
            x, y = batches.batch(k)
            optimizer.lr = schedule(it)

            with model.blas_scope(*x.shape):
                loss, new_state = model.loss(x, y, run.state)
                stats = None
                if cfg.log_hidden_stats and (run.iteration + 1) % cfg.log_hidden_stats == 0:
                    stats = hidden_stats(model)  # mean and variance of h per layer, from this forward's cache
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at step {it}; stopping (the last checkpoint is kept)")
                if run.first_loss is None:
                    run.first_loss = loss
                elif loss > 3 * run.first_loss:
                    raise TrainingError(f"loss is exploding ({loss:.3f} > 3 x the first loss {run.first_loss:.3f}) "
                                        f"at step {it}; stopping (the last checkpoint is kept). Try a lower --lr")
                model.zero_grad()
                model.backward()
                if cfg.grad_clip:
                    if cfg.clip_mode == "norm":
                        clip_grad_norm(model, cfg.grad_clip)
                    else:
                        clip_grad_value(model, cfg.grad_clip)
                optimizer.step()
            run.state = new_state
            run.iteration += 1
            if stats is not None:
                log_file.write(json.dumps({"iter": run.iteration, **stats}) + "\n")

            window_loss += loss
            window_chars += y.size
            if run.iteration % cfg.log_every == 0 or run.iteration == max_iters:
                elapsed = time.time() - window_start
                n_steps = window_chars // y.size
                record = {"iter": run.iteration, "epoch": run.iteration / steps_per_epoch,
                          "train_loss": window_loss / n_steps, "lr": optimizer.lr,
                          "chars_per_sec": window_chars / max(elapsed, 1e-9), "time": time.time() - start_time}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", cps=f"{record['chars_per_sec']:,.0f}")
                window_loss, window_chars, window_start = 0.0, 0, time.time()
            if bar is not None:
                bar.update(1)
            if run.iteration % cfg.eval_every == 0 or run.iteration == max_iters:
                evaluate_and_save()
                window_start = time.time()  # characters per second count training time only
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        if bar is not None:
            bar.close()
        log_file.close()
        _plot(run, out_dir, force=True)
    if stop_reason != "finished":
        if run.saved_at.get(last_path) != run.iteration:  # not already written by the evaluation at this step
            run.save(last_path)  # every step above is complete, so this state resumes exactly
        log(f"{stop_reason}: saved {last_path} at step {run.iteration}")
    best = None if not math.isfinite(run.best_val) else run.best_val
    summary = {"iterations": run.iteration, "best_val_loss": best, "stop_reason": stop_reason,
               "minutes": (time.time() - start_time) / 60, "out": str(out_dir)}
    if best is not None:
        log(f"best validation loss {best:.4f} nats/char ({best / math.log(2):.4f} bits/char); checkpoints in {out_dir}")
    if stop_reason == "interrupted":
        raise KeyboardInterrupt
    return summary


def _progress(cfg, start, total):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.05)


def _evaluate_and_save(run, val_batches, last_path, best_path, log_file, out_dir, log, bar, start_time, steps_per_epoch):
    model, cfg = run.model, run.cfg
    val = evaluate(model, val_batches, cfg.eval_windows) if val_batches is not None else None
    if val is not None and not math.isfinite(val):
        raise TrainingError(f"validation loss is {val} at step {run.iteration}; stopping (the last checkpoint is kept)")
    record = {"iter": run.iteration, "epoch": run.iteration / steps_per_epoch, "time": time.time() - start_time}
    if val is not None:
        record |= {"val_loss": val, "val_bpc": val / math.log(2)}
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    improved = val is not None and val < run.best_val
    if improved:
        run.best_val = val
        run.save(best_path, val)
    run.save(last_path, val)
    msg = f"step {run.iteration}: "
    if val is not None:
        msg += f"val loss {val:.4f} nats/char ({val / math.log(2):.3f} bits/char)" + (" (best)" if improved else "")
    _print(bar, log, msg)
    if cfg.sample_length:
        from bptt.lm.sample import generate

        text = generate(model, run.vocab, cfg.sample_length, temperature=0.8, rng=np.random.default_rng(run.iteration))
        _print(bar, log, "sample: " + text.replace("\n", "\n        "))
    _plot(run, out_dir)


# Redrawing loss.png costs 0.2 s (0.9 s the first time, importing matplotlib) and grows
# with the log; with frequent evaluations it adds up, so it is redrawn at most this often,
# and at the end.
PLOT_EVERY_SECONDS = 30.0


def _plot(run, out_dir, force=False):
    if not force and time.time() - run.last_plot < PLOT_EVERY_SECONDS:
        return
    from bptt.viz import plot_training_log

    plot_training_log(out_dir / "log.jsonl", out_dir / "loss.png")
    run.last_plot = time.time()


def _print(bar, log, msg):
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        log(msg)
