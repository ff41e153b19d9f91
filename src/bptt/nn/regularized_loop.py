"""The readable time loop of the regularised and normalised recurrent layers (NumPy, no compiled kernel).

Shape legend: T time steps, N batch, D input features, H hidden units, L layers,
K = 2 if bidirectional else 1, G = g·H stacked gates (g = 1 RNN, 4 LSTM, 3 GRU).

``bptt.RNN / LSTM / GRU`` hand their ``forward``, ``backward`` and ``step`` to a
:class:`Regularization` when one of these constructor options is on (all off: the layer runs
its own, torch-exact path and this module is never called)::

    recurrent_dropout  p_h   variational dropout of h_{t−1} in the recurrent product (Keras' meaning)
    input_dropout      p_x   variational dropout of every layer's input x_k (Gal & Ghahramani 2016)
    output_dropout     p_y   variational dropout of the top layer's output
    weight_drop        p_w   DropConnect on W_hh (Merity et al. 2017, AWD-LSTM)
    zoneout, zoneout_c z_h, z_c   zoneout of h (and of c; zoneout_c defaults to zoneout) (Krueger et al. 2016)
    layer_norm               LN of the gate pre-activations, and of c for the LSTM's output (Ba et al. 2016)
    peephole                 diagonal c → gate weights (LSTM only, Gers & Schmidhuber 2000)

The stack, per layer k and direction d (the steps are :mod:`bptt.nn.regularized`)::

    x_k   = dropout_t(y_{k−1}) ⊙ m_x[k]            m_x[k] (N, D_k) one mask per sequence, shared by all steps
    gx    = x_k W_ihᵀ + b_ih                        one product for all T steps        (T, N, G)
    W̃_hh  = W_hh ⊙ M / (1 − p_w)                    M (G, H) one mask per forward (window)
    y_k, h_n = the time loop over gx                m_h (N, H) per sequence; zoneout masks per step
    output = [y_fwd, y_rev] ⊙ m_y                   m_y (N, K·H) per sequence, top layer only

Masks across truncated-BPTT windows.  The *locked* masks (m_x, m_h, m_y) belong to the streams,
not to the call: they are drawn when a training forward starts from a reset state (``state=None``),
or when the batch size changes, and kept for every later call that continues from a carried state.
So a stream keeps its masks from one window to the next until its state is reset (as in Gal &
Ghahramani, where the mask is fixed for a whole sequence), and :meth:`Regularization.reset_masks`
forces new ones.  Weight-drop masks (one per forward, as in AWD-LSTM) and zoneout masks (one per
step, as in Krueger et al.) are drawn by every training forward.  All come from ``layer.rng``, in
a fixed order: the locked masks (layer by layer: m_x, then m_h per direction; then m_y), then
``dropout``'s per-step masks, then per layer and direction M, the zoneout masks of h, of c.

Evaluation (``layer.eval()``) draws nothing: every dropout is the identity (inverted dropout),
W̃_hh = W_hh, and zoneout takes its expectation, h_t = z_h h_{t−1} + (1 − z_h) h̃_t.

The plain path.  Input dropout, output dropout and weight drop act *outside* the time loop:
the masks multiply the sequences a layer reads and writes, and W̃_hh is one matrix for the whole
window.  When these are the only options on (:attr:`Options.outside_the_loop`), the layer runs its
plain path, the compiled kernels of :class:`bptt.nn.rnn.RNNBase`, with W̃_hh in place of W_hh and
the masks applied around it (:meth:`Regularization.around_the_loop`, :class:`Outside`), drawn in
the order above, so that both paths compute the same thing from the same generator (tested to
rounding against this loop, which stays the reference: ``layer.regularizer.force_reference =
True`` runs it anyway).  Every other option changes the step itself and runs this loop.

Cost: this path is the reference loop in NumPy, one Python iteration per step (see
``benchmarks/bench_regularized.py`` and ``docs/regularization.md`` for measured figures).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn import regularized as cell
from bptt.nn.cells import uniform_init
from bptt.nn.module import as_float_array
from bptt.nn.ops import dropout_mask, lengths_to_mask

__all__ = ["Options", "check_options", "Regularization", "Outside", "option_hint"]

_RATES = ("recurrent_dropout", "input_dropout", "output_dropout", "weight_drop", "zoneout", "zoneout_c")


class Options(NamedTuple):
    recurrent_dropout: float = 0.0
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    weight_drop: float = 0.0
    zoneout: float = 0.0
    zoneout_c: float | None = None  # None: the same as zoneout (LSTM only)
    layer_norm: bool = False
    peephole: bool = False

    @property
    def active(self) -> bool:
        return any(getattr(self, n) for n in _RATES) or self.layer_norm or self.peephole

    @property
    def outside_the_loop(self) -> bool:
        """Whether every option that is on acts outside the time loop (input dropout, output dropout,
        weight drop), so the layer can run its plain, compiled path with them (see the module doc)."""
        return not (self.recurrent_dropout or self.zoneout or self.z_c or self.layer_norm or self.peephole)

    @property
    def z_c(self) -> float:
        return self.zoneout if self.zoneout_c is None else self.zoneout_c


def check_options(mode: str, proj_size: int = 0, **kw) -> Options:
    """Validated :class:`Options` for a layer of ``mode``; ValueError with one clear line."""
    unknown = set(kw) - set(Options._fields)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    opts = Options(**kw)
    for name in _RATES:
        v = getattr(opts, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    opts = opts._replace(**{n: float(getattr(opts, n)) for n in _RATES if getattr(opts, n) is not None},
                         layer_norm=bool(opts.layer_norm), peephole=bool(opts.peephole))
    cell_name = {"gru": "a GRU", "lstm": "an LSTM"}.get(mode, "an RNN")
    if mode != "lstm" and opts.peephole:
        raise ValueError(f"peepholes apply to the LSTM's cell state; {cell_name} has none")
    if mode != "lstm" and opts.zoneout_c:
        raise ValueError(f"zoneout_c applies to the LSTM's cell state; {cell_name} has none")
    if opts.active and proj_size:
        raise ValueError("proj_size cannot be combined with recurrent_dropout, weight_drop, zoneout, layer_norm, "
                         "peephole, input_dropout or output_dropout")
    return opts


def option_hint(keys) -> str:
    """Which constructor option a state-dict key belongs to ("" for the plain parameters)."""
    hints = []
    for prefix, option in (("ln_", "layer_norm=True"), ("weight_c", "peephole=True")):
        if any(k.split(".")[-1].startswith(prefix) for k in keys) and option not in hints:
            hints.append(option)
    return " (these belong to a layer built with " + " and ".join(hints) + ")" if hints else ""


class Outside(NamedTuple):
    """The regularisers outside the time loop as a training forward on the layer's plain path drew
    them (:meth:`Regularization.around_the_loop`), kept for its backward::

        forward                                      backward
        x̃_0    = x ⊙ m_x[0]                          ∂L/∂x    = ∂L/∂x̃_0 ⊙ m_x[0]
        drop_k ← drop_k ⊙ m_x[k]        (k ≥ 1)      the layer's own: ∂L/∂y_{k−1} = ∂L/∂x_k ⊙ drop_k
        W̃_hh   = W_hh ⊙ M / (1 − p_w)                ∂L/∂W_hh = ∂L/∂W̃_hh ⊙ M / (1 − p_w)
        ỹ      = y ⊙ m_y                             ∂L/∂y    = ∂L/∂ỹ ⊙ m_y

    W̃_hh is an element-wise function of W_hh, so the layer runs its forward and backward with W̃_hh
    and its ∂L/∂W̃_hh, collected apart (:meth:`recurrent_grads`), is mapped back to W_hh's gradient.
    """

    m_x0: np.ndarray | None  # (N, D) stream mask on the layer's input
    m_y: np.ndarray | None  # (N, K·H) stream mask on its output
    masks: list | None  # [[M / (1 − p_w) (G, H) per direction] per layer]; None without weight drop
    W_hh: list | None  # [[W̃_hh (G, H) per direction] per layer]; None without weight drop
    one_hot: bool  # the caller passed indices, made one-hot vectors to take m_x[0]: no input gradient

    def output(self, y):
        """ỹ = y ⊙ m_y, y (T, N, K·H)."""
        return y if self.m_y is None else y * self.m_y

    def output_grad(self, dy):
        """∂L/∂y from ∂L/∂ỹ (T, N, K·H)."""
        return dy if self.m_y is None else dy * self.m_y

    def input_grad(self, dx):
        """∂L/∂x from ∂L/∂x̃_0 (T, N, D)."""
        return dx if self.m_x0 is None else dx * self.m_x0

    def recurrent_grads(self, layer) -> dict:
        """Zeroed buffers for ∂L/∂W̃_hh, by W_hh's parameter names ({} without weight drop): the layer's
        backward accumulates into them in place of its W_hh gradients."""
        if self.masks is None:
            return {}
        return {f"weight_hh_l{k}{sfx}": np.zeros_like(M) for k, row in enumerate(self.masks)
                for sfx, M in zip(("", "_reverse"), row)}

    def add_recurrent_grads(self, layer, buffers: dict) -> None:
        """∂L/∂W_hh += ∂L/∂W̃_hh ⊙ M / (1 − p_w), from the buffers of :meth:`recurrent_grads`."""
        grads = layer.grads
        for k, row in enumerate(self.masks or ()):
            for sfx, M in zip(("", "_reverse"), row):
                grads[f"weight_hh_l{k}{sfx}"] += buffers[f"weight_hh_l{k}{sfx}"] * M


class _Direction(NamedTuple):
    """The cache of one layer and direction."""

    p: cell.StepParams
    w_mask: np.ndarray | None  # (G, H) M / (1 − p_w), None without weight drop (or in eval)
    z_h: object  # (T, N, H) 0/1 masks in training, the rate in eval, None = off
    z_c: object
    steps: list  # one step cache per t (time order)
    mask: np.ndarray | None  # (T, N) bool: lengths
    reverse: bool


class _Layer(NamedTuple):
    x: np.ndarray  # (T, N, D_k) the layer's input after every dropout
    drop: np.ndarray | None  # (T, N, D_k) per-step `dropout` mask (k ≥ 1)
    m_x: np.ndarray | None  # (N, D_k) locked input mask
    directions: list


class _Context(NamedTuple):
    layers: list
    m_y: np.ndarray | None
    batched: bool
    one_hot: bool
    T: int
    N: int


class Regularization:
    """The options of one recurrent layer, their parameters, masks and the time loop.

    Extra parameters, registered on the layer (``_reverse`` suffix for the reverse direction):

        ln_ih_weight_l{k}, ln_ih_bias_l{k}   (G,)  gain (init 1) and bias (init 0) of LN_ih   (layer_norm)
        ln_hh_weight_l{k}, ln_hh_bias_l{k}   (G,)  of LN_hh
        ln_c_weight_l{k},  ln_c_bias_l{k}    (H,)  of LN_c (LSTM)
        weight_ci_l{k}, weight_cf_l{k}, weight_co_l{k}  (H,)  peepholes, U(±1/√H)    (peephole)
    """

    def __init__(self, layer, opts: Options):
        self.opts = opts
        self.mode = layer.mode
        self.locked = None  # (N, {"x": [...], "h": [[...]], "y": ...}) the stream masks, see the module doc
        self.weight_masks = None  # [[M / (1 − p_w) (G, H) or None per direction] per layer], last training forward
        self.force_reference = False  # True: run this loop even where the plain path could (tests, benchmarks)
        self.ctx = None
        H, G = layer.hidden_size, layer.gate_count * layer.hidden_size
        dt = layer.dtype
        for k in range(layer.num_layers):
            for sfx in self._suffixes(layer):
                if opts.layer_norm:
                    for part, width in (("ih", G), ("hh", G)) + ((("c", H),) if self.mode == "lstm" else ()):
                        layer.add_param(f"ln_{part}_weight_l{k}{sfx}", np.ones(width, dt))
                        layer.add_param(f"ln_{part}_bias_l{k}{sfx}", np.zeros(width, dt))
                if opts.peephole:
                    for gate in ("ci", "cf", "co"):
                        layer.add_param(f"weight_{gate}_l{k}{sfx}", uniform_init(layer.rng, (H,), 1.0 / np.sqrt(H), dt))

    @staticmethod
    def _suffixes(layer):
        return ("", "_reverse")[: layer.num_directions]

    @property
    def plain_path(self) -> bool:
        """Whether the layer runs its plain (compiled) path with the masks applied around it, rather than
        this loop: every option on acts outside the loop and :attr:`force_reference` is off.  Set
        ``force_reference`` between a backward and the next forward, not in between."""
        return self.opts.outside_the_loop and not self.force_reference

    def reset_masks(self):
        """Forget the locked masks: the next training forward draws new ones."""
        self.locked = None

    def mask_state(self) -> dict:
        """The locked masks as named arrays, for a checkpoint ({} when there are none):
        ``x_l{k}`` (N, D_k), ``h_l{k}`` / ``h_l{k}_reverse`` (N, H), ``y`` (N, K·H)."""
        if self.locked is None:
            return {}
        masks, out = self.locked[1], {}
        for k, (mx, mhs) in enumerate(zip(masks["x"], masks["h"])):
            if mx is not None:
                out[f"x_l{k}"] = mx
            for sfx, mh in zip(("", "_reverse"), mhs):
                if mh is not None:
                    out[f"h_l{k}{sfx}"] = mh
        if masks["y"] is not None:
            out["y"] = masks["y"]
        return out

    def load_mask_state(self, layer, state: dict):
        """Restore masks written by :meth:`mask_state` (a resumed run continues with its streams' masks)."""
        if not state:
            self.locked = None
            return
        N = next(iter(state.values())).shape[0]
        L, K = layer.num_layers, layer.num_directions
        masks = {"x": [state.get(f"x_l{k}") for k in range(L)],
                 "h": [[state.get(f"h_l{k}{sfx}") for sfx in ("", "_reverse")[:K]] for k in range(L)],
                 "y": state.get("y")}
        self.locked = (N, masks)

    # ------------------------------------------------------------------ inputs
    def _check(self, layer, x, state, lengths, one_hot):
        """(x (T, N, D) float, batched, h0 (L·K, N, H), c0 or None, mask (T, N) or None)."""

        name = type(layer).__name__
        if one_hot:
            ids = np.asarray(x)
            if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2) or ids.size == 0:
                raise ValueError(f"{name}: one_hot=True expects integer indices (T, N) or (T,), got {ids.dtype} {ids.shape}")
            if ids.min() < 0 or ids.max() >= layer.input_size:
                raise ValueError(f"{name}: one-hot indices must be in [0, {layer.input_size}), got [{ids.min()}, {ids.max()}]")
            batched = ids.ndim == 2
            ids = ids.T if batched and layer.batch_first else ids.reshape(len(ids), -1)
            x = np.zeros(ids.shape + (layer.input_size,), layer.dtype)  # one-hot rows: this path has no gather
            np.put_along_axis(x, ids[..., None], 1.0, axis=-1)
        else:
            x = as_float_array(x, layer.dtype, "input")
            if x.ndim not in (2, 3):
                raise ValueError(f"{name} expects input (T, N, D) or (T, D), got shape {x.shape}")
            batched = x.ndim == 3
            x = (x.transpose(1, 0, 2) if layer.batch_first else x) if batched else x[:, None, :]
            if x.shape[2] != layer.input_size or x.shape[0] == 0 or x.shape[1] == 0:
                raise ValueError(f"{name} expects {layer.input_size} input features and T, N ≥ 1, got shape {x.shape}")
        T, N = x.shape[:2]
        if lengths is not None and not batched:
            raise ValueError("lengths needs batched input (T, N, D)")
        mask = lengths_to_mask(lengths, T, N)
        LK, H = layer.num_layers * layer.num_directions, layer.hidden_size

        def st(s, what):
            if s is None:
                return np.zeros((LK, N, H), layer.dtype)
            s = as_float_array(s, layer.dtype, what)
            want = (LK, N, H) if batched else (LK, H)
            if s.shape != want:
                raise ValueError(f"{name}: {what} must have shape {want}, got {s.shape}")
            return np.ascontiguousarray(s.reshape(LK, N, H))

        if self.mode == "lstm":
            if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
                raise ValueError("LSTM state must be a tuple (h_0, c_0)")
            h_s, c_s = (None, None) if state is None else state
            return np.ascontiguousarray(x), batched, st(h_s, "h_0"), st(c_s, "c_0"), mask
        if isinstance(state, (tuple, list)):
            raise ValueError(f"{name} state must be one array h_0, not a tuple")
        return np.ascontiguousarray(x), batched, st(state, "h_0"), None, mask

    def draw_locked(self, layer, N, fresh):
        """The stream masks m_x, m_h, m_y of a training forward over N streams: kept from the last
        training forward unless ``fresh`` (the state was reset) or N changed, else drawn from
        ``layer.rng`` in the order of the module doc → {"x": [m_x[k] (N, D_k) or None per layer],
        "h": [[m_h (N, H) or None per direction] per layer], "y": m_y (N, K·H) or None}."""
        o, rng, dt = self.opts, layer.rng, layer.dtype
        if not fresh and self.locked is not None and self.locked[0] == N:
            return self.locked[1]
        K, H = layer.num_directions, layer.hidden_size
        masks = {"x": [], "h": [], "y": None}
        for k in range(layer.num_layers):
            D_k = layer.input_size if k == 0 else K * H
            masks["x"].append(dropout_mask((N, D_k), o.input_dropout, rng, dt) if o.input_dropout else None)
            masks["h"].append([dropout_mask((N, H), o.recurrent_dropout, rng, dt) if o.recurrent_dropout else None
                               for _ in range(K)])
        if o.output_dropout:
            masks["y"] = dropout_mask((N, K * H), o.output_dropout, rng, dt)
        self.locked = (N, masks)
        return masks

    def around_the_loop(self, layer, x, one_hot, fresh):
        """A training forward on the layer's plain path: the masks of the options outside the loop,
        drawn from ``layer.rng`` in this module's order (the stream masks, `dropout`'s per-step masks,
        the weight-drop masks per layer and direction: what :meth:`forward` draws when no zoneout
        mask comes between them), and the input masks applied.

        x (T, N, D) checked input, or indices (T, N) with ``one_hot`` (made one-hot vectors when
        input dropout must scale them); ``fresh``: the state was reset (new stream masks).
        → (x̃_0, one_hot, drops, :class:`Outside`), drops[k] (T, N, D_k) the mask on layer k's
        input (`dropout`'s ⊙ m_x[k]) or None, drops[0] None.
        """
        T, N = x.shape[:2]
        L, K, H, dt = layer.num_layers, layer.num_directions, layer.hidden_size, layer.dtype
        locked = self.draw_locked(layer, N, fresh)
        drops = [None] + [dropout_mask((T, N, K * H), layer.dropout, layer.rng, dt) if layer.dropout else None
                          for _ in range(1, L)]
        p_w, G = self.opts.weight_drop, layer.gate_count * H
        self.weight_masks = [[dropout_mask((G, H), p_w, layer.rng, dt) if p_w else None for _ in range(K)]
                             for _ in range(L)]
        m_x = locked["x"]
        made_vectors = one_hot and m_x[0] is not None
        if made_vectors:  # onehot(x) ⊙ m_x[0] scales single entries: vectors, not a gather of W_ih's rows
            x, one_hot = np.eye(layer.input_size, dtype=dt)[x], False
        if m_x[0] is not None:
            x = x * m_x[0]
        for k in range(1, L):
            if m_x[k] is not None:
                drops[k] = np.broadcast_to(m_x[k], (T, *m_x[k].shape)) if drops[k] is None else drops[k] * m_x[k]
        masks = W_hh = None
        if p_w:
            masks = self.weight_masks
            W_hh = [[layer.layer_weights(k, d)[2] * M for d, M in enumerate(row)] for k, row in enumerate(masks)]
        return x, one_hot, drops, Outside(m_x[0], locked["y"], masks, W_hh, made_vectors)

    def _params(self, layer, k, d):
        sfx = self._suffixes(layer)[d]
        p = layer.params  # the live arrays, by their own names (a layer has no children)
        get = lambda n: p.get(f"{n}_l{k}{sfx}")  # noqa: E731
        ln = peep = None
        if self.opts.layer_norm:
            ln = cell.LayerNorm(get("ln_ih_weight"), get("ln_ih_bias"), get("ln_hh_weight"), get("ln_hh_bias"),
                                get("ln_c_weight"), get("ln_c_bias"))
        if self.opts.peephole:
            peep = cell.Peephole(get("weight_ci"), get("weight_cf"), get("weight_co"))
        return get("weight_ih"), get("bias_ih"), get("weight_hh"), get("bias_hh"), ln, peep

    # ------------------------------------------------------------------ forward
    def forward(self, layer, x, state=None, lengths=None, one_hot=False):
        """The layer's forward (same contract as :meth:`bptt.nn.rnn.RNNBase.forward`)."""
        x, batched, h0, c0, mask = self._check(layer, x, state, lengths, one_hot)
        T, N = x.shape[:2]
        o, rng, dt, train = self.opts, layer.rng, layer.dtype, layer.training
        L, K, H, G = layer.num_layers, layer.num_directions, layer.hidden_size, layer.gate_count * layer.hidden_size
        locked = self.draw_locked(layer, N, fresh=state is None) if train else {"x": [None] * L, "h": [[None] * K] * L, "y": None}
        drops = [None] + [dropout_mask((T, N, K * H), layer.dropout, rng, dt) if train and layer.dropout else None
                          for _ in range(1, L)]
        h_n, c_n = np.empty_like(h0), None if c0 is None else np.empty_like(c0)
        layers, inp = [], x
        if train:
            self.weight_masks = [[None] * K for _ in range(L)]
        for k in range(L):
            if drops[k] is not None:
                inp = inp * drops[k]
            if locked["x"][k] is not None:
                inp = inp * locked["x"][k]
            outs, dirs = [], []
            for d in range(K):
                W_ih, b_ih, W_hh, b_hh, ln, peep = self._params(layer, k, d)
                gx = inp.reshape(T * N, -1) @ W_ih.T
                if b_ih is not None:
                    gx += b_ih
                w_mask = dropout_mask((G, H), o.weight_drop, rng, dt) if train and o.weight_drop else None
                if train:
                    self.weight_masks[k][d] = w_mask
                p = cell.StepParams(W_hh if w_mask is None else W_hh * w_mask, b_hh, locked["h"][k][d], ln, peep,
                                    self.mode == "rnn_relu")
                z_h = self._zoneout(o.zoneout, (T, N, H), rng, dt, train)
                z_c = self._zoneout(o.z_c, (T, N, H), rng, dt, train) if self.mode == "lstm" else None
                idx = k * K + d
                y, h_n[idx], c_last, steps = sequence_forward(self.mode, gx.reshape(T, N, G), h0[idx],
                                                              None if c0 is None else c0[idx], p, z_h, z_c, mask, d == 1)
                if c_n is not None:
                    c_n[idx] = c_last
                outs.append(y)
                dirs.append(_Direction(p, w_mask, z_h, z_c, steps, mask, d == 1))
            layers.append(_Layer(inp, drops[k], locked["x"][k], dirs))
            inp = outs[0] if K == 1 else np.concatenate(outs, axis=2)
        output = inp if locked["y"] is None else inp * locked["y"]
        self.ctx = _Context(layers, locked["y"], batched, one_hot, T, N)
        if not batched:
            output, h_n = output[:, 0], h_n[:, 0]
            c_n = None if c_n is None else c_n[:, 0]
        elif layer.batch_first:
            output = output.transpose(1, 0, 2)
        return output, ((h_n, c_n) if self.mode == "lstm" else h_n)

    @staticmethod
    def _zoneout(z, shape, rng, dt, train):
        """Zoneout keep factors: 0/1 masks (keep the old value with probability z) in training, z in eval."""
        if not z:
            return None
        if not train:
            return float(z)
        return (rng.random(shape) < z).astype(dt)

    # ------------------------------------------------------------------ backward
    def backward(self, layer, doutput, dstate=None, need_input_grad=True):
        """The layer's backward (same contract as :meth:`bptt.nn.rnn.RNNBase.backward`)."""
        ctx = self.ctx
        if ctx is None:
            raise RuntimeError(f"{type(layer).__name__}.backward() called without a preceding forward() "
                               "(or the context was already consumed)")
        self.ctx = None
        T, N = ctx.T, ctx.N
        L, K, H = layer.num_layers, layer.num_directions, layer.hidden_size
        dy = as_float_array(doutput, layer.dtype, "doutput")
        if not ctx.batched:
            dy = dy.reshape(T, 1, -1)
        elif layer.batch_first:
            dy = dy.transpose(1, 0, 2)
        if dy.shape != (T, N, K * H):
            raise ValueError(f"doutput must have the shape of the output, got {np.shape(doutput)}")
        dh_n, dc_n = (dstate, None) if self.mode != "lstm" else (dstate or (None, None))
        shape = (L * K, N, H)
        dh_n = None if dh_n is None else as_float_array(dh_n, layer.dtype, "dh_n").reshape(shape)
        dc_n = None if dc_n is None else as_float_array(dc_n, layer.dtype, "dc_n").reshape(shape)
        if ctx.m_y is not None:
            dy = dy * ctx.m_y
        grads = layer.grads
        dh0 = np.zeros(shape, layer.dtype)
        dc0 = np.zeros(shape, layer.dtype) if self.mode == "lstm" else None
        dx = None
        for k in range(L - 1, -1, -1):
            lay = ctx.layers[k]
            need_dx = k > 0 or (need_input_grad and not ctx.one_hot)
            dx = np.zeros(lay.x.shape, layer.dtype) if need_dx else None
            for d, dc in enumerate(lay.directions):
                idx, sfx = k * K + d, self._suffixes(layer)[d]
                W_ih = self._params(layer, k, d)[0]
                dgx, dgh, dh0[idx], c_first, pg = sequence_backward(
                    self.mode, np.ascontiguousarray(dy[:, :, d * H : (d + 1) * H]),
                    None if dh_n is None else dh_n[idx], None if dc_n is None else dc_n[idx], dc)
                if dc0 is not None:
                    dc0[idx] = c_first
                h_bar = np.stack([s.h_bar for s in dc.steps]).reshape(T * N, H)
                dgx2, dgh2 = dgx.reshape(T * N, -1), dgh.reshape(T * N, -1)
                grads[f"weight_ih_l{k}{sfx}"] += dgx2.T @ lay.x.reshape(T * N, -1)
                dW = dgh2.T @ h_bar  # ∂L/∂W̃_hh
                grads[f"weight_hh_l{k}{sfx}"] += dW if dc.w_mask is None else dW * dc.w_mask  # W̃ = W ⊙ M/(1−p)
                if f"bias_ih_l{k}{sfx}" in grads:
                    grads[f"bias_ih_l{k}{sfx}"] += dgx2.sum(axis=0)
                    grads[f"bias_hh_l{k}{sfx}"] += dgh2.sum(axis=0)
                for name, g in pg.items():
                    grads[f"{name}_l{k}{sfx}"] += g
                if dx is not None:
                    dx += (dgx2 @ W_ih).reshape(dx.shape)
            if dx is not None:
                if lay.m_x is not None:
                    dx *= lay.m_x
                if lay.drop is not None:
                    dx *= lay.drop
            dy = dx
        if dx is not None:
            dx = dx[:, 0] if not ctx.batched else dx.transpose(1, 0, 2) if layer.batch_first else dx
        if not ctx.batched:
            dh0 = dh0[:, 0]
            dc0 = None if dc0 is None else dc0[:, 0]
        return dx, ((dh0, dc0) if self.mode == "lstm" else dh0)

    # ------------------------------------------------------------------ stepping and statistics
    def step(self, layer, x):
        """One time step from ``layer.state`` (kept until ``layer.reset_state()``), as ``RNNBase.step``."""
        if layer.bidirectional:
            raise ValueError("step() needs a unidirectional layer: the reverse direction reads the future")
        x = as_float_array(x, layer.dtype, "input")
        if x.ndim not in (1, 2):
            raise ValueError(f"step() expects input (N, {layer.input_size}) or ({layer.input_size},), got {x.shape}")
        seq = x[None] if not layer.batch_first or x.ndim == 1 else x[:, None]
        out, layer.state = self.forward(layer, seq, layer.state)
        self.ctx = None  # no backward through streaming steps
        return out[0] if (x.ndim == 1 or not layer.batch_first) else out[:, 0]

    def hidden_state_stats(self):
        """Mean and variance of h_{t−1} per layer over the last forward (see RNNBase.hidden_state_stats)."""
        if self.ctx is None:
            raise ValueError("hidden_state_stats needs a forward pass first (the layer has no cache)")
        out = {}
        for k, lay in enumerate(self.ctx.layers):
            h = np.concatenate([np.stack([s.h_prev for s in d.steps]) for d in lay.directions], axis=-1)
            out[f"h_mean_l{k}"], out[f"h_var_l{k}"] = float(h.mean()), float(h.var())
        return out


