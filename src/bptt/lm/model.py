"""A character-level language model (char-rnn): input → stacked RNN/LSTM/GRU → dropout → linear → softmax.

Shape legend: T time steps, N batch streams, V vocabulary, E embedding size
(E = V for one-hot input), H hidden units, L layers.

Forward, for ids x (T, N) and targets y (T, N)::

    e      = onehot(x) or Embedding(x)                      (T, N, E)
             (embedding_dropout: whole rows of the embedding dropped, e = (W_e ⊙ m)[x], m (V, 1))
    h, s   = RNN(e, s₀)                                     (T, N, H), final state s
    z      = dropout(h) W_decᵀ + b_dec                      (T, N, V)   logits  (tie_weights: W_dec = W_e)
    loss   = −mean log softmax(z)[y]                        nats per character

or, with ``adaptive_softmax`` (a large word vocabulary), the decoder is an
:class:`bptt.nn.adaptive.AdaptiveLogSoftmaxWithLoss` on dropout(h): ``loss = −mean log p(y)`` from
each target's own cluster, and the "logits" that ``forward``/``step`` return (for sampling) are the
exact log-probabilities of every unit, log p (T, N, V), whose softmax is the distribution itself.

and backward the same read upwards: ∂L/∂z = (ŷ − onehot(y)) / (T·N), then the
decoder, the dropout mask, the recurrent layer (BPTT) and the embedding.
With truncated BPTT the final state ``s`` becomes the next window's ``s₀``
but no gradient flows back through it.

Parameter names follow PyTorch module names (``embed.weight``,
``rnn.weight_ih_l0``, ``decoder.weight``...), so a PyTorch model built of
``nn.Embedding`` / ``nn.LSTM`` / ``nn.Linear`` with those attribute names loads
with ``load_state_dict`` unchanged.  With ``tie_weights`` there is one matrix,
``embed.weight``, and the decoder keeps only ``decoder.bias``.  With ``adaptive_softmax`` the
decoder's keys are those of ``nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs, div_value,
head_bias=True)`` named ``decoder``: ``decoder.head.weight``, ``decoder.head.bias``,
``decoder.tail.{i}.0.weight``, ``decoder.tail.{i}.1.weight``.  Tied weights and the adaptive
softmax do not combine (the adaptive softmax has no (V, H) matrix to share with the embedding).

The recurrent layer's regularisers (``recurrent_dropout``, ``input_dropout``, ``output_dropout``,
``weight_drop``, ``zoneout``, ``layer_norm``, ``peephole``) are options of
:class:`bptt.nn.rnn.RNNBase` (:mod:`bptt.nn.regularized_loop`): input and output dropout and weight
drop alone keep the layer on its compiled path, the others run the NumPy loop.
``embedding_dropout`` and ``tie_weights`` live here (AWD-LSTM, Merity et al. 2017; tying: Inan et al.
2017, Press & Wolf 2017).  With a learned embedding, ``input_dropout`` drops embedding units (one mask
per stream, AWD-LSTM's dropouti) and the layer-to-layer inputs; ``output_dropout`` drops units of the
top layer's output per stream, before the decoder's own ``dropout`` (per step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from bptt.config import DictConfig
from bptt import checkpoint as ckpt
from bptt.nn.cells import resolve_rng
from bptt.nn.adaptive import AdaptiveLogSoftmaxWithLoss
from bptt.nn.gates import gate_slice
from bptt.nn.layers import Dropout, Embedding, Linear
from bptt.nn.batch_slices import join_streams, select_streams
from bptt.nn.rnn import GRU, LSTM, RNN
from bptt.nn.losses import cross_entropy
from bptt.nn.module import Module
from bptt.nn.ops import affine_backward, affine_forward_then
from bptt.nn.regularized_loop import check_options
from bptt.runtime import policy
from bptt.runtime.threads import cores_each, keep_freed_memory
from bptt.runtime.wavefront import run_parallel

__all__ = ["CharLMConfig", "CharLM", "CHECKPOINT_KIND", "load_model", "build_model", "config_from_dict", "model_context",
           "default_cutoffs"]

CHECKPOINT_KIND = "charlm"


def default_cutoffs(vocab_size: int) -> list[int]:
    """An adaptive softmax's cutoffs for V units sorted by frequency: the head holds the V/15 most
    frequent, cluster 0 the next ones up to V/3, cluster 1 the rest (2,000 and 10,000 at V = 30,000;
    Grave et al. cut so that the head covers most of the text).  Fewer cutoffs when V is too small
    for two distinct ones in [1, V − 1]."""
    return sorted({c for c in (vocab_size // 15, vocab_size // 3) if 1 <= c <= vocab_size - 1}) or [1]


@dataclass
class CharLMConfig(DictConfig):
    """Everything needed to rebuild a CharLM (saved in every checkpoint)."""

    vocab_size: int
    model: str = "lstm"  # lstm | gru | rnn (tanh)
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.0  # between recurrent layers and before the decoder (char-rnn's placement)
    embedding: int = 0  # 0 = one-hot input (char-rnn), else a learned embedding of this size
    init: str = "torch"  # torch: U(±1/√H) | charrnn: U(±0.08)
    forget_bias: float = 0.0  # added to the LSTM forget-gate biases after init (char-rnn uses 1)
    dtype: str = "float32"
    # regularisers of the recurrent layer (bptt.nn.regularized_loop); all off: the torch-exact layer
    recurrent_dropout: float = 0.0  # variational dropout of h_{t−1} in the recurrent product
    weight_drop: float = 0.0  # DropConnect on W_hh, one mask per window
    zoneout: float = 0.0  # zoneout of h (and c)
    layer_norm: bool = False  # layer-normalised gates (and c, LSTM)
    peephole: bool = False  # LSTM peepholes
    input_dropout: float = 0.0  # variational dropout of every layer's input, one mask per stream
    output_dropout: float = 0.0  # variational dropout of the top layer's output, one mask per stream
    # of the model itself
    embedding_dropout: float = 0.0  # drop whole rows of the embedding (a character vanishes everywhere)
    tie_weights: bool = False  # decoder weight = embedding weight (needs embedding == hidden)
    # the output layer: a full softmax over V, or an adaptive softmax (bptt.nn.adaptive) with these cutoffs
    adaptive_softmax: bool = False
    cutoffs: list = field(default_factory=list)  # increasing ids in [1, V − 1] where the clusters start
    div_value: float = 4.0  # cluster i projects h to ⌊H / div_value^(i+1)⌋ features

    def rnn_options(self) -> dict:
        """The recurrent layer's regulariser options (constructor keywords)."""
        return {"recurrent_dropout": self.recurrent_dropout, "weight_drop": self.weight_drop, "zoneout": self.zoneout,
                "layer_norm": self.layer_norm, "peephole": self.peephole, "input_dropout": self.input_dropout,
                "output_dropout": self.output_dropout}

    def validate(self) -> CharLMConfig:
        problems = []
        if self.model not in ("lstm", "gru", "rnn"):
            problems.append(f"model must be lstm, gru or rnn, got {self.model!r}")
        for name in ("vocab_size", "hidden", "layers"):
            if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.embedding, (int, np.integer)) or self.embedding < 0:
            problems.append(f"embedding must be >= 0 (0 = one-hot), got {self.embedding!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("torch", "charrnn"):
            problems.append(f"init must be torch or charrnn, got {self.init!r}")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64, got {self.dtype!r}")
        if not isinstance(self.embedding_dropout, (int, float)) or not 0.0 <= self.embedding_dropout < 1.0:
            problems.append(f"embedding_dropout must be a number in [0, 1), got {self.embedding_dropout!r}")
        elif self.embedding_dropout and not self.embedding:
            problems.append("embedding_dropout needs a learned embedding (embedding > 0; one-hot input has none)")
        if self.tie_weights and self.embedding != self.hidden:
            problems.append(f"tie_weights needs embedding == hidden (the decoder's weight is the embedding's), "
                            f"got embedding {self.embedding} and hidden {self.hidden}")
        if self.adaptive_softmax:
            V, cut = self.vocab_size, self.cutoffs
            if (not isinstance(cut, (list, tuple)) or not cut
                    or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in cut)
                    or list(cut) != sorted(set(cut)) or cut[0] < 1 or cut[-1] > V - 1):
                problems.append(f"cutoffs must be increasing whole numbers in [1, V - 1] = [1, {V - 1}] "
                                f"(V = {V} units), got {cut!r}")
            if not (isinstance(self.div_value, (int, float)) and np.isfinite(self.div_value) and self.div_value > 0):
                problems.append(f"div_value must be a finite number > 0, got {self.div_value!r}")
            if self.tie_weights:
                problems.append("tie_weights and adaptive_softmax do not combine: tying shares the decoder's (V, H) "
                                "weight with the embedding, and an adaptive softmax has no such matrix")
        elif self.cutoffs:
            problems.append(f"cutoffs {self.cutoffs!r} apply to an adaptive softmax only (adaptive_softmax is off)")
        if self.model in ("lstm", "gru", "rnn"):
            try:
                check_options(self.model, **self.rnn_options())
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        self.cutoffs = [int(c) for c in self.cutoffs or []]  # a plain list of ints (JSON), however it was given
        return self

    @classmethod
    def from_dict(cls, d: dict) -> CharLMConfig:
        return super().from_dict(d).validate()


