"""Training a language model (characters, bytes or words), readable top to bottom.

    corpus → units (vocabulary, from the training text only) → ids → train/val/test → TBPTT windows (T_k, N)
    the loop (bptt.trainer): lr_at(step) · forward · loss · backward · clip · optimizer step
                             · log · every --eval-every: validation loss, sample, checkpoint, plot

Shape legend: T = seq_len time steps per window, N = batch_size parallel streams, V vocabulary.

The run directory (``--out``) holds ``last.safetensors`` and ``best.safetensors``
(each one file, replaced atomically, with a ``.json`` twin for people),
``log.jsonl`` (one line per logged step) and ``loss.png``.  A checkpoint holds
the weights, the optimizer state, the carried hidden state, the RNG state and
the position in the data (epoch and first step of the epoch, which fix the windows of
every truncation strategy), so ``--resume`` continues exactly where the run stopped.

Units (``--unit``, :mod:`bptt.lm.units`): ``char`` (the default; a memory-mapped corpus of any
size), ``byte`` (V = 256, any file), ``word`` (``--vocab-size``, <unk>, <eos>; embeddings).
Splits: ``--val-data``/``--test-data`` files, else the last ``--val-frac``/``--test-frac`` of
``--data``; characters or words of a validation or test file that the training text lacks are
<unk>, counted and reported.  Truncation (``--truncation``, :mod:`bptt.lm.windows`): fixed
windows, AWD-LSTM's variable windows (learning rate × T_k/T), or ARTBP's randomized windows (the
carried gradient × r_j in the backward, on the reference recurrent backend).

Under ``mpiexec -n K`` the run is data parallel (:mod:`bptt.dist`) with no extra flag:
``--batch-size`` stays the global N, rank r trains streams ``shard(N)`` (its columns of every
(T, N) window, carrying their hidden state) and weighs its gradient by N_r / N, so K ranks
compute the same steps as one process (to rounding).  Checkpoints hold the state of all N
streams (gathered to rank 0) and resume with any K.  Dropout masks come from a generator per
rank: rank 0 continues the one-process stream, rank r > 0 starts from seed + r.  Rank 0 alone
owns the run directory (its lock, the fresh/resume/overwrite check) and writes to it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bptt import checkpoint as ckpt
from bptt.config import DictConfig, check_fields
from bptt.dist import current_world
from bptt.lm.data import (DataError, TBPTTBatches, Vocab, default_corpus, encode_file, encode_text, read_text, show_chars,
                          split_corpus)
from bptt.lm.evaluate import evaluate, evaluate_ids
from bptt.lm.units import UNIT_KINDS, CharUnits, make_units, map_bytes, units_from_json, lm_metrics
from bptt.kernels import single_thread_blas
from bptt.lm.windows import STRATEGIES, make_batches
from bptt.lm.model import CHECKPOINT_KIND, CharLM, CharLMConfig, build_model, config_from_dict, default_cutoffs, load_model
from bptt.lm import presets
from bptt.lm.transformer import TransformerLMConfig
from bptt.nn.optim import make_optimizer, make_schedule
from bptt.nn.batch_slices import join_streams
from bptt.rundir import claim_run_dir, discarded_on_failure, missing_dirs
from bptt.trainer import LoopConfig, StepResult, Trainer, TrainingError

__all__ = ["TrainConfig", "TrainingError", "train", "CharLMJob"]


@dataclass
class TrainConfig(DictConfig):
    """Every option of ``bptt train`` (the CLI flags are generated from these fields)."""

    data: str | None = field(default=None, metadata={"help": "text file to train on (default: the Python standard library's source)"})
    encoding: str = field(default="utf-8", metadata={"help": "text encoding of --data, --val-data, --test-data (not read for --unit byte)"})
    val_data: str | None = field(default=None, metadata={"help": "validation file (instead of --val-frac); unseen characters/words are <unk>"})
    test_data: str | None = field(default=None, metadata={"help": "test file (instead of --test-frac), evaluated once at the end with the best checkpoint"})
    unit: str = field(default="char", metadata={"help": "what the model predicts", "choices": list(UNIT_KINDS)})
    vocab_size: int | None = field(default=None, metadata={"help": "--unit word: keep the most frequent words, V including <unk> and <eos> (default: every word)"})
    truncation: str = field(default="fixed", metadata={"help": "BPTT windows: fixed, variable (AWD-LSTM) or randomized (ARTBP)", "choices": list(STRATEGIES)})
    out: str = field(default="runs/charlm", metadata={"help": "run directory for checkpoints, log and plot"})
    preset: str | None = field(default=None, metadata={"help": "a time budget, small (5 minutes) or medium (30): an LSTM recipe whose size, dropout and steps are fitted to the corpus and to this machine's speed (docs/training.md); flags you give override it"})
    # model
    model: str = field(default="lstm", metadata={"help": "recurrent cell, or a decoder-only Transformer", "choices": ["lstm", "gru", "rnn", "transformer"]})
    hidden: int = field(default=128, metadata={"help": "hidden units per layer"})
    layers: int = field(default=2, metadata={"help": "stacked recurrent layers"})
    dropout: float = field(default=0.0, metadata={"help": "dropout between layers and before the decoder"})
    embedding: int = field(default=0, metadata={"help": "embedding size; 0 = one-hot input (--unit word: 256)"})
    d_model: int = field(default=128, metadata={"help": "transformer: width of the residual stream"})
    heads: int = field(default=4, metadata={"help": "transformer: attention heads (must divide --d-model)"})
    context: int = field(default=0, metadata={"help": "transformer: the most positions it attends over (0 = --seq-len)"})
    init: str = field(default="torch", metadata={"help": "weight init: torch U(±1/√H) or charrnn U(±0.08)", "choices": ["torch", "charrnn"]})
    forget_bias: float = field(default=0.0, metadata={"help": "added to the LSTM forget-gate bias at init"})
    dtype: str = field(default="float32", metadata={"help": "float type", "choices": ["float32", "float64"]})
    # regularisers (docs/regularization.md): --recurrent-dropout, --zoneout, --layer-norm and --peephole run the
    # recurrent layer's NumPy loop; --weight-drop, --input-dropout and --output-dropout alone keep its compiled kernels
    recurrent_dropout: float = field(default=0.0, metadata={"help": "variational dropout of h(t-1) in the recurrent product, one mask per stream (Keras' recurrent_dropout)"})
    weight_drop: float = field(default=0.0, metadata={"help": "DropConnect on the recurrent weights W_hh, one mask per window (AWD-LSTM)"})
    input_dropout: float = field(default=0.0, metadata={"help": "variational dropout of every recurrent layer's input, one mask per stream"})
    output_dropout: float = field(default=0.0, metadata={"help": "variational dropout of the top recurrent layer's output, one mask per stream"})
    zoneout: float = field(default=0.0, metadata={"help": "zoneout rate of h (and c): keep the previous value with this probability"})
    layer_norm: bool = field(default=False, metadata={"help": "layer-normalised gate pre-activations (and cell state, LSTM)"})
    peephole: bool = field(default=False, metadata={"help": "LSTM peephole connections (cell state to gates)"})
    embedding_dropout: float = field(default=0.0, metadata={"help": "drop whole rows of the embedding (needs --embedding > 0)"})
    tie_weights: bool = field(default=False, metadata={"help": "decoder weight = embedding weight (needs --embedding equal to --hidden)"})
    adaptive_softmax: bool = field(default=False, metadata={"help": "--unit word: an adaptive softmax (Grave et al. 2017) instead of the full one: the most frequent words in a head, the rarer ones in clusters behind smaller projections"})
    cutoffs: str | None = field(default=None, metadata={"help": "--adaptive-softmax: comma-separated word ids where the clusters start, such as 2000,10000 (words are numbered by frequency; default: V/15,V/3)"})
    div_value: float = field(default=4.0, metadata={"help": "--adaptive-softmax: cluster i projects h to hidden / div_value^(i+1) features"})
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
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out that holds a run, deleting its checkpoints and log"})
    init_from: str | None = field(default=None, metadata={"help": "start from the weights of this checkpoint (new optimizer)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def model_config(self, vocab_size: int):
        """The model's config: a :class:`TransformerLMConfig` for ``--model transformer``, else a CharLMConfig."""
        if self.model == "transformer":
            return TransformerLMConfig(vocab_size, self.layers, self.d_model, self.heads, self.context or self.seq_len,
                                       self.dropout, self.dtype).validate()
        return CharLMConfig(vocab_size, self.model, self.hidden, self.layers, self.dropout, self.embedding,
                            self.init, self.forget_bias, self.dtype, recurrent_dropout=self.recurrent_dropout,
                            weight_drop=self.weight_drop, zoneout=self.zoneout, layer_norm=self.layer_norm,
                            peephole=self.peephole, input_dropout=self.input_dropout,
                            output_dropout=self.output_dropout, embedding_dropout=self.embedding_dropout,
                            tie_weights=self.tie_weights, adaptive_softmax=self.adaptive_softmax,
                            cutoffs=self.cutoff_list(vocab_size), div_value=self.div_value).validate()

    def cutoff_list(self, vocab_size: int) -> list[int]:
        """The adaptive softmax's cutoffs for V = ``vocab_size``: ``--cutoffs``, or :func:`default_cutoffs`
        (none without ``--adaptive-softmax``)."""
        if not self.adaptive_softmax:
            return []
        if self.cutoffs is None:
            return default_cutoffs(vocab_size)
        parts = self.cutoffs if isinstance(self.cutoffs, (list, tuple)) else str(self.cutoffs).split(",")
        try:
            return [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"--cutoffs must be whole numbers separated by commas, such as 2000,10000; "
                             f"got {self.cutoffs!r}") from None

    def validate(self) -> TrainConfig:
        if self.preset is not None and self.preset not in presets.PRESETS:
            raise ValueError(f"--preset must be {' or '.join(presets.PRESETS)} (a 5- or 30-minute budget), "
                             f"got {self.preset!r}")
        if self.preset is not None and self.model == "transformer":
            raise ValueError("--preset fits a recurrent model (lstm, gru, rnn) to its budget, not --model transformer")
        problems = check_fields(
            self, positive_ints=("seq_len", "batch_size", "eval_every", "log_every"),
            nonneg_ints=("max_iters", "eval_windows", "warmup_iters", "sample_length", "lr_decay_after", "log_hidden_stats"),
            positive_floats=("lr", "div_value"),
            nonneg_floats=("grad_clip", "max_epochs", "max_time", "weight_decay", "momentum", "min_lr"))
        if not 0 < self.alpha < 1:
            problems.append(f"--alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.lr_decay <= 1:
            problems.append(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if problems:
            raise ValueError("; ".join(problems))
        if self.model == "transformer" and self.context and self.seq_len > self.context:
            raise ValueError(f"--seq-len {self.seq_len} is longer than the transformer's --context {self.context}")
        if self.model == "transformer" and self.log_hidden_stats:
            raise ValueError("--log-hidden-stats reads a recurrent layer's states; a transformer has none")
        if self.model == "transformer":
            recurrent = [f"--{n.replace('_', '-')}" for n in ("recurrent_dropout", "weight_drop", "zoneout", "layer_norm",
                                                             "peephole", "input_dropout", "output_dropout",
                                                             "embedding_dropout", "tie_weights")
                         if getattr(self, n)]
            if recurrent:
                raise ValueError(f"{', '.join(recurrent)}: options of the recurrent models, not of --model transformer")
        if self.truncation == "randomized" and self.model != "transformer":
            cell = [f"--{n.replace('_', '-')}" for n in ("recurrent_dropout", "weight_drop", "zoneout", "layer_norm",
                                                         "peephole", "input_dropout", "output_dropout") if getattr(self, n)]
            if cell:
                raise ValueError(f"--truncation randomized runs the plain recurrent loop (ARTBP's factors on the "
                                 f"carried gradient); it does not combine with {', '.join(cell)}")
        if self.model == "transformer" and self.truncation == "randomized":
            raise ValueError("--truncation randomized scales the gradient carried from step to step (ARTBP); "
                             "a transformer has no recurrence: use fixed or variable")
        if self.adaptive_softmax:
            if self.model == "transformer":
                raise ValueError("--adaptive-softmax is an output layer of the recurrent models (lstm, gru, rnn), "
                                 "not of --model transformer")
            if self.unit != "word":
                raise ValueError(f"--adaptive-softmax is for word vocabularies (--unit word); a {self.unit} model "
                                 "keeps the full softmax")
            if self.tie_weights:
                raise ValueError("--tie-weights and --adaptive-softmax do not combine: tying shares the decoder's "
                                 "(V, H) weight with the embedding, and an adaptive softmax has no such matrix")
            given = self.cutoff_list(1) if self.cutoffs is not None else []
            if given and (given != sorted(set(given)) or given[0] < 1):
                raise ValueError(f"--cutoffs must be increasing word ids >= 1, such as 2000,10000; got {self.cutoffs}")
        elif self.cutoffs is not None and not self.resume:  # (on --resume the saved run's flag decides)
            raise ValueError("--cutoffs applies with --adaptive-softmax only")
        if self.vocab_size is not None:
            if self.unit != "word":
                raise ValueError(f"--vocab-size applies to --unit word only (a {self.unit} vocabulary is fixed by the data)")
            if self.vocab_size < 3:
                raise ValueError(f"--vocab-size must be >= 3 (<unk>, <eos> and at least one word), got {self.vocab_size}")
        # the model's fields (with the adaptive softmax, on a V above the cutoffs: the real V is checked
        # once the vocabulary is built)
        self.model_config(max(self.cutoff_list(1) or [1]) + 1 if self.cutoffs is not None else 3)
        return self


# ============================================================================ data


def load_corpus(cfg: TrainConfig, out_dir: Path, vocab: Vocab | None, log):
    """The character corpus as ids (memory-mapped for files) and its vocabulary."""
    if cfg.data is None:
        text, description = default_corpus()
        log(f"corpus: built-in default, {description}")
        vocab = vocab or Vocab(text)
        vocab.require_known(text, "the built-in corpus")
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


class Splits(NamedTuple):
    units: object  # bptt.lm.units CharUnits | ByteUnits | WordUnits
    train: np.ndarray  # (L,) ids of each split (a memory map for a char or byte corpus file)
    val: np.ndarray
    test: np.ndarray
    unknown: dict  # split name -> units of it outside the vocabulary (mapped to <unk>)


def _read_split(cfg: TrainConfig, flag: str, path: str, units):
    """A --val-data / --test-data file encoded with the training units: (ids, unknown count, unknown units)."""
    try:
        data = map_bytes(path) if units.kind == "byte" else read_text(path, cfg.encoding)
        if units.kind == "byte":
            return np.asarray(data), 0, []
        enc = units.encode_counted(data)
    except DataError as e:
        raise DataError(f"{flag}: {e}") from None
    if len(enc.ids) < 2:
        raise DataError(f"{flag}: {path} holds {len(enc.ids)} {units.unit_name}(s); expected at least 2 to evaluate")
    return enc.ids, enc.unknown, enc.unknown_units


def load_splits(cfg: TrainConfig, out_dir: Path, units, log) -> Splits:
    """Units and ids of the train / validation / test splits.

    The units are fitted on the training text only (or come from the checkpoint on resume).  A split
    from a file (``--val-data``, ``--test-data``) replaces its fraction; the fractions cut the end of
    ``--data``.  ``--unit char`` without split files is exactly the original path (a vocabulary of the
    whole corpus, a memory-mapped ``corpus.npy``); with split files its vocabulary gains <unk>.
    """
    for flag, path in (("--val-data", cfg.val_data), ("--test-data", cfg.test_data)):
        if path:  # before the corpus is read and encoded: a wrong split file costs nothing
            p = Path(path)
            if not p.is_file():
                raise DataError(f"{flag}: {p}: no such file; expected a path to a file")
            if p.stat().st_size == 0:
                raise DataError(f"{flag}: {p}: file is empty; expected some text to evaluate on")
    val_frac = 0.0 if cfg.val_data else cfg.val_frac
    test_frac = 0.0 if cfg.test_data else cfg.test_frac
    unknown = {"val": (0, []), "test": (0, [])}
    if cfg.unit == "char":
        want_unk = bool(cfg.val_data or cfg.test_data)
        vocab = units.vocab if units is not None else None
        ids, vocab = load_corpus(cfg, out_dir, vocab, log)
        units = units or CharUnits(vocab.chars, unk=want_unk)
        train_ids, val_ids, test_ids = split_corpus(ids, val_frac, test_frac)
    elif cfg.unit == "byte":
        if cfg.data is None:
            text, description = default_corpus()
            log(f"corpus: built-in default, {description}")
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        else:
            ids = map_bytes(cfg.data)
            log(f"corpus: {cfg.data}, {len(ids):,} bytes")
        units = units or make_units("byte", None)
        train_ids, val_ids, test_ids = split_corpus(ids, val_frac, test_frac)
    else:  # words: split the text first, then fit the vocabulary on the training part only
        if cfg.data is None:
            text, description = default_corpus()
            log(f"corpus: built-in default, {description}")
        else:
            text = read_text(cfg.data, cfg.encoding)
        a, b, _ = (len(part) for part in split_corpus(np.empty(len(text), np.uint8), val_frac, test_frac))
        parts = {"train": text[:a], "val": text[a : a + b], "test": text[a + b :]}
        if units is None:
            try:
                units = make_units("word", parts["train"], vocab_size=cfg.vocab_size)
            except DataError as e:
                raise DataError(str(e).replace("vocab_size", "--vocab-size")) from None
        encoded = {name: units.encode_counted(part) for name, part in parts.items()}
        train_ids, val_ids, test_ids = (encoded[n].ids for n in ("train", "val", "test"))
        unknown |= {n: (encoded[n].unknown, encoded[n].unknown_units) for n in ("val", "test")}
        log(f"corpus: {cfg.data or 'built-in default'}, {len(train_ids):,} training words, vocabulary "
            f"{len(units):,} (with <unk>, <eos>); {encoded['train'].unknown:,} training words are <unk>")
    for name, flag, path in (("val", "--val-data", cfg.val_data), ("test", "--test-data", cfg.test_data)):
        if path:
            split_ids, count, which = _read_split(cfg, flag, path, units)
            val_ids, test_ids = (split_ids, test_ids) if name == "val" else (val_ids, split_ids)
            unknown[name] = (count, which)
    for name, split_ids in (("validation", val_ids), ("test", test_ids)):
        count, which = unknown["val" if name == "validation" else "test"]
        if len(split_ids):
            note = f", {count:,} unknown (<unk>): {show_chars(which)}" if count else ", no unknown units"
            log(f"{name}: {len(split_ids):,} {units.unit_name}s{note}")
    return Splits(units, train_ids, val_ids, test_ids, {n: c for n, (c, _) in unknown.items()})


# ============================================================================ the job the loop runs


class CharLMJob:
    """The language model (recurrent or Transformer) as a :class:`bptt.trainer.Job`: TBPTT windows, the
    hidden state carried from window to window (a Transformer carries none: its windows are independent)."""

    kind = CHECKPOINT_KIND
    metric = "val_loss"
    higher_is_better = False

    def __init__(self, cfg: TrainConfig, model: CharLM, units, batches, val_batches: TBPTTBatches | None,
                 max_steps: int, val_unknown: int = 0, world=None):
        self.cfg, self.model, self.units = cfg, model, units
        self.vocab = units  # the name older callers read
        self.batches, self.val_batches, self.val_unknown = batches, val_batches, val_unknown
        self.optimizer = _make_optimizer(cfg, model)
        self.schedule = make_lr_schedule(cfg, len(batches), max_steps)
        self.state = None  # the hidden state carried from one window to the next
        # where the data stands: the windows of epoch `epoch` (drawn from the seed and the epoch for
        # variable and randomized truncation), the first of which was step `epoch_start`
        self.epoch, self.epoch_start = 0, 0
        self.world = world if world is not None and world.size > 1 else None  # data parallel, or None
        N = batches.batch_size
        self.cols = slice(None) if self.world is None else self.world.shard(N)  # this rank's streams
        self.weight = 1.0 if self.world is None else self.world.weight(N)  # N_r / N

    def _window(self, step: int):
        k = step - self.epoch_start
        if k >= len(self.batches):  # the epoch is done: the next one's windows
            self.epoch, self.epoch_start, k = self.epoch + 1, step, 0
            self.batches.set_epoch(self.epoch)
        return k, self.batches.window(k)

    def forward_backward(self, step: int) -> StepResult:
        model, cfg = self.model, self.cfg
        k, w = self._window(step)
        if k == 0:
            self.state = None  # streams restart at the beginning of the text
        x, y = w.x, w.y
        if self.world is not None:  # this rank's streams
            x, y = np.ascontiguousarray(x[:, self.cols]), np.ascontiguousarray(y[:, self.cols])
        if w.lr_scale != 1.0:  # AWD-LSTM: lr × T_k / T (the loop set this step's lr just before)
            self.optimizer.lr *= w.lr_scale
        randomized = cfg.truncation == "randomized"
        if randomized:  # the carried gradient's factors need the readable loop, forward and backward
            backend, model.rnn.backend = model.rnn.backend, "reference"  # (evaluation and sampling keep theirs)
        try:
            # the reference loop's per-step products are small: one BLAS thread runs them 3-4x faster
            # than two that wait for each other (measured 0.22-0.41 s against 0.92-1.40 s a step, 2x256)
            stats = None
            want_stats = cfg.log_hidden_stats and (step + 1) % cfg.log_hidden_stats == 0
            with single_thread_blas() if randomized else model.blas_scope(*x.shape):
                train_step = getattr(model, "train_step", None)  # a recurrent model's: in batch slices where it can
                if train_step is not None and not (randomized or want_stats):
                    loss, self.state = train_step(x, y, self.state)
                else:
                    loss, dlogits, self.state = model.loss(x, y, self.state)
                    if want_stats:
                        stats = model.rnn.hidden_state_stats()  # mean and variance of h per layer, from this forward
                    if math.isfinite(loss):  # the loop stops on a non-finite loss; no gradient is needed then
                        if randomized:
                            model.backward(dlogits, recurrent_scale=w.recurrent_scale)
                        else:
                            model.backward(dlogits)
        finally:
            if randomized:
                model.rnn.backend = backend
        return StepResult(loss, y.size, stats, self.weight)

    def log_fields(self, step: int) -> dict:
        return {"epoch": self.epoch + (step - self.epoch_start) / len(self.batches)}

    def evaluate(self) -> dict:
        if self.val_batches is None:
            return {}
        val = evaluate(self.model, self.val_batches, self.cfg.eval_windows, world=self.world)
        record = {"val_loss": val, ("val_bpc" if self.units.kind == "char" else f"val_bits_per_{self.units.kind}"):
                  val / math.log(2)}
        if self.units.kind == "word":
            record["val_perplexity"] = math.exp(val) if val < 700 else math.inf
        if self.units.unk_id is not None:
            record["val_unknown"] = self.val_unknown
        return record

    def report(self, step: int, record: dict) -> list[str]:
        msg = f"step {step}: "
        if "val_loss" in record:
            v, unit = record["val_loss"], self.units.kind
            msg += f"val loss {v:.4f} nats/{unit} ({v / math.log(2):.3f} bits/{unit}"
            msg += f", perplexity {math.exp(min(v, 700)):.2f})" if self.units.kind == "word" else ")"
            msg += " (best)" if record["improved"] else ""
        lines = [msg]
        if self.cfg.sample_length:
            from bptt.lm.sample import generate

            text = generate(self.model, self.units, self.cfg.sample_length, temperature=0.8,
                            rng=np.random.default_rng(step))
            lines.append("sample: " + text.replace("\n", "\n        "))
        return lines

    def checkpoint_meta(self) -> dict:
        meta = {"units": self.units.to_json(), "rng": ckpt.rng_state(self.model.rng),
                "data": {"epoch": self.epoch, "epoch_start": self.epoch_start}}
        if self.world is not None:  # every rank's dropout generator, for a resume with as many ranks
            meta["rank_rngs"] = self.world.gather(meta["rng"])
        return meta

    def checkpoint_tensors(self) -> dict:
        out = {}
        reg = _regularizer(self.model)
        masks = reg.mask_state() if reg is not None else {}  # the streams' locked dropout masks, rows = streams
        state = self.state
        if self.world is not None:  # all N streams, rank by rank: pieces joined along N
            pieces = self.world.gather(state)
            state = join_streams(pieces)  # (L, N_r, H) pieces
            mask_pieces = self.world.gather(masks)
            masks = {} if not all(mask_pieces) else {
                k: np.concatenate([m[k] for m in mask_pieces], axis=0) for k in masks}  # (N_r, ...) pieces
        if masks:
            out["masks"] = masks
        if state is None:
            return out
        h, c = state if isinstance(state, tuple) else (state, None)
        return out | {"state": {"h": h} if c is None else {"h": h, "c": c}}

    def restore(self, tensors: dict, meta: dict) -> None:
        saved = meta["rng"]
        if self.world is not None:
            rank_rngs = meta.get("rank_rngs") or []
            saved = rank_rngs[self.world.rank] if len(rank_rngs) == self.world.size else saved
        self.model.rng.bit_generator.state = ckpt.restore_rng(saved).bit_generator.state
        if self.world is not None and saved is meta["rng"] and self.world.rank > 0:  # saved with another K
            self.model.rng.bit_generator.state = np.random.default_rng(self.cfg.seed + self.world.rank).bit_generator.state
        reg = _regularizer(self.model)
        if reg is not None:  # all N streams' masks were saved; this rank keeps its own rows
            masks = tensors.get("masks", {})
            reg.load_mask_state(self.model.rnn, {k: np.ascontiguousarray(v[self.cols]) for k, v in masks.items()})
        st = tensors.get("state")
        if st:  # all N streams were saved; this rank carries its own
            mine = lambda a: np.ascontiguousarray(a[:, self.cols])  # noqa: E731
            self.state = (mine(st["h"]), mine(st["c"])) if "c" in st else mine(st["h"])
        pos = meta.get("data")
        if pos is None:  # written before truncation strategies: fixed windows, K per epoch
            K, step = len(self.batches), int(meta["step"])
            pos = {"epoch": step // K, "epoch_start": step // K * K}
        self.epoch, self.epoch_start = int(pos["epoch"]), int(pos["epoch_start"])
        self.batches.set_epoch(self.epoch)


def _regularizer(model):
    """The recurrent layer's regulariser (bptt.nn.regularized_loop), or None (none on, or a transformer)."""
    rnn = getattr(model, "rnn", None)
    return None if rnn is None else rnn.regularizer


def make_lr_schedule(cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    """The learning-rate schedule ``--schedule`` names, from the config's lr, decay and warm-up fields.

    Anything with those attributes will do: the PyTorch reference scripts in ``benchmarks/`` pass
    their argparse namespace, so both sides follow the same learning rate at every step."""
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


def _not_defaults(cfg: TrainConfig) -> set[str]:
    """The fields of ``cfg`` that differ from TrainConfig's defaults (what a caller of :func:`train` chose)."""
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}


def _fit_preset(cfg: TrainConfig, given: set[str], splits: Splits, batches, val_batches, world, log) -> TrainConfig:
    """``cfg`` with the preset's corpus- and machine-dependent settings (:func:`bptt.lm.presets.fit`),
    after a few timed steps of throwaway models on this run's windows (under mpiexec: data-parallel
    steps on every rank, agreed times, one plan)."""
    V = len(splits.units)
    corpus = presets.Corpus(len(splits.train), len(splits.val), V, len(batches))

    def make_model(H, dropout):
        return build_model(replace(cfg, hidden=H, dropout=dropout).model_config(V), rng=cfg.seed)

    log(f"preset {cfg.preset}: timing a few steps to fit the model and the schedule to "
        f"{cfg.max_time:g} minutes on this machine")
    timer = presets.StepTimer(make_model, batches, val_batches, lr=cfg.lr, world=world, optimizer=cfg.optimizer)
    # every rank times its share, the step it will run; the timer hands every rank the same times, bit
    # for bit, so every rank's fit makes the same choices
    settings, notes = presets.fit(cfg, given, corpus, timer)
    cfg = replace(cfg, **settings).validate()
    chosen = presets.fixed_settings(cfg.preset, given) | settings
    log(f"preset {cfg.preset} ({presets.PRESETS[cfg.preset].minutes:g}-minute budget): "
        f"{presets.as_flags({k: getattr(cfg, k) for k in chosen})}")
    for note in notes:
        log(f"  {note}")
    overridden = sorted(given & presets.preset_fields(cfg.preset))
    if overridden:
        log(f"  kept from your flags: {presets.as_flags({k: getattr(cfg, k) for k in overridden})}")
    return cfg


def check_out_dir(out_dir: Path):
    """Create ``out_dir`` and make sure it can be written, before any work is done."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None


# what the saved weights and optimizer state were made with
_FIXED_ON_RESUME = ("model", "hidden", "layers", "embedding", "d_model", "heads", "context", "dtype", "optimizer",
                    "layer_norm", "peephole", "tie_weights", "unit", "vocab_size", "truncation", "adaptive_softmax",
                    "cutoffs", "div_value")

#: ``--unit word`` with the default ``--embedding 0``: the embedding size used (one-hot over a word
#: vocabulary would make the input layer V × G).
WORD_EMBEDDING = 256


def train(cfg: TrainConfig, log=None, explicit: set[str] | None = None, world=None) -> dict:
    """Train (or resume) a character language model; returns a summary dict.

    ``explicit`` names the options the user set on the command line: on
    ``--resume`` the saved configuration is used except for those (so a run can
    be extended with a larger ``--max-iters``).  ``world``: a :mod:`bptt.dist`
    world (default: :func:`~bptt.dist.current_world`, data parallel under mpiexec).
    """
    world = world or current_world()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not world.is_main:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for all
    # every rank checks the arguments; rank 0 claims the run directory (held until the run ends: a second
    # writer, or a fresh run over this one, stops with one line); a failure on any rank stops all, once
    made = missing_dirs(Path(cfg.out)) if world.is_main else []  # what this run creates: removed again on bad input
    with world.agree(_claim, cfg, world) as claim:
        with discarded_on_failure(claim, made):
            trainer, summary_line, finish = world.agree(_prepare, cfg, Path(cfg.out), log, explicit, world)
        if world.size > 1:
            log(world.layout_line())
            world.broadcast_model(trainer.job.model, trainer.job.optimizer)  # one start (or resume) for all
        log(summary_line)
        return finish(trainer.run())


def _claim(cfg: TrainConfig, world):
    """Validate; rank 0 locks the run directory and checks (or clears) a previous run there."""
    cfg.validate()
    out_dir = Path(cfg.out)
    check_out_dir(out_dir)
    if not world.is_main:
        return contextlib.nullcontext()
    return claim_run_dir(out_dir, resume=cfg.resume, overwrite=cfg.overwrite)


def _prepare(cfg: TrainConfig, out_dir: Path, log, explicit: set[str] | None, world):
    """Configuration, data, model, job and loop, ready to run (on every rank)."""
    last_path = out_dir / "last.safetensors"

    # ---------------------------------------------------------------- units and configuration
    resume_from = None
    if cfg.resume:
        if not last_path.exists():
            raise DataError(f"--resume: no checkpoint to resume in {out_dir} (expected {last_path.name})")
        tensors, meta = ckpt.load_checkpoint_of_kind(last_path, CHECKPOINT_KIND, "a character language model")
        saved = TrainConfig.from_dict(meta["train"])
        fixed = [n for n in _FIXED_ON_RESUME if n in (explicit or ()) and getattr(cfg, n) != getattr(saved, n)]
        if fixed:
            changes = ", ".join(f"--{n.replace('_', '-')} {getattr(saved, n)} -> {getattr(cfg, n)}" for n in fixed)
            raise DataError(f"--resume cannot change {changes}; use --init-from to start a new run from these weights")
        for name in explicit or ():
            setattr(saved, name, getattr(cfg, name))
        saved.resume, saved.overwrite, cfg = True, False, saved.validate()
        resume_from = (tensors, meta)
        units = units_from_json(meta["units"] if "units" in meta else meta["vocab"])
    elif cfg.init_from:
        init_model, units, _ = load_model(cfg.init_from)
        if units.kind != cfg.unit:
            raise DataError(f"--init-from {cfg.init_from} predicts {units.unit_name}s; this run has --unit {cfg.unit}")
    else:
        units = None
    if cfg.unit == "word" and cfg.model != "transformer" and cfg.embedding == 0:
        if "embedding" in (explicit or ()):
            raise DataError(f"--unit word needs an embedding (one-hot over a word vocabulary is V x the gates); "
                            f"give --embedding > 0 (default for words: {WORD_EMBEDDING})")
        cfg.embedding = WORD_EMBEDDING
        log(f"--unit word: --embedding {WORD_EMBEDDING} (a learned embedding instead of one-hot input)")

    preset = cfg.preset if not cfg.resume else None  # a resumed run has its preset's settings already
    if preset:
        given = explicit if explicit is not None else _not_defaults(cfg)
        for name, value in presets.fixed_settings(preset, given).items():
            setattr(cfg, name, value)
        if not cfg.max_time:
            raise ValueError(f"--preset {preset} fits the run to its time budget; --max-time 0 leaves it none")
        cfg.validate()

    # ---------------------------------------------------------------- data
    splits = load_splits(cfg, out_dir, units, log)
    units, train_ids, val_ids, test_ids = splits.units, splits.train, splits.val, splits.test
    options = {}
    if cfg.truncation == "variable" and cfg.model == "transformer":  # windows no longer than the context
        options["max_len"] = cfg.context or cfg.seq_len
    batches = make_batches(cfg.truncation, train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed, **options)
    val_batches = None
    if len(val_ids):
        try:
            val_batches = TBPTTBatches(val_ids, cfg.batch_size, cfg.seq_len)
        except DataError as e:
            raise DataError(f"validation split ({len(val_ids)} {units.unit_name}s) is too short: {e}") from None

    if preset:  # the sizes and steps that fit this corpus and machine (bptt.lm.presets)
        cfg = _fit_preset(cfg, given, splits, batches, val_batches, world, log)

    # ---------------------------------------------------------------- model
    model = build_model(cfg.model_config(len(units)), rng=cfg.seed)
    if cfg.init_from and not cfg.resume:
        if init_model.config.to_dict() | {"dtype": cfg.dtype} != model.config.to_dict():
            log(f"--init-from: using the checkpoint's architecture {init_model.config.to_dict()}")
            model = build_model(config_from_dict(init_model.config.to_dict() | {"dtype": cfg.dtype}), rng=cfg.seed)
        model.load_state_dict(init_model.state_dict())
    steps_per_epoch = len(batches)
    max_steps = int(cfg.max_epochs * steps_per_epoch)
    if cfg.max_iters:
        max_steps = min(max_steps, cfg.max_iters) if cfg.max_epochs else cfg.max_iters

    if cfg.schedule == "cosine" and cfg.max_time and not cfg.max_iters:
        log(f"note: the cosine schedule runs over {max_steps} steps (--max-epochs {cfg.max_epochs:g}); --max-time "
            f"{cfg.max_time:g} may stop the run before the learning rate comes down: give --max-iters, or use --preset")
    if world.size > 1 and world.rank > 0:  # dropout masks of its own: rank r draws from seed + r
        model.rng.bit_generator.state = np.random.default_rng(cfg.seed + world.rank).bit_generator.state
    job = CharLMJob(cfg, model, units, batches, val_batches, max_steps, val_unknown=splits.unknown["val"], world=world)
    loop = LoopConfig(out_dir=out_dir, max_steps=max_steps, max_minutes=cfg.max_time, eval_every=cfg.eval_every,
                      log_every=cfg.log_every, grad_clip=cfg.grad_clip, clip_mode=cfg.clip_mode,
                      progress=cfg.progress)
    trainer = Trainer(job, loop, asdict(cfg), log=log, world=world if world.size > 1 else None)
    if resume_from is not None:
        trainer.restore(*resume_from)
        job.restore(*resume_from)
        log(f"resuming {last_path} at step {trainer.step}")

    unit = units.unit_name
    line = (f"model: {model!r}, {model.num_parameters():,} parameters; {steps_per_epoch} steps per epoch "
            f"(T={cfg.seq_len}, N={cfg.batch_size}, {cfg.truncation} windows); train {len(train_ids):,} / "
            f"val {len(val_ids):,} {unit}s")

    def finish(summary: dict) -> dict:
        """After the run: the best loss, the unknown count, the test split."""
        if summary["best"] is not None:
            best = summary["best"]
            log(f"best validation loss {best:.4f} nats/{units.kind} ({best / math.log(2):.4f} bits/{units.kind}); "
                f"checkpoints in {out_dir}")
        if splits.unknown["val"]:
            summary["val_unknown"] = splits.unknown["val"]
        if len(test_ids) and world.is_main:  # rank 0 alone: it reads the checkpoint it wrote
            summary["test"] = evaluate_test(out_dir, test_ids, units, splits.unknown["test"], log)
        return summary

    return trainer, line, finish


def evaluate_test(out_dir: Path, test_ids: np.ndarray, units, unknown: int, log) -> dict | None:
    """The test split, once, with the best checkpoint (the last one when there is no validation split):
    every id predicted from all that precedes it in its stream (:func:`bptt.lm.evaluate.evaluate_ids`)."""
    path = out_dir / "best.safetensors"
    if not path.exists():
        path = out_dir / "last.safetensors"
    if not path.exists():
        return None
    model, _, meta = load_model(path)
    total, count = evaluate_ids(model, test_ids)
    result = lm_metrics(total, count, units) | {"unknown_count": int(unknown), "checkpoint": path.name,
                                                 "step": int(meta["step"])}
    unit, per = units.unit_name, units.kind
    msg = (f"test ({path.name}, step {result['step']}): {result['loss']:.4f} nats/{per} "
           f"({result['bits_per_unit']:.4f} bits/{per}")
    msg += f", perplexity {result['perplexity']:.2f})" if units.kind == "word" else ")"
    log(msg + f" over {count:,} {unit}s, {unknown:,} unknown (<unk>)")
    return result
