"""Training a sequence-to-sequence model on the one training loop (:mod:`bptt.trainer`).

    pairs (task stream or TSV) → length-bucketed batches → the loop: forward, masked cross-entropy
    (two-pass scheduled sampling when --teacher-forcing < 1), backward, clip, optimizer step;
    every --eval-every steps: exact match on held-out pairs, checkpoint, log.

A run directory (``--out``) holds ``model.safetensors`` (weights, optimizer state and the meta of
:mod:`bptt.trainer`, plus the vocabularies, the task or data file and the RNG state), its JSON
sidecar ``model.json``, ``log.jsonl`` and ``loss.png``.

Under ``mpiexec -n K`` the run is data parallel (:mod:`bptt.dist`): every rank draws the same
global batch (the batch generator is seeded alike on all ranks), trains its rows ``shard(N)`` and
weighs its gradient by its share of the batch's target tokens, so the sum over ranks is the
gradient of the one-process masked mean.  Validation pairs are shared out and the counts summed.
Scheduled sampling (--teacher-forcing < 1) then draws from a generator of each rank's own
(seeded (seed, rank)), and dropout rank r > 0 from seed + r: with either, K ranks do not repeat
the one-process run, and those generators are not in the checkpoint.  Rank 0 alone owns the run
directory and writes to it.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bptt import checkpoint as ckpt
from bptt.config import DictConfig, check_fields
from bptt.dist import current_world
from bptt.lm.data import DataError
from bptt.nn.optim import OPTIMIZERS, make_optimizer, make_schedule
from bptt.rundir import claim_run_dir, discarded_on_failure, missing_dirs
from bptt.seq2seq.data import SeqData
from bptt.seq2seq.decode import decode_max_len, evaluate
from bptt.seq2seq.model import Batch, Seq2Seq, Seq2SeqConfig, train_step
from bptt.seq2seq.tasks import TASKS, TokenVocab, get_task
from bptt.seq2seq.transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig
from bptt.trainer import LoopConfig, StepResult, Trainer

__all__ = ["Seq2SeqTrainConfig", "Seq2SeqJob", "train", "load_model", "CKPT_NAME", "KIND"]

CKPT_NAME = "model.safetensors"
KIND = "seq2seq"


@dataclass
class Seq2SeqTrainConfig(DictConfig):
    """Every option of ``bptt seq2seq train`` (the CLI flags are generated from these fields)."""

    task: str | None = field(default=None, metadata={"help": "built-in task, generated on the fly", "choices": sorted(TASKS)})
    data: str | None = field(default=None, metadata={"help": "TSV file, one 'source<TAB>target' pair per line"})
    level: str = field(default="char", metadata={"help": "tokens of --data", "choices": ["char", "word"]})
    arch: str = field(default="rnn", metadata={"help": "recurrent encoder-decoder with attention, or a Transformer", "choices": ["rnn", "transformer"]})
    attention: str = field(default="general", metadata={"help": "attention score", "choices": ["none", "dot", "general", "additive"]})
    cell: str = field(default="lstm", metadata={"help": "recurrent cell", "choices": ["lstm", "gru", "rnn"]})
    hidden: int = field(default=128, metadata={"help": "decoder hidden size (encoder: half per direction if bidirectional)"})
    layers: int = field(default=1, metadata={"help": "stacked recurrent layers (transformer: encoder layers, and as many decoder layers)"})
    d_model: int = field(default=128, metadata={"help": "transformer: model width"})
    heads: int = field(default=4, metadata={"help": "transformer: attention heads (must divide --d-model)"})
    ff: int = field(default=0, metadata={"help": "transformer: feed-forward width (0: 4 x --d-model)"})
    bidirectional: bool = field(default=False, metadata={"help": "bidirectional encoder"})
    embedding: int = field(default=32, metadata={"help": "token embedding size"})
    dropout: float = field(default=0.0, metadata={"help": "between stacked recurrent layers (transformer: every dropout of nn.Transformer, and on the embeddings)"})
    batch_size: int = field(default=64, metadata={"help": "pairs per batch"})
    optimizer: str = field(default="adam", metadata={"help": "optimizer", "choices": sorted(OPTIMIZERS)})
    lr: float = field(default=2e-3, metadata={"help": "learning rate"})
    schedule: str = field(default="constant", metadata={"help": "cosine decays to 0 at --max-steps", "choices": ["constant", "cosine"]})
    clip: float = field(default=5.0, metadata={"help": "gradient-norm clipping (0: off)"})
    max_steps: int = field(default=10000, metadata={"help": "stop after this many steps"})
    max_time: float = field(default=0.0, metadata={"help": "stop after this many minutes (0: no limit)"})
    eval_every: int = field(default=500, metadata={"help": "steps between evaluations and checkpoints"})
    eval_size: int = field(default=500, metadata={"help": "held-out pairs scored at each evaluation (0: all)"})
    log_every: int = field(default=50, metadata={"help": "steps between train-loss log records"})
    out: str = field(default="runs/seq2seq", metadata={"help": "run directory"})
    resume: bool = field(default=False, metadata={"help": f"continue from OUT/{CKPT_NAME}"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out that holds a run, deleting its checkpoint and log"})
    seed: int = field(default=0, metadata={"help": "random seed (init, batches, scheduled sampling)"})
    teacher_forcing: float = field(default=1.0, metadata={"help": "probability of feeding the gold previous token (<1: two-pass scheduled sampling)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar or messages"})

    def validate(self) -> Seq2SeqTrainConfig:
        problems = []
        if self.task is None and self.data is None:
            problems.append("give --task (dates, addition, reverse) or --data FILE.tsv")
        if self.task is not None and self.data is not None:
            problems.append("give either --task or --data, not both")
        problems += check_fields(
            self, positive_ints=("hidden", "layers", "embedding", "batch_size", "max_steps", "eval_every", "log_every"),
            nonneg_ints=("eval_size", "ff"), positive_floats=("lr",), nonneg_floats=("clip", "max_time"),
            rates=("dropout",), probabilities=("teacher_forcing",))
        if self.arch == "transformer":
            problems += check_fields(self, positive_ints=("d_model", "heads"))
            if not problems and self.d_model % self.heads:
                problems.append(f"--d-model ({self.d_model}) must be divisible by --heads ({self.heads})")
        if problems:
            raise DataError("; ".join(problems))
        return self

    def model_config(self, data: SeqData) -> Seq2SeqConfig | TransformerSeq2SeqConfig:
        if self.arch == "transformer":
            longest = max(data.max_src_len, decode_max_len(data.max_tgt_len)) + 1
            return TransformerSeq2SeqConfig(src_vocab=len(data.src_vocab), tgt_vocab=len(data.tgt_vocab),
                                            d_model=self.d_model, heads=self.heads, layers=self.layers, ff=self.ff,
                                            dropout=self.dropout, max_len=max(1024, longest))
        return Seq2SeqConfig(src_vocab=len(data.src_vocab), tgt_vocab=len(data.tgt_vocab), embedding=self.embedding,
                             hidden=self.hidden, layers=self.layers, cell=self.cell, bidirectional=self.bidirectional,
                             attention=self.attention, dropout=self.dropout)


class Seq2SeqJob:
    """seq2seq as a :class:`bptt.trainer.Job`: length-bucketed batches, exact match as the metric."""

    kind = KIND
    metric = "exact_match"
    higher_is_better = True

    def __init__(self, cfg: Seq2SeqTrainConfig, model: Seq2Seq, data: SeqData, rng: np.random.Generator,
                 world=None):
        self.cfg, self.model, self.data, self.rng = cfg, model, data, rng
        self.world = world if world is not None and world.size > 1 else None  # data parallel, or None
        # scheduled sampling must not draw from the batch generator, which stays alike on every rank
        self.sample_rng = rng if self.world is None else np.random.default_rng((cfg.seed, self.world.rank))
        self.optimizer = make_optimizer(cfg.optimizer, model, cfg.lr)
        kw = {"lr": cfg.lr} if cfg.schedule == "constant" else {"lr": cfg.lr, "total_steps": cfg.max_steps}
        self.schedule = make_schedule(cfg.schedule, **kw)
        self.valid = data.valid[: cfg.eval_size] if cfg.eval_size else data.valid
        self._batches = None  # created on the first step, from the (possibly restored) RNG

    def forward_backward(self, step: int) -> StepResult:
        if self._batches is None:
            self._batches = self.data.batches(self.rng, self.cfg.batch_size)
        batch = next(self._batches)
        if self.world is None:
            loss = train_step(self.model, batch, self.cfg.teacher_forcing, self.rng)
            return StepResult(loss, int(batch.tgt_mask.sum()))
        tokens = int(batch.tgt_mask.sum())  # of the global batch: the mean's denominator
        rows = self.world.shard(batch.src.shape[1], allow_empty=True)  # a short last batch may leave a rank idle
        mine = Batch(*(np.ascontiguousarray(a[rows] if a.ndim == 1 else a[:, rows]) for a in batch))
        own = int(mine.tgt_mask.sum())
        if own == 0:
            return StepResult(0.0, 0, None, 0.0)
        loss = train_step(self.model, mine, self.cfg.teacher_forcing, self.sample_rng)
        return StepResult(loss, own, None, own / tokens)

    def log_fields(self, step: int) -> dict:
        return {}

    def evaluate(self) -> dict:
        if self.world is not None:
            return self._evaluate_shared()
        self.model.eval()
        res, _, _ = evaluate(self.model, self.data, self.valid)
        self.model.train()
        return {"exact_match": res["exact_match"], "token_accuracy": res["token_accuracy"]}

    def _evaluate_shared(self) -> dict:
        """Each rank decodes its share of the pairs; exact matches, correct tokens and counts are summed."""
        pairs = self.valid[self.world.shard(len(self.valid), allow_empty=True)]
        counts = [0.0, 0.0, 0.0, float(len(pairs))]  # exact, correct tokens, reference tokens, pairs
        if pairs:
            self.model.eval()
            res, _, _ = evaluate(self.model, self.data, pairs)
            self.model.train()
            tokens = sum(len(t) for _, t in pairs)
            counts[:3] = [round(res["exact_match"] * len(pairs)), round(res["token_accuracy"] * max(tokens, 1)), tokens]
        exact, correct, tokens, n = self.world.allreduce_sum(counts)
        return {"exact_match": exact / max(n, 1), "token_accuracy": correct / max(tokens, 1)}

    def report(self, step: int, record: dict) -> list[str]:
        return [] if self.cfg.quiet else [
            f"step {step}: exact match {100 * record['exact_match']:.2f}%, token accuracy "
            f"{100 * record['token_accuracy']:.2f}%" + (" (best)" if record["improved"] else "")]

    def checkpoint_meta(self) -> dict:
        d = self.data
        return {"src_vocab": d.src_vocab.to_json(), "tgt_vocab": d.tgt_vocab.to_json(),
                "task": d.task.name if d.task else None, "data": None if d.task else str(self.cfg.data),
                "level": d.level, "max_src_len": d.max_src_len, "max_tgt_len": d.max_tgt_len,
                "schedule": self.schedule.config(), "rng": ckpt.rng_state(self.rng)}

    def checkpoint_tensors(self) -> dict:
        return {}


def config_arch(config: dict) -> str:
    """"transformer" or "rnn" (checkpoints from before the Transformer carry no ``arch``)."""
    return config.get("arch", "rnn")


def build_model(config: dict, rng=None):
    """A Seq2Seq or a TransformerSeq2Seq from a checkpoint's ``config``."""
    if config_arch(config) == "transformer":
        return TransformerSeq2Seq(TransformerSeq2SeqConfig.from_dict(config), rng=rng)
    return Seq2Seq(Seq2SeqConfig.from_dict(config), rng=rng)