class CharLM(Module):
    """Character language model with hand-written backward through every piece.

    ``forward(x, state=None)`` → ``(logits (T, N, V), final state)``;
    ``loss(x, y, state)`` → ``(loss, final state)`` and saves ``∂L/∂logits``;
    ``backward(dlogits=None)`` pushes the gradient down to every parameter;
    ``step(ids)`` → logits (N, V) for sampling, keeping the state between calls.
    """

    def __init__(self, config: CharLMConfig, rng=None):
        super().__init__()
        self.config = config.validate()
        dtype = np.dtype(config.dtype)
        self.rng = resolve_rng(rng)  # one generator for init and every dropout mask (saved for resume)
        V, H = config.vocab_size, config.hidden
        E = config.embedding or V
        self.embed = self.add_module("embed", Embedding(V, E, dtype=dtype, rng=self.rng)) if config.embedding else None
        layer_cls = {"lstm": LSTM, "gru": GRU, "rnn": RNN}[config.model]
        self.rnn = self.add_module("rnn", layer_cls(E, H, num_layers=config.layers, dropout=config.dropout,
                                                    dtype=dtype, rng=self.rng, **config.rnn_options()))
        self.drop = self.add_module("drop", Dropout(config.dropout, rng=self.rng))
        if config.adaptive_softmax:
            self.decoder = self.add_module("decoder", AdaptiveLogSoftmaxWithLoss(
                H, V, config.cutoffs, config.div_value, head_bias=True, dtype=dtype, rng=self.rng))
        elif config.tie_weights:
            self.decoder = self.add_module("decoder", TiedDecoder(self.embed, H, dtype=dtype, rng=self.rng))
        else:
            self.decoder = self.add_module("decoder", Linear(H, V, dtype=dtype, rng=self.rng))
        if config.init == "charrnn":
            for name, p, _ in self.named_parameters():
                if ".ln_" not in name:  # layer-norm gains stay 1 and biases 0
                    p[...] = self.rng.uniform(-0.08, 0.08, size=p.shape)
        if config.model == "lstm" and config.forget_bias:
            # with layer norm, b_ih sits inside LN_ih (normalised away): the shift goes to LN_ih's bias β
            target = "ln_ih_bias" if config.layer_norm else "bias_ih"
            for name, p, _ in self.rnn.named_parameters():
                if name.startswith(target):
                    p[gate_slice("lstm", "f", H)] += config.forget_bias
        self._row_keep = None  # (T, N, 1) embedding-dropout factors of the last forward's rows

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def extra_repr(self):
        c = self.config
        inp = f"embedding {c.embedding}" if c.embedding else "one-hot"
        extra = "".join(f", {k}={v}" for k, v in (c.rnn_options() | {"embedding_dropout": c.embedding_dropout,
                                                                         "tie_weights": c.tie_weights}).items() if v)
        if c.adaptive_softmax:
            extra += f", adaptive softmax (cutoffs {c.cutoffs}, div_value {c.div_value:g})"
        return f"{c.model} {c.layers}x{c.hidden}, V={c.vocab_size}, {inp}, dropout={c.dropout}{extra}"

    def inputs(self, ids):
        """The recurrent layer's input: embeddings, or one-hot vectors (T, N, V) built explicitly."""
        if self.embed is not None:
            return self.embed(ids)
        onehot = np.zeros(ids.shape + (self.vocab_size,), self.dtype)
        np.put_along_axis(onehot, ids[..., None], 1.0, axis=-1)
        return onehot

    def blas_scope(self, T, N):
        """Run each training or evaluation step on a (T, N) batch inside this context
        (single-threaded BLAS when the recurrent layers run as a wavefront; see
        :meth:`bptt.nn.rnn.RNNBase.blas_scope`)."""
        return self.rnn.blas_scope(T, N)

    def forward(self, ids, state=None):
        """ids (T, N) integers in [0, V) → logits (T, N, V), final recurrent state.  With an adaptive
        softmax the "logits" are the log-probabilities log p (T, N, V) (see :meth:`scores`)."""
        h, state = self.hidden(ids, state)
        return self.scores(h), state

    def scores(self, h):
        """The output layer on top-layer outputs h (..., H) → (..., V) scores whose softmax is the
        model's distribution: logits z = h W_decᵀ + b, or with an adaptive softmax the exact
        log-probabilities of every unit (:meth:`AdaptiveLogSoftmaxWithLoss.log_prob`, every cluster)."""
        if not self.config.adaptive_softmax:
            return self.decoder(h)
        return self.decoder.log_prob(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], self.vocab_size)

    def hidden(self, ids, state=None):
        """ids (T, N) → dropout(h) (T, N, H), the decoder's input, and the final recurrent state."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"CharLM expects integer ids of shape (T, N), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if self.embed is not None:
            e = self.embed(ids)
            self._row_keep = None
            if self.training and self.config.embedding_dropout:
                # one mask over the vocabulary per forward: a dropped character is zero at every position
                # (AWD-LSTM's embedded dropout), the kept rows scaled by 1/(1 − p)
                p = self.config.embedding_dropout
                keep = (self.rng.random(self.vocab_size) >= p).astype(e.dtype) / e.dtype.type(1.0 - p)  # (V,)
                self._row_keep = keep[ids][..., None]  # (T, N, 1)
                e = e * self._row_keep
            h, state = self.rnn(e, state)
        else:  # one-hot: the layer takes the indices and gathers rows of W_ih instead of multiplying
            h, state = self.rnn(ids, state, one_hot=True)
        return self.drop(h), state

    def loss(self, ids, targets, state=None):
        """Mean cross-entropy in nats per character → ``(loss, dlogits, final state)``: the loss contract
        of every model (``(loss, dlogits)``, :mod:`bptt.nn.losses`), plus the state a language model carries.

        With an adaptive softmax no (T, N, V) logits exist: the gradient handed back is ∂L/∂log p(y)
        (T, N), −1/(T·N) at every position, which :meth:`backward` takes through the adaptive softmax.
        """
        if not self.config.adaptive_softmax:
            logits, state = self.forward(ids, state)
            loss, dlogits = cross_entropy(logits, targets)
            return loss, dlogits, state
        h, state = self.hidden(ids, state)
        y = self._targets(targets, h.shape[:-1])
        out = self.decoder(h.reshape(-1, h.shape[-1]), y.reshape(-1))
        return out.loss, np.full(y.shape, -1.0 / y.size, h.dtype), state

    def nll(self, ids, targets, state=None, mask=None):
        """Σ −log p(y_t | ids_≤t) over the (T, N) positions (``mask`` (T, N) bool: those that count), in
        nats, and the final state; no gradient.  With an adaptive softmax only each target's cluster
        is evaluated; the log-probabilities are exact either way.  In eval mode, in the recurrent
        layer's batch slices, each through the whole model in a thread of its own (as
        :meth:`train_step`; an evaluation pass 1.025–1.048× faster at 2×128)."""
        ids, targets = np.asarray(ids), np.asarray(targets)
        parts = self._model_slices(ids, targets, mask)
        if len(parts) < 2:
            return self._nll(ids, targets, state, mask)

        def one(model, s):
            return model._nll(ids[:, s], targets[:, s], select_streams(state, s), None if mask is None else mask[:, s])

        sums, state = self._run_sliced(parts, one)
        return float(sum(sums)), state

    def _nll(self, ids, targets, state, mask):
        h, state = self.hidden(ids, state)
        y = self._targets(targets, h.shape[:-1])
        if not self.config.adaptive_softmax:  # each slice of logit rows summed in the thread that made it
            y1 = y.reshape(-1)
            if mask is not None and np.shape(mask) != y.shape:
                raise ValueError(f"mask must have the targets' shape {y.shape}, got {np.shape(mask)}")
            m1 = None if mask is None else np.asarray(mask).reshape(-1)

            def summed(rows, z):
                return cross_entropy(z, y1[rows], mask=None if m1 is None else m1[rows], reduction="sum",
                                     need_grad=False)[0]

            _, sums = self.decoder.forward_then(h, summed)
            return float(sum(sums)), state
        logp = self.decoder(h.reshape(-1, h.shape[-1]), y.reshape(-1)).output.reshape(y.shape)
        keep = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
        return -float(np.sum(logp[keep], dtype=np.float64)), state

    @staticmethod
    def _targets(targets, shape):
        y = np.asarray(targets)
        if y.shape != shape or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"targets must be integer ids of shape {shape}, got {y.dtype} {y.shape}")
        return y

    def backward(self, dlogits, recurrent_scale=None):
        """Backprop from ∂L/∂logits (the ``dlogits`` of :meth:`loss`) into every parameter.

        ``recurrent_scale`` (T,): ARTBP's factors on the gradient carried from step t to t − 1 in
        every layer (see :meth:`bptt.nn.rnn.RNNBase.backward`; the forward must have run with
        ``self.rnn.backend = "reference"``).  Every path from a loss at step u to step t < u crosses
        each boundary t < j ≤ u once, in some layer, so every path gets the factor Π r_j.
        """
        if self.config.adaptive_softmax:  # dlogits = ∂L/∂log p(y) (T, N): J = Σ dlogits · log p(y)
            dh = self.decoder.backward(0.0, dlogits.reshape(-1)).reshape(*dlogits.shape, -1)
        else:
            dh = self.decoder.backward(dlogits)
        dh = self.drop.backward(dh)
        # the final state's gradient is 0 (truncated BPTT); a one-hot input needs no gradient
        de, _ = self.rnn.backward(dh, need_input_grad=self.embed is not None, recurrent_scale=recurrent_scale)
        if self.embed is not None:
            self.embed.backward(de if self._row_keep is None else de * self._row_keep)

    def train_step(self, ids, targets, state=None):
        """:meth:`loss`, then :meth:`backward` unless the loss is not finite: → (loss, final state),
        the gradients accumulated into this model's.

        When the recurrent layer would cut this batch into slices run in threads of their own
        (:func:`bptt.runtime.policy.batch_parts`) and nothing of the step is drawn at random (no
        dropout of any kind), the whole model runs in slices instead: slice i of the streams goes
        through embedding, layers, decoder, loss and backward in thread i, on this model (i = 0) or
        on a :meth:`~bptt.nn.module.Module.replica` sharing its weights, whose gradients are added
        to this model's at the end, in slice order.  With the mean loss over all M = T·N positions,
        slice i (M_i positions) has L = Σ_i (M_i / M) L_i, so its ∂L/∂logits is its own mean's
        gradient times M_i / M.  The layer's own slices hand the work over between threads four
        times a step (its forward, the decoder's two halves, the decoder's backward, its backward),
        with the loss on one core between them; this hands it over once (a 2×128 LSTM step 1.05×
        faster, 2×256 1.05×, for windows of 64 M multiply-adds of a layer's step products or more,
        ``policy.MODEL_SPLIT_MIN_MACS``: benchmarks/history.md).  The numbers are those of the whole
        batch up to the order of the gradient sums.
        """
        ids, y = np.asarray(ids), np.asarray(targets)
        parts = self._model_slices(ids, y)
        if len(parts) < 2:
            loss, dlogits, state = self.loss(ids, y, state)
            if np.isfinite(loss):
                self.backward(dlogits)
            return loss, state
        M = ids.size

        def one(model, s):
            if model is not self:
                model.zero_grad()  # before, not after the step: a step that raised leaves nothing behind
            loss, dlogits, end = model.loss(np.ascontiguousarray(ids[:, s]), np.ascontiguousarray(y[:, s]),
                                            select_streams(state, s))
            if np.isfinite(loss):
                dlogits *= dlogits.dtype.type(ids[:, s].size / M)
                model.backward(dlogits)
            return loss * ids[:, s].size / M, end

        losses, state = self._run_sliced(parts, one)
        for rep in self._step_replicas:
            for (_, _, g), (_, _, g_rep) in zip(self.named_parameters(), rep.named_parameters(), strict=True):
                g += g_rep
        return float(sum(losses)), state

    def _run_sliced(self, parts, one):
        """``one(model, s)`` → (value, final state) for each batch slice s, slice i in thread i on this
        model (i = 0) or on replica i → (the values, the final states joined along the batch axis)."""
        replicas = self._replicas(len(parts))
        keep_freed_memory()  # arrays made and freed in worker threads (see there)
        with cores_each(1):
            results = run_parallel([functools.partial(one, self if i == 0 else replicas[i - 1], s)
                                    for i, s in enumerate(parts)])
        return [value for value, _ in results], join_streams([end for _, end in results])

    def _model_slices(self, ids, targets, mask=None):
        """The batch slices :meth:`train_step` (training mode) and :meth:`nll` (eval mode) run the model
        in: the recurrent layer's own, when the step draws nothing at random, the decoder is plain and
        the window has work enough (``policy.MODEL_SPLIT_MIN_MACS``); else [whole batch].  Ids that
        are not (T, N), or targets or a mask of another shape, run whole: the whole batch's checks
        then say what is wrong (slices of a wider target would not)."""
        if ids.ndim != 2 or np.shape(targets) != ids.shape or (mask is not None and np.shape(mask) != ids.shape):
            return [slice(None)]
        T, N = ids.shape
        c, rnn = self.config, self.rnn
        if c.adaptive_softmax or rnn.regularizer is not None or rnn.backend == "reference" or (
                self.training and (c.dropout or c.embedding_dropout)):
            return [slice(0, N)]
        if T * N * rnn.gate_count * rnn.hidden_size * rnn.out_size < policy.MODEL_SPLIT_MIN_MACS:
            return [slice(0, N)]  # too little work for a whole model's Python per thread (see there)
        return rnn.batch_slices(N)

    def _replicas(self, n):
        """n − 1 replicas of this model (made once, kept while their count fits), each module in this
        one's mode and with its frozen_cache (a replica made inside a frozen_weights() block must not
        keep that block's packed weights after it)."""
        reps = getattr(self, "_step_replicas", [])
        if len(reps) != n - 1:
            reps = self._step_replicas = [self.replica() for _ in range(n - 1)]
            for rep in reps:
                vars(rep).pop("_step_replicas", None)  # a copy of this list, which the replica has no use for
        for rep in reps:
            for m, r in zip(self.modules(), rep.modules(), strict=True):
                r.training, r.frozen_cache = m.training, m.frozen_cache
        return reps

    # ------------------------------------------------------------------ generation
    def reset_state(self):
        self.rnn.reset_state()

    def step(self, ids):
        """One character per stream: ids (N,) → logits (N, V) (log-probabilities with an adaptive softmax);
        the state is kept until reset."""
        ids = np.asarray(ids).reshape(-1)
        h = self.rnn.step(self.inputs(ids))  # (N, H)
        return self.scores(h)


