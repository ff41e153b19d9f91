"""One training loop for every model — the char LM, seq2seq, the Transformer — readable top to bottom.

    for step in start .. max_steps (or until --max-time):
        optimizer.lr = schedule(step)
        loss = job.forward_backward(step)       forward, loss, backward: gradients in model.grads
        world.allreduce_grads(model)            data parallel only (bptt.dist); one process: nothing
        clip(model); optimizer.step()
        every log_every steps: a train record in log.jsonl, the progress bar's postfix
        every eval_every steps and at the end: job.evaluate(), checkpoint (last, and best when the
                                                metric improved), job.report() (a sample...), loss.png

An application supplies a *job* (:class:`Job`): its model, optimizer and schedule, how to take one
step's loss and gradients, how to evaluate, and what its checkpoints hold besides what every
checkpoint holds.  The loop owns everything else, once: the stopping rules, the loss guards (NaN,
explosion), clipping, logging, the progress bar, checkpoints and their schema, Ctrl-C.

Checkpoint metadata (one schema for every kind; :func:`bptt.checkpoint.upgrade_meta` reads old ones)::

    kind        "charlm" | "seq2seq" | ...      what the job is
    step        optimizer steps taken
    config      the model's configuration (enough to rebuild it)
    train       the training configuration (the CLI flags)
    optimizer   optimizer hyperparameters and step count (its arrays are the "optim" tensors)
    best        best value of the job's metric so far (None before the first evaluation)
    eval        the latest evaluation record
    first_loss  the first step's loss (the explosion guard's reference)
    + the job's own keys (vocabulary, RNG state, data position, ...)

log.jsonl holds one JSON object per line: train records ``{"step", "train_loss", "lr",
"items_per_sec", "time"}`` and evaluation records ``{"step", "time", **job.evaluate()}``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from bptt import checkpoint as ckpt
from bptt.nn.optim import clip_grad_norm, clip_grad_value

__all__ = ["Job", "StepResult", "LoopConfig", "Trainer", "TrainingError"]


class TrainingError(ValueError):
    """Training stopped for a reason the user must hear about (NaN loss, explosion)."""


class StepResult(NamedTuple):
    loss: float  # mean loss of the step (what the gradient is the gradient of)
    items: int  # predicted items (characters, tokens) the loss averages over
    stats: dict | None = None  # extra fields for this step's log record (e.g. hidden-state statistics)


class Job(Protocol):
    """What an application hands the loop."""

    kind: str  # checkpoint kind
    model: Any  # a bptt Module
    optimizer: Any  # a bptt.nn.optim.Optimizer
    schedule: Any  # step -> learning rate
    metric: str  # the evaluate() key that decides "best"
    higher_is_better: bool

    def forward_backward(self, step: int) -> StepResult: ...  # fills model.grads
    def evaluate(self) -> dict: ...  # {metric: value, ...}
    def report(self, step: int, record: dict) -> list[str]: ...  # lines to show after an evaluation
    def log_fields(self, step: int) -> dict: ...  # extra fields of a train record (e.g. the epoch)
    def checkpoint_meta(self) -> dict: ...  # the job's own meta keys
    def checkpoint_tensors(self) -> dict: ...  # the job's own tensor namespaces (beside model, optim)


class LoopConfig(NamedTuple):
    out_dir: Path
    max_steps: int
    max_minutes: float = 0.0  # 0: no time limit
    eval_every: int = 1000
    log_every: int = 10
    grad_clip: float = 0.0  # 0: off
    clip_mode: str = "norm"  # norm | value
    progress: bool = True
    last_name: str = "last.safetensors"
    best_name: str | None = "best.safetensors"  # None: the job keeps only the latest checkpoint
    explode_factor: float = 3.0  # a loss above this multiple of the first loss stops the run
    plot: bool = True


# Redrawing loss.png costs 0.2 s (0.9 s the first time, importing matplotlib) and grows with the
# log; with frequent evaluations it adds up, so it is redrawn at most this often, and at the end.
PLOT_EVERY_SECONDS = 30.0


class Trainer:
    """Runs a :class:`Job` under a :class:`LoopConfig`; :meth:`run` returns a summary dict."""

    def __init__(self, job: Job, cfg: LoopConfig, train_config: dict, log=None, world=None):
        self.job, self.cfg, self.train_config = job, cfg, train_config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.world = world  # bptt.dist world for data parallel; None: one process
        self.step = 0
        self.best = None
        self.first_loss = None
        self.last_eval: dict | None = None
        self.saved_at: dict[Path, int] = {}  # checkpoint path -> the step it holds, once written
        self._last_plot = -math.inf
        self.bar = None

    @property
    def is_main(self) -> bool:
        return self.world is None or self.world.is_main

    @property
    def last_path(self) -> Path:
        return self.cfg.out_dir / self.cfg.last_name

    @property
    def best_path(self) -> Path | None:
        return self.cfg.out_dir / self.cfg.best_name if self.cfg.best_name else None

    # ------------------------------------------------------------------ checkpoints
    def restore(self, tensors: dict, meta: dict) -> None:
        """Continue from a checkpoint's weights, optimizer state and counters (meta already upgraded)."""
        self.job.model.load_state_dict(tensors["model"])
        self.job.optimizer.load_state_dict(tensors.get("optim", {}), meta["optimizer"])
        self.step = int(meta["step"])
        self.best = meta.get("best")
        self.first_loss = meta.get("first_loss")
        self.last_eval = meta.get("eval")

    def save(self, path: Path) -> None:
        if not self.is_main:
            return
        arrays, opt_meta = self.job.optimizer.state_dict()
        tensors = {"model": self.job.model.state_dict(), "optim": arrays, **self.job.checkpoint_tensors()}
        meta = {
            "kind": self.job.kind,
            "step": self.step,
            "config": self.job.model.config.to_dict(),
            "train": self.train_config,
            "optimizer": opt_meta,
            "best": self.best,
            "metric": self.job.metric,
            "eval": self.last_eval,
            "first_loss": self.first_loss,
            **self.job.checkpoint_meta(),
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        ckpt.save_checkpoint(path, tensors, meta)
        self.saved_at[path] = self.step

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        job, cfg = self.job, self.cfg
        model, optimizer = job.model, job.optimizer
        log_file = open(cfg.out_dir / "log.jsonl", "a", encoding="utf-8") if self.is_main else None
        start = time.time()
        deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        self.bar = self._progress_bar()
        stop_reason = "finished"
        window = _Window(time.time())
        model.train()
        try:
            while self.step < cfg.max_steps:
                if time.time() >= deadline:
                    stop_reason = "time limit"
                    if self.saved_at.get(self.last_path) != self.step:  # steps since the last evaluation:
                        self._evaluate_and_save(log_file, start)  # evaluate them too (best, sample)
                    break
                optimizer.lr = job.schedule(self.step)
                optimizer.zero_grad()
                result = job.forward_backward(self.step)
                self._check_loss(result.loss)
                if self.world is not None:
                    self.world.allreduce_grads(model)
                if cfg.grad_clip:
                    (clip_grad_norm if cfg.clip_mode == "norm" else clip_grad_value)(model, cfg.grad_clip)
                optimizer.step()
                self.step += 1

                window.add(result)
                if result.stats and log_file:
                    log_file.write(json.dumps({"step": self.step, **result.stats}) + "\n")
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log_train(log_file, window, start)
                    window = _Window(time.time())
                self._advance_bar(start, deadline)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    self._evaluate_and_save(log_file, start)
                    window.start = time.time()  # items per second count training time only
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        finally:
            if self.bar is not None:
                self.bar.close()
            if log_file:
                log_file.close()
            self._plot(force=True)
        if stop_reason != "finished":
            if self.saved_at.get(self.last_path) != self.step:
                self.save(self.last_path)  # every step above is complete, so this state resumes exactly
            self.log(f"{stop_reason}: saved {self.last_path} at step {self.step}")
        summary = {"steps": self.step, "best": self.best, "metric": job.metric, "stop_reason": stop_reason,
                   "minutes": (time.time() - start) / 60, "out": str(cfg.out_dir), "eval": self.last_eval}
        if stop_reason == "interrupted":
            raise KeyboardInterrupt
        return summary

    def _check_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {self.step}; stopping (the last checkpoint is kept)")
        if self.first_loss is None:
            self.first_loss = loss
        elif loss > self.cfg.explode_factor * self.first_loss:
            raise TrainingError(f"loss is exploding ({loss:.3f} > {self.cfg.explode_factor:g} x the first loss "
                                f"{self.first_loss:.3f}) at step {self.step}; stopping (the last checkpoint is "
                                f"kept). Try a lower --lr")

    def _log_train(self, log_file, window, start) -> None:
        if not window.steps:
            return
        record = {"step": self.step, "train_loss": window.loss / window.steps, "lr": self.job.optimizer.lr,
                  "items_per_sec": window.items / max(time.time() - window.start, 1e-9), "time": time.time() - start}
        record |= self.job.log_fields(self.step)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", ips=f"{record['items_per_sec']:,.0f}")

    def _evaluate_and_save(self, log_file, start) -> None:
        job = self.job
        result = job.evaluate()
        value = result.get(job.metric)
        if value is not None and not math.isfinite(value):
            raise TrainingError(f"validation {job.metric} is {value} at step {self.step}; stopping "
                                f"(the last checkpoint is kept)")
        record = {"step": self.step, "time": time.time() - start, **result}
        self.last_eval = record
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        improved = value is not None and (self.best is None or
                                          (value > self.best if job.higher_is_better else value < self.best))
        if improved:
            self.best = value
            if self.best_path is not None:
                self.save(self.best_path)
        self.save(self.last_path)
        if self.is_main:
            for line in job.report(self.step, record | {"improved": improved}):
                self._print(line)
        self._plot()

    # ------------------------------------------------------------------ progress and plots
    def _progress_bar(self):
        if not self.cfg.progress or not self.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                    smoothing=0.05)

    def _advance_bar(self, start, deadline) -> None:
        """One step done; with a time limit the total follows whichever limit will stop the run first."""
        bar = self.bar
        if bar is None:
            return
        if math.isfinite(deadline):
            done = self.step - bar.initial
            elapsed = time.time() - start
            if done >= 5 and elapsed > 0:
                by_time = self.step + int(done / elapsed * max(deadline - time.time(), 0.0))
                total = min(self.cfg.max_steps, max(by_time, self.step))
                if total != bar.total:
                    bar.total = total
        bar.update(1)

    def _print(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def _plot(self, force=False) -> None:
        if not self.cfg.plot or not self.is_main:
            return
        if not force and time.time() - self._last_plot < PLOT_EVERY_SECONDS:
            return
        from bptt.viz import plot_training_log

        plot_training_log(self.cfg.out_dir / "log.jsonl", self.cfg.out_dir / "loss.png")
        self._last_plot = time.time()


class _Window:
    """Train losses accumulated between two log records."""

    def __init__(self, start: float):
        self.start, self.loss, self.items, self.steps = start, 0.0, 0, 0

    def add(self, result: StepResult) -> None:
        self.loss += result.loss
        self.items += result.items
        self.steps += 1