def load_model(path):
    """(model, meta, SeqData without training pairs) from a checkpoint (either architecture)."""
    tensors, meta = ckpt.load_checkpoint_of_kind(path, KIND, "a seq2seq model")
    try:
        model = build_model(meta["config"])
        model.load_state_dict(tensors.get("model", {}))
        data = SeqData(level=meta["level"], src_vocab=TokenVocab.from_json(meta["src_vocab"]),
                       tgt_vocab=TokenVocab.from_json(meta["tgt_vocab"]),
                       max_src_len=meta["max_src_len"], max_tgt_len=meta["max_tgt_len"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: checkpoint contents do not fit a {config_arch(meta.get('config') or {})} "
                                   f"seq2seq model ({e})") from None
    model.eval()
    if meta.get("task"):
        data.task = get_task(meta["task"])
    return model, meta, data


def train(cfg: Seq2SeqTrainConfig, log=None, world=None) -> dict:
    """Train (or resume) a seq2seq model; returns the loop's summary (with the last evaluation).

    ``world``: a :mod:`bptt.dist` world (default :func:`~bptt.dist.current_world`: data parallel under mpiexec).
    """
    world = world or current_world()
    log = log or ((lambda s: None) if cfg.quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    if not world.is_main:
        log = lambda s: None  # noqa: E731 - rank 0 speaks for all
    out = Path(cfg.out)
    # every rank checks the arguments; rank 0 claims the run directory (held until the run ends: a second
    # writer, or a fresh run over this one, stops with one line); a failure on any rank stops all, once
    made = missing_dirs(out) if world.is_main else []  # what this run creates: removed again on bad input
    with world.agree(_claim, cfg, out, world) as claim:
        with discarded_on_failure(claim, made):
            trainer = world.agree(_prepare, cfg, out, log, world)
        if world.size > 1:
            log(world.layout_line())
            world.broadcast_model(trainer.job.model, trainer.job.optimizer)
        log(f"seq2seq: {trainer.job.model.num_parameters():,} parameters, {trainer.job.model!r}")
        return trainer.run()


def _claim(cfg: Seq2SeqTrainConfig, out: Path, world):
    cfg.validate()
    if not world.is_main:
        return contextlib.nullcontext()
    return claim_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)


def _prepare(cfg: Seq2SeqTrainConfig, out: Path, log, world) -> Trainer:
    """Data, model, job and loop, ready to run (on every rank)."""
    ckpt_path = out / CKPT_NAME
    data = SeqData.from_task(cfg.task) if cfg.task else SeqData.from_file(cfg.data, cfg.level, cfg.seed, log)

    resume_from = None
    if cfg.resume:
        if not ckpt_path.exists():
            raise DataError(f"--resume: no checkpoint at {ckpt_path}")
        tensors, meta = ckpt.load_checkpoint_of_kind(ckpt_path, KIND, "a seq2seq model")
        if (TokenVocab.from_json(meta["src_vocab"]) != data.src_vocab
                or TokenVocab.from_json(meta["tgt_vocab"]) != data.tgt_vocab):
            raise DataError(f"--resume: the data's vocabularies differ from the checkpoint's ({ckpt_path})")
        saved_arch = config_arch(meta["config"])
        if saved_arch != cfg.arch:
            raise DataError(f"--resume: {ckpt_path} holds a {saved_arch} model; it cannot resume as --arch {cfg.arch} "
                            f"(give --arch {saved_arch})")
        config = meta["config"]
        rng = ckpt.restore_rng(meta["rng"])
        resume_from = (tensors, meta)
    else:
        config = cfg.model_config(data).to_dict()
        rng = np.random.default_rng(cfg.seed)
    model_rng = np.random.default_rng(cfg.seed)  # init, then dropout
    model = build_model(config, rng=model_rng)
    if world.size > 1 and world.rank > 0:  # dropout masks of its own: rank r draws from seed + r
        model_rng.bit_generator.state = np.random.default_rng(cfg.seed + world.rank).bit_generator.state
    job = Seq2SeqJob(cfg, model, data, rng, world=world)
    loop = LoopConfig(out_dir=out, max_steps=cfg.max_steps, max_minutes=cfg.max_time, eval_every=cfg.eval_every,
                      log_every=cfg.log_every, grad_clip=cfg.clip, clip_mode="norm", progress=not cfg.quiet,
                      last_name=CKPT_NAME, best_name=None)
    trainer = Trainer(job, loop, asdict(cfg), log=log, world=world if world.size > 1 else None)
    if resume_from is not None:
        trainer.restore(*resume_from)
    return trainer
