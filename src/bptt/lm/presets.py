"""Time-budget presets of ``bptt train --preset small|medium``: settings for a budget, fitted to the corpus.

A preset is for a budget of wall-clock time on the machine at hand (``small``: 5 minutes, ``medium``:
30), not for one corpus: the recipe (a 2-layer LSTM, the optimizer, a cosine schedule, norm clipping,
window and batch) is fixed, and what must follow the corpus and the machine is chosen when the run starts,
after a few timed steps.  Shape legend: H hidden units, L layers, g gates (4 LSTM, 3 GRU, 1 RNN),
V vocabulary, E embedding size (0: one-hot input), D training characters (units), T window, N batch.

The rule, with its reasons::

    cost      A training step does ~6 FLOPs per multiply-add of the forward per character (forward 2,
              backward 4), with M(H) = [g H E] + g H² + (L − 1) g H (2H) + H V forward multiply-adds a
              character (one-hot input: a row gather, no product).  κ(H) = 6 M(H) N T / t_step(H) is
              the FLOP rate the machine reaches on that model, t_step measured (``StepTimer``).
    C(H)      characters the budget buys:  C(H) = budget · κ(H) / (6 M(H)).
    P(H)      the parameter count (embedding, every layer's weights and biases, the decoder).

    hidden    the largest H of HIDDEN_SIZES with
                  C(H) ≥ CHARS_PER_PARAM · P(H), or       (1) not undertrained: the run sees enough
                  C(H) ≥ CHARS_PER_PARAM_REREAD · P(H)        characters, fewer if it rereads the text
                      if C(H) ≥ REREAD_PASSES · D              REREAD_PASSES times or more
                  P(H) ≤ PARAMS_PER_CHAR · D              (2) not overtrained: no more weights than
                                                              the text holds
              (the smallest size if none fits).  C(H)/P(H) as the rule computes it (steps timed without
              dropout).  (1) has two regimes, measured in 5-minute runs (BENCHMARKS P1, P2, P5-P7).  A
              text read fewer than six times is no limit, the budget is, and a smaller model that takes
              more steps ends lower: on the 4 MB stdlib source 2×256 at 8.2 characters per parameter
              reached 1.4899, 2×192 at 24 1.2540, 2×128 at 93 1.3016 — so 20 is asked.  A text read
              six times or more limits a small model instead, and the compute is better spent on a
              larger one held back by dropout: on tinyshakespeare 2×256 at 11 (10 passes) reached
              1.5353 against 2×192 at 35 (18 passes) 1.5431, and in 30 minutes 2×448 at 7.7 and 2×512
              at 5.4 (16-20 passes) are the best models found (1.4520, 1.4470) — so 5 is enough there.
              (2): a model with many more weights than training characters memorises them; Q1 (3.3
              parameters per character of a 1 MB text, with dropout 0.3) is the largest ratio known to
              generalise, so 4 is the cap.
    dropout   by E = S·N·T / D, the passes over the text the run will make: 0 below 3 (a model that
              sees each character once or twice is far from memorising them: dropout would only slow
              it), 0.1 below 6, 0.2 below 12, else 0.3 (Q1's, at 15 passes).  A judgement between the
              two measured ends, to be checked by the runs.
    steps S   the cosine schedule's length, matched to the budget:  S = ⌊TIME_MARGIN · budget / (t_step +
              t_eval / eval_every)⌋, t_eval the measured cost of one evaluation's windows plus
              EVAL_OVERHEAD (checkpoints, sample, plot).  The schedule stays a
              function of the step (a resumed run and MPI ranks agree, a rerun with the printed
              --max-iters is the same run); --max-time still stops the run if the machine slows down.
    evaluation  every S/10 steps, over at most EVAL_CHARS characters of the validation split.

Flags the user gives override the preset's values, and the rule then works from them (``--hidden 512
--preset medium`` keeps 512 and fits the dropout and the steps to it; ``--max-time 10`` is the budget).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from bptt.lm.evaluate import evaluate
from bptt.nn.gates import gate_count
from bptt.nn.optim import clip_grad_norm, make_optimizer

__all__ = ["Preset", "PRESETS", "HIDDEN_SIZES", "CHARS_PER_PARAM", "CHARS_PER_PARAM_REREAD", "REREAD_PASSES",
           "PARAMS_PER_CHAR", "TIME_MARGIN", "EVAL_CHARS", "EVAL_OVERHEAD", "Corpus", "StepTimes", "forward_macs",
           "parameters", "choose_hidden", "chars_per_param_needed", "choose_dropout", "cosine_steps", "FITTED",
           "fixed_settings", "preset_fields", "fit", "StepTimer", "as_flags"]

HIDDEN_SIZES = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 1024)
CHARS_PER_PARAM = 20.0  # rule (1), a text read fewer than REREAD_PASSES times
CHARS_PER_PARAM_REREAD = 5.0  # rule (1), a text read REREAD_PASSES times or more
REREAD_PASSES = 6.0
PARAMS_PER_CHAR = 4.0  # rule (2)
DROPOUT_BY_PASSES = ((3.0, 0.0), (6.0, 0.1), (12.0, 0.2), (math.inf, 0.3))
TIME_MARGIN = 0.95  # of the budget the schedule is sized for: the rest absorbs a slower minute
EVAL_CHARS = 128_000  # the most validation characters read at each evaluation (tinyshakespeare's 111 k: all)
EVAL_OVERHEAD = 1.0  # seconds an evaluation spends besides its windows: two checkpoints, a sample, the plot
FITTED = ("hidden", "max_iters", "warmup_iters", "eval_every", "eval_windows", "dropout")  # what fit() chooses


@dataclass(frozen=True)
class Preset:
    """The fixed part of a preset: the budget and the recipe (fields of ``TrainConfig``)."""

    name: str
    minutes: float
    seq_len: int
    batch_size: int
    optimizer: str

    def recipe(self) -> dict:
        """TrainConfig fields this preset sets before the corpus is read."""
        return {"model": "lstm", "layers": 2, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "optimizer": self.optimizer, "lr": 2e-3, "schedule": "cosine", "min_lr": 1e-4, "clip_mode": "norm",
                "grad_clip": 5.0, "max_time": self.minutes}


PRESETS = {
    # BENCHMARKS U1's window and batch; RMSprop (char-rnn's, alpha 0.95), not Adam: in 5 minutes at equal
    # size it reached 1.2035 against Adam's 1.3016 on the stdlib source, 1.5375 in 4.5 minutes against
    # 1.5353 in 5.0 on tinyshakespeare (rows P5, P8, P9)
    "small": Preset("small", 5.0, seq_len=64, batch_size=32, optimizer="rmsprop"),
    "medium": Preset("medium", 30.0, seq_len=100, batch_size=64, optimizer="adam"),  # Q1's; RMSprop not tried at 30 min
}


class Corpus(NamedTuple):
    """What the rule reads of the data: training and validation units, vocabulary, steps per pass."""

    train: int
    val: int
    vocab: int
    steps_per_epoch: int


class StepTimes(NamedTuple):
    step: float  # seconds per training step (forward, backward, clip, optimizer step)
    eval_window: float  # seconds per validation window (forward only)


# ============================================================================ the arithmetic


def forward_macs(model: str, H: int, L: int, V: int, E: int = 0) -> int:
    """M(H): multiply-adds of the forward per character (see the module doc)."""
    g = gate_count(model if model != "rnn" else "rnn_tanh")
    return g * H * E + g * H * H + (L - 1) * g * H * 2 * H + H * V


def parameters(model: str, H: int, L: int, V: int, E: int = 0, tied: bool = False) -> int:
    """P(H): every parameter of the char model (embedding, weights and both biases per layer, decoder)."""
    g = gate_count(model if model != "rnn" else "rnn_tanh")
    D0 = E or V
    rnn = g * H * (D0 + H) + (L - 1) * g * H * 2 * H + 2 * g * H * L
    return V * E + rnn + (0 if tied else H * V) + V


def choose_hidden(budget: float, corpus: Corpus, seconds_per_char: Callable[[int], float],
                  params: Callable[[int], int]):
    """The largest size of HIDDEN_SIZES that rules (1) and (2) allow, with P(H) = ``params(H)`` and
    C(H) = budget / ``seconds_per_char(H)`` → (H, C(H), P(H))."""
    for H in reversed(HIDDEN_SIZES):
        P, C = params(H), budget / seconds_per_char(H)
        if P <= PARAMS_PER_CHAR * corpus.train and C >= chars_per_param_needed(C / corpus.train) * P:
            return H, C, P
    H = HIDDEN_SIZES[0]
    return H, budget / seconds_per_char(H), params(H)


def chars_per_param_needed(passes: float) -> float:
    """Rule (1)'s threshold for a run that reads its training text ``passes`` times."""
    return CHARS_PER_PARAM_REREAD if passes >= REREAD_PASSES else CHARS_PER_PARAM