class TiedDecoder(Module):
    """The decoder of a model with tied weights: z = h W_eᵀ + b, W_e the embedding's (V, H) weight.

    Only the bias ``bias`` (V,) is its own parameter.  Its backward adds ∂L/∂W_e = ∂L/∂zᵀ h into the
    embedding's gradient, where the embedding's own backward adds its rows: the two uses summed.
    """

    def __init__(self, embed, hidden, dtype=np.float32, rng=None):
        super().__init__()
        self.embed = embed  # not a child: its weight is counted (and saved) once, as embed.weight
        k = 1.0 / np.sqrt(hidden)
        self.add_param("bias", resolve_rng(rng).uniform(-k, k, embed.num_embeddings).astype(dtype))  # (V,)
        self._ctx = None

    def extra_repr(self):
        return f"tied to the embedding {self.embed.num_embeddings}x{self.embed.embedding_dim}"

    def forward(self, h):
        return self.forward_then(h, None)[0]

    def forward_then(self, h, then):
        """(z, results): :meth:`forward`, with ``then`` on each slice of rows (as :meth:`Linear.forward_then`)."""
        self._ctx = h
        return affine_forward_then(h, self.embed.params["weight"], self.params["bias"], then)

    def backward(self, dz):
        h = self._saved(self._ctx)
        return affine_backward(dz, h, self.embed.params["weight"], self.embed.grads["weight"], self.grads["bias"])