# ============================================================================ one direction over time


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _at(z, t):
    """Step t's zoneout factor: a row of the (T, N, H) masks, the rate itself (eval), or None."""
    return z[t] if isinstance(z, np.ndarray) else z


def sequence_forward(mode, gx, h0, c0, p: cell.StepParams, z_h, z_c, mask=None, reverse=False):
    """One direction over T steps: → (y (T, N, H), h_n, c_n or None, step caches in time order).

    Padded steps (mask False) keep the state and output zero, as in :mod:`bptt.nn.recurrence`.
    """
    T, N, _ = gx.shape
    y = np.empty((T, N, h0.shape[1]), gx.dtype)
    steps = [None] * T
    h, c = h0, c0
    for t in _time_order(T, reverse):
        if mode == "lstm":
            h_new, c_new, steps[t] = cell.lstm_forward(gx[t], h, c, p, _at(z_h, t), _at(z_c, t))
        elif mode == "gru":
            h_new, steps[t] = cell.gru_forward(gx[t], h, p, _at(z_h, t))
        else:
            h_new, steps[t] = cell.rnn_forward(gx[t], h, p, _at(z_h, t))
        if mask is None:
            y[t], h = h_new, h_new
            c = c_new if mode == "lstm" else None
        else:
            m = mask[t][:, None]
            y[t] = np.where(m, h_new, 0.0)
            h = np.where(m, h_new, h)
            if mode == "lstm":
                c = np.where(m, c_new, c)
    return y, h, c, steps