def choose_dropout(passes: float) -> float:
    """Dropout for a run that reads its training text ``passes`` times."""
    return next(p for limit, p in DROPOUT_BY_PASSES if passes < limit)


def cosine_steps(budget: float, times: StepTimes, eval_windows: int, eval_every: int) -> int:
    """S: the steps that fill TIME_MARGIN of the budget, evaluations included (see the module doc)."""
    eval_seconds = eval_windows * times.eval_window + EVAL_OVERHEAD
    return max(1, int(TIME_MARGIN * budget / (times.step + eval_seconds / max(eval_every, 1))))


# ============================================================================ resolving a preset


def fixed_settings(name: str, explicit: set[str]) -> dict:
    """The preset's recipe, less the fields the user set (applied before the corpus is read)."""
    return {k: v for k, v in PRESETS[name].recipe().items() if k not in explicit}


def preset_fields(name: str) -> set[str]:
    """Every TrainConfig field the preset sets: its recipe and what :func:`fit` chooses."""
    return set(PRESETS[name].recipe()) | set(FITTED)


def fit(cfg, explicit: set[str], corpus: Corpus, measure: Callable[[int, float], StepTimes]):
    """A preset's corpus- and machine-dependent settings for ``cfg`` (a TrainConfig that already has
    :func:`fixed_settings`), less the fields in ``explicit`` → (settings dict, lines to print).

    ``measure(H, dropout)`` → :class:`StepTimes` of the model with hidden size H and that dropout (a
    :class:`StepTimer`, or a model of the machine in tests).  Sizes are timed with the dropout the user
    gave (0 by default); once the rule has chosen a dropout > 0, the chosen size is timed again with it
    (dropout's masks cost 10-15% of a step at 2x256-2x448) and the schedule is fitted to that time.  At
    most five calls.
    """
    budget = cfg.max_time * 60.0
    chars_per_step = cfg.seq_len * cfg.batch_size
    times: dict[int, StepTimes] = {}

    def macs(H):
        return forward_macs(cfg.model, H, cfg.layers, corpus.vocab, cfg.embedding)

    def params(H):
        return parameters(cfg.model, H, cfg.layers, corpus.vocab, cfg.embedding, cfg.tie_weights)

    def seconds_per_char(H):  # measured, or scaled by M(H) from the nearest measured size
        near = min(times, key=lambda h: abs(h - H))
        return times[near].step / chars_per_step * macs(H) / macs(near)

    out, notes = {}, []
    if "hidden" in explicit:
        H = cfg.hidden
        times[H] = measure(H, cfg.dropout)
    else:
        times[256] = measure(256, cfg.dropout)
        while True:
            H, _, _ = choose_hidden(budget, corpus, seconds_per_char, params)
            if H in times or len(times) == 4:
                break
            times[H] = measure(H, cfg.dropout)
        out["hidden"] = H
    C = budget / seconds_per_char(H)
    P = params(H)
    t = times.get(H) or StepTimes(seconds_per_char(H) * chars_per_step, times[min(times)].eval_window)
    kappa = 6 * macs(H) * chars_per_step / t.step
    timed = "measured" if H in times else "estimated"
    notes.append(f"{cfg.layers}x{H} {cfg.model}, {P / 1e6:.2f} M parameters; {timed} {t.step:.3f} s a step "
                 f"({kappa / 1e9:.0f} GFLOP/s), so {cfg.max_time:g} min buy {C / 1e6:.1f} M characters = "
                 f"{C / P:.1f} per parameter in {C / corpus.train:.1f} passes (rule: >= "
                 f"{chars_per_param_needed(C / corpus.train):g}); {P / corpus.train:.2f} parameters "
                 f"per training character (rule: <= {PARAMS_PER_CHAR:g})")

    val_windows = corpus.val // chars_per_step
    windows = cfg.eval_windows if "eval_windows" in explicit else (
        0 if val_windows * chars_per_step <= EVAL_CHARS else max(1, EVAL_CHARS // chars_per_step))
    if "eval_windows" not in explicit:
        out["eval_windows"] = windows
    per_eval = windows or val_windows
    epoch_cap = int(cfg.max_epochs * corpus.steps_per_epoch) if cfg.max_epochs else math.inf  # --max-epochs
    fits_schedule = cfg.schedule == "cosine" and "max_iters" not in explicit

    def schedule(t: StepTimes) -> dict:
        """max_iters, eval_every and warmup_iters for a step of t (those the user did not give)."""
        chosen = {}
        if fits_schedule:
            eval_every = cfg.eval_every if "eval_every" in explicit else None
            steps = min(epoch_cap, cosine_steps(budget, t, per_eval, eval_every or 100))
            if eval_every is None:  # ten evaluations over the run
                eval_every = max(10, steps // 10 // 10 * 10)
                steps = min(epoch_cap, cosine_steps(budget, t, per_eval, eval_every))
                chosen["eval_every"] = eval_every
            chosen["max_iters"] = steps
            if "warmup_iters" not in explicit:
                chosen["warmup_iters"] = min(100, max(1, steps // 20))
        elif "eval_every" not in explicit:
            chosen["eval_every"] = max(10, int(min(epoch_cap, budget / t.step)) // 10 // 10 * 10)
        return chosen

    out |= schedule(t)
    steps = out.get("max_iters", cfg.max_iters)
    seen = (steps or min(epoch_cap, budget / t.step)) * chars_per_step
    passes = seen / corpus.train
    dropout = cfg.dropout if "dropout" in explicit else choose_dropout(passes)
    if "dropout" not in explicit:
        out["dropout"] = dropout
    retimed = ""
    if dropout > 0 and cfg.dropout == 0 and fits_schedule:  # timed without the masks: time them
        t = measure(H, dropout)
        out |= schedule(t)
        again = out["max_iters"] * chars_per_step / corpus.train
        retimed = f"; timed again with it: {t.step:.3f} s a step, so {again:.1f} passes"
    notes.append(f"{passes:.1f} passes over {corpus.train:,} training characters: dropout {dropout:g}{retimed}")
    if fits_schedule:
        notes.append(f"cosine schedule over {out['max_iters']} steps: {TIME_MARGIN:.0%} of the budget at "
                     f"{t.step:.3f} s a step and {t.eval_window:.3f} s a validation window ({per_eval} windows an "
                     f"evaluation)")
    return out, notes


def as_flags(settings: dict) -> str:
    """``--name value`` for each setting, as the user would type them."""
    return " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                    for k, v in settings.items())


# ============================================================================ timing a few steps


class StepTimer:
    """``timer(H, dropout)`` → :class:`StepTimes` of a model built by ``make_model(H, dropout)``, trained
    for a few steps on the run's own windows (``batches.window(k)``), and evaluated on one validation window.

    The model and its optimizer are thrown away: the run starts from its own seed, untouched.  One
    untimed step first (compiling the kernels the first time); then steps until ``seconds`` have
    passed (at least 3, at most 20), of which the median is the step's time.  With a data-parallel
    ``world`` (:mod:`bptt.dist`) every rank times the step it will run — its share of the streams, one
    BLAS thread, the gradients' Allreduce — and the ranks agree on the number of steps and on the mean
    of their medians, so that they all fit the same run.
    """

    def __init__(self, make_model, batches, val_batches, lr: float = 2e-3, seconds: float = 1.0, world=None,
                 optimizer: str = "adam"):
        self.make_model, self.batches, self.val_batches = make_model, batches, val_batches
        self.lr, self.seconds, self.optimizer = lr, seconds, optimizer
        self.world = world if world is not None and world.size > 1 else None

    def __call__(self, H: int, dropout: float = 0.0) -> StepTimes:
        model = self.make_model(H, dropout)
        optimizer = make_optimizer(self.optimizer, model, self.lr)
        world, N = self.world, self.batches.batch_size
        cols = slice(None) if world is None else world.shard(N)  # this rank's streams
        weight = 1.0 if world is None else world.weight(N)
        state, k, spent, done, steps = None, 0, 0.0, -1, []
        while done < 3 or (spent < self.seconds and done < 20):
            w = self.batches.window(k % len(self.batches))
            x, y = np.ascontiguousarray(w.x[:, cols]), np.ascontiguousarray(w.y[:, cols])
            t0 = time.perf_counter()
            with model.blas_scope(*x.shape):
                optimizer.zero_grad()
                _, dlogits, state = model.loss(x, y, state)
                model.backward(dlogits)
            if world is not None:
                world.allreduce_grads(model, weight)
            clip_grad_norm(model, 5.0)
            optimizer.step()
            if done >= 0:
                steps.append(time.perf_counter() - t0)
                spent += steps[-1]
            if world is not None:  # one decision for all ranks: the mean time so far
                spent = self._agreed_mean(spent)
            done, k = done + 1, k + 1
        step = float(np.median(steps))  # a step slowed by something else (a spike) does not move it
        if world is not None:
            step = self._agreed_mean(step)
        eval_window = 0.0
        if self.val_batches is not None:
            evaluate(model, self.val_batches, 1, world=world)  # untimed: the eval-mode path's first call
            t0 = time.perf_counter()
            evaluate(model, self.val_batches, 1, world=world)
            eval_window = time.perf_counter() - t0
            if world is not None:
                eval_window = self._agreed_mean(eval_window)
        return StepTimes(float(step), float(eval_window))

    def _agreed_mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks, bit for bit the same on every rank (rank 0's: with more
        than two ranks an Allreduce may round differently on different ranks, and every rank must make
        the same choices from these times)."""
        return self.world.broadcast_object(self.world.allreduce_sum(value) / self.world.size)