# ============================================================================ loading


def model_context(model) -> int | None:
    """The most positions a language model reads at once (a Transformer's context), or None (recurrent)."""
    return getattr(getattr(model, "config", None), "context", None)


def config_from_dict(d: dict):
    """A language model's config from its dict: a Transformer's (``model == "transformer"``) or a CharLM's."""
    if d.get("model") == "transformer":
        from bptt.lm.transformer import TransformerLMConfig

        return TransformerLMConfig.from_dict(d)
    return CharLMConfig.from_dict(d)


def build_model(config, rng=None):
    """The language model a config describes: :class:`CharLM` or :class:`bptt.lm.transformer.TransformerLM`."""
    if config.model == "transformer":
        from bptt.lm.transformer import TransformerLM

        return TransformerLM(config, rng=rng)
    return CharLM(config, rng=rng)


def load_model(path, dtype: str | None = None):
    """(model, units, meta) from a checkpoint written by ``bptt train`` (any architecture).

    ``units`` (:mod:`bptt.lm.units`) come from ``meta["units"]``; a checkpoint written before units
    existed has ``meta["vocab"]``, a list of characters, and loads as character units.
    """
    from bptt.lm.units import units_from_json

    tensors, meta = ckpt.load_checkpoint_of_kind(path, CHECKPOINT_KIND, "a character language model")
    try:
        config = config_from_dict(meta["config"])
        if dtype:
            config.dtype = dtype
        vocab = units_from_json(meta["units"] if "units" in meta else meta["vocab"])
        if len(vocab) != config.vocab_size:
            raise ValueError(f"{len(vocab)} {vocab.unit_name} ids for a model of {config.vocab_size} outputs")
        model = build_model(config, rng=0)
        model.load_state_dict(tensors.get("model", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: checkpoint contents do not fit the model its config describes ({e})") from None
    model.eval()
    return model, vocab, meta