def sequence_backward(mode, dy, dh_n, dc_n, cache: _Direction):
    """Backward through :func:`sequence_forward`: → (dgx (T, N, G), dgh (T, N, G), dh_0, dc_0, pgrads).

    pgrads maps the option parameters' base names (``ln_ih_weight``, ``weight_ci``, ...) to their
    gradients summed over the steps.
    """
    p, steps, mask = cache.p, cache.steps, cache.mask
    T, N, H = dy.shape
    G = p.W_hh.shape[0]
    pgrads = {}
    if p.ln is not None:
        for part, width in (("ih", G), ("hh", G)) + ((("c", H),) if mode == "lstm" else ()):
            pgrads[f"ln_{part}_weight"] = np.zeros(width, dy.dtype)
            pgrads[f"ln_{part}_bias"] = np.zeros(width, dy.dtype)
    if p.peep is not None:
        for gate in ("ci", "cf", "co"):
            pgrads[f"weight_{gate}"] = np.zeros(H, dy.dtype)
    dgx = np.empty((T, N, G), dy.dtype)
    dgh = np.empty((T, N, G), dy.dtype)
    dh = np.zeros((N, H), dy.dtype) if dh_n is None else dh_n.copy()
    dc = (np.zeros((N, H), dy.dtype) if dc_n is None else dc_n.copy()) if mode == "lstm" else None
    for t in _time_order(T, not cache.reverse):  # the forward order, read backwards
        dh_step = dh + dy[t]  # h_t fans out to the output and to step t+1
        dc_step = dc
        if mask is not None:
            m = mask[t][:, None]
            dh_step = np.where(m, dh_step, 0.0)
            dc_step = None if dc is None else np.where(m, dc, 0.0)
        if mode == "lstm":
            dgx[t], dgh[t], dh_prev, dc_prev = cell.lstm_backward(dh_step, dc_step, steps[t], p,
                                                                  _at(cache.z_h, t), _at(cache.z_c, t), pgrads)
        elif mode == "gru":
            dgx[t], dgh[t], dh_prev = cell.gru_backward(dh_step, steps[t], p, _at(cache.z_h, t), pgrads)
        else:
            dgx[t], dgh[t], dh_prev = cell.rnn_backward(dh_step, steps[t], p, _at(cache.z_h, t), pgrads)
        if mask is None:
            dh = dh_prev
            dc = dc_prev if mode == "lstm" else None
        else:  # padded steps pass the carry through untouched
            dh = np.where(m, dh_prev, dh)
            if mode == "lstm":
                dc = np.where(m, dc_prev, dc)
    return dgx, dgh, dh, dc, pgrads
