"""Encoder–decoder with optional attention, trained with teacher forcing; greedy and beam decoding.

Shape legend: S source length, T target length, N batch, E embedding size,
H decoder hidden size, H_e encoder hidden size per direction, K = 2 if the encoder
is bidirectional else 1, C = K·H_e memory width, L layers, V target vocabulary,
B beam width.  Token arrays are time-major int64: source (S, N), target (T, N).

The model (Luong et al. 2015, "global attention", without input feeding)::

    m, (h_n[, c_n]) = Encoder(Embed_src(x), lengths)          m (S, N, C): zero past each length
    z   = [h_n of the top layer, both directions (, c_n likewise for an LSTM encoder)]   (N, Z)
    s_0 = Bridge(z):  h_0 = tanh(W_h z + b_h),  c_0 = W_c z + b_c     one (L, N, H) block per layer
    h   = Decoder(Embed_tgt(y_in), s_0)                           (T, N, H), all T steps at once
    with attention:   c_t = Attention(h_t, m, source mask)        (T, N, C)
                      h̃_t = tanh(W_comb [c_t; h_t])               (T, N, H)
                      logits_t = W_out h̃_t + b_out                (T, N, V)
    without:          logits_t = W_out h_t + b_out

The decoder reads the teacher-forced inputs ``<s> y_1 … y_n`` through one call of
the core layer, so the forward and backward passes are whole-sequence, batched
matrix products; attention is applied afterwards to all T steps at once.  The
price is no input feeding (the context at step t cannot feed step t+1), which
is the design Luong et al. call "global attention" before their input-feeding
extension.  The bridge works for any encoder/decoder widths, directions and cell
types, since it is a learned map from the top encoder layer's final states.

Scheduled sampling (teacher-forcing ratio r < 1) uses the two-pass approximation
(Mihaylova & Liu 2019): a first, gradient-free teacher-forced pass predicts every
position, then each decoder input token after ``<s>`` is replaced, with
probability 1 − r, by the model's own prediction for it, and the second pass on
this mixed input is trained.  It keeps the decoder batched; it differs from
Bengio et al.'s step-by-step sampling in that the substituted predictions come
from gold prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bptt.config import DictConfig
from bptt.nn.attention import ATTENTION_KINDS, Attention
from bptt.nn.cells import resolve_rng
from bptt.nn.layers import Embedding, Linear
from bptt.nn.batch_slices import select_streams
from bptt.nn.rnn import GRU, LSTM, RNN
from bptt.nn.losses import cross_entropy, log_softmax
from bptt.nn.module import Module, frozen
from bptt.seq2seq.tasks import BOS, EOS, PAD

__all__ = [
    "Seq2SeqConfig",
    "Seq2Seq",
    "Batch",
    "make_batch",
    "Memory",
    "DecodeResult",
    "train_step",
]

CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


@dataclass
class Seq2SeqConfig(DictConfig):
    src_vocab: int
    tgt_vocab: int
    embedding: int = 32
    hidden: int = 128  # H, the decoder width
    enc_hidden: int = 0  # H_e per direction; 0 → H // K, so that C = H and dot attention fits
    layers: int = 1
    cell: str = "lstm"
    bidirectional: bool = True
    attention: str = "none"  # none | dot | general | additive
    attn_size: int = 0  # A for additive attention; 0 → H
    dropout: float = 0.0  # between stacked recurrent layers

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {', '.join(CELLS)}")
        if self.attention not in ("none", *ATTENTION_KINDS):
            raise ValueError(f"unknown attention {self.attention!r}; expected none, {', '.join(ATTENTION_KINDS)}")
        for k in ("src_vocab", "tgt_vocab", "embedding", "hidden", "layers"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be a positive integer, got {getattr(self, k)!r}")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def encoder_hidden(self) -> int:
        return self.enc_hidden or max(1, self.hidden // self.directions)


class Batch(NamedTuple):
    src: np.ndarray  # (S, N) int64, PAD past each length
    src_len: np.ndarray  # (N,)
    tgt_in: np.ndarray  # (T, N) <s> y_1 … y_n, then PAD
    tgt_out: np.ndarray  # (T, N) y_1 … y_n </s>, then PAD
    tgt_mask: np.ndarray  # (T, N) bool, True on the n + 1 real target positions


def make_batch(src_seqs, tgt_seqs=None) -> Batch:
    """Pad id sequences into time-major arrays (targets optional, e.g. for decoding)."""
    N = len(src_seqs)
    src_len = np.array([len(s) for s in src_seqs], np.int64)
    src = np.full((int(src_len.max()), N), PAD, np.int64)
    for n, s in enumerate(src_seqs):
        src[: len(s), n] = s
    if tgt_seqs is None:
        return Batch(src, src_len, None, None, None)
    T = max(len(t) for t in tgt_seqs) + 1
    tgt_in = np.full((T, N), PAD, np.int64)
    tgt_out = np.full((T, N), PAD, np.int64)
    for n, t in enumerate(tgt_seqs):
        tgt_in[0, n] = BOS
        tgt_in[1 : len(t) + 1, n] = t
        tgt_out[: len(t), n] = t
        tgt_out[len(t), n] = EOS
    mask = np.arange(T)[:, None] <= np.array([len(t) for t in tgt_seqs])[None, :]
    return Batch(src, src_len, tgt_in, tgt_out, mask)


class Memory(NamedTuple):
    """What decoding needs from the encoder, batch-first for attention."""

    m: np.ndarray  # (N, S, C) encoder outputs
    mask: np.ndarray  # (N, S) bool, True at real source positions
    state: object  # decoder initial state: h_0 (L, N, H), or (h_0, c_0) for an LSTM
    # A Transformer's keys and values of the memory, per decoder layer: (K_mem, V_mem) (L, N, h, S, d).
    # Here, not in the decoder state, so that beam search's reordering of the state each step (within an
    # input's own slots, where these rows are all alike) does not copy them.
    cross: tuple | None = None

    def select(self, idx) -> Memory:
        """Rows ``idx`` of every array (beam expansion and reordering)."""
        st = tuple(s[:, idx] for s in self.state) if isinstance(self.state, tuple) else self.state[:, idx]
        cross = None if self.cross is None else tuple(a[:, idx] for a in self.cross)
        return Memory(self.m[idx], self.mask[idx], st, cross)


class DecodeResult(NamedTuple):
    tokens: list  # N lists of ids, without <s> and </s>
    logprob: np.ndarray  # (N,) Σ log p of the chosen tokens, </s> included
    attention: list | None  # N arrays (len(tokens) + 1, S_n): weights at each output step, </s> included


class _FwdCache(NamedTuple):
    batch_shape: tuple  # (S, T, N)
    h_dec: np.ndarray | None  # (N, T, H) decoder outputs (batch-first), attention only
    h_tilde: np.ndarray | None  # (N, T, H) tanh(W_comb [c; h]), attention only
    h0: np.ndarray  # (N, L·H) bridged h_0 after tanh, for its derivative
    enc_state: object  # encoder (h_n[, c_n]): shapes for the gradient handed back to it


class Seq2Seq(Module):
    """The encoder–decoder above.  ``Seq2Seq(config, dtype=np.float32, rng=None)``.

    Children and parameter names: ``src_embed``, ``encoder``, ``bridge``,
    ``tgt_embed``, ``decoder``, [``attention``, ``combine``], ``out``.

    ``forward(src, src_len, tgt_in)`` → logits (T, N, V);  ``backward(dlogits)``
    accumulates every parameter gradient (returns None: token inputs have no gradient).
    """

    def __init__(self, config: Seq2SeqConfig, dtype=np.float32, rng=None):
        super().__init__()
        self.config = cfg = config
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        K, He, H, L = cfg.directions, cfg.encoder_hidden, cfg.hidden, cfg.layers
        self.enc_lstm, self.dec_lstm = cfg.cell == "lstm", cfg.cell == "lstm"
        kw = dict(dtype=self._dtype, rng=rng)
        self.src_embed = self.add_module("src_embed", Embedding(cfg.src_vocab, cfg.embedding, **kw))
        self.encoder = self.add_module(
            "encoder", CELLS[cfg.cell](cfg.embedding, He, L, dropout=cfg.dropout, bidirectional=cfg.bidirectional, **kw)
        )
        self.Z = K * He * (2 if self.enc_lstm else 1)  # bridge input width
        self.bridge = self.add_module("bridge", Linear(self.Z, L * H * (2 if self.dec_lstm else 1), **kw))
        self.tgt_embed = self.add_module("tgt_embed", Embedding(cfg.tgt_vocab, cfg.embedding, **kw))
        self.decoder = self.add_module("decoder", CELLS[cfg.cell](cfg.embedding, H, L, dropout=cfg.dropout, **kw))
        self.use_attention = cfg.attention != "none"
        if self.use_attention:
            C = K * He
            self.attention = self.add_module("attention", Attention(cfg.attention, H, C, cfg.attn_size or H, **kw))
            self.combine = self.add_module("combine", Linear(C + H, H, bias=False, **kw))
        self.out = self.add_module("out", Linear(H, cfg.tgt_vocab, **kw))
        self._ctx = None

    def extra_repr(self):
        c = self.config
        return (f"cell={c.cell}, hidden={c.hidden}, layers={c.layers}, bidirectional={c.bidirectional}, "
                f"attention={c.attention}")

    # ------------------------------------------------------------------ bridge
    def _bridge_forward(self, enc_state):
        """Encoder final states → decoder initial states (see the module docstring)."""
        L, K, H = self.config.layers, self.config.directions, self.config.hidden
        hn, cn = enc_state if self.enc_lstm else (enc_state, None)
        top = slice((L - 1) * K, L * K)
        parts = [hn[top].transpose(1, 0, 2).reshape(hn.shape[1], -1)]  # (N, K·H_e): [fwd; rev]
        if cn is not None:
            parts.append(cn[top].transpose(1, 0, 2).reshape(cn.shape[1], -1))
        z = np.concatenate(parts, axis=1)  # (N, Z)
        s = self.bridge(z)  # (N, L·H [+ L·H])
        N = z.shape[0]
        h0 = np.tanh(s[:, : L * H])  # (N, L·H)
        h0_lnh = np.ascontiguousarray(h0.reshape(N, L, H).transpose(1, 0, 2))
        if self.dec_lstm:
            c0 = np.ascontiguousarray(s[:, L * H :].reshape(N, L, H).transpose(1, 0, 2))
            return (h0_lnh, c0), h0
        return h0_lnh, h0

    def _bridge_backward(self, dstate0, h0, enc_state):
        L, K, H = self.config.layers, self.config.directions, self.config.hidden
        dh0, dc0 = dstate0 if self.dec_lstm else (dstate0, None)
        N = h0.shape[0]
        ds = [dh0.transpose(1, 0, 2).reshape(N, L * H) * (1.0 - h0 * h0)]
        if dc0 is not None:
            ds.append(dc0.transpose(1, 0, 2).reshape(N, L * H))
        dz = self.bridge.backward(np.concatenate(ds, axis=1))  # (N, Z)
        hn = enc_state[0] if self.enc_lstm else enc_state
        He, top = hn.shape[2], slice((L - 1) * K, L * K)
        dhn = np.zeros_like(hn)
        dhn[top] = dz[:, : K * He].reshape(N, K, He).transpose(1, 0, 2)
        if not self.enc_lstm:
            return dhn
        dcn = np.zeros_like(enc_state[1])
        dcn[top] = dz[:, K * He :].reshape(N, K, He).transpose(1, 0, 2)
        return dhn, dcn

    # ------------------------------------------------------------------ training forward / backward
    def forward(self, src, src_len, tgt_in):
        """src (S, N), src_len (N,), tgt_in (T, N) → logits (T, N, V)."""
        src, tgt_in = np.asarray(src), np.asarray(tgt_in)
        S, N = src.shape
        T = tgt_in.shape[0]
        mem, enc_state = self.encoder(self.src_embed(src), None, lengths=src_len)  # (S, N, C)
        state0, h0 = self._bridge_forward(enc_state)
        h, _ = self.decoder(self.tgt_embed(tgt_in), state0)  # (T, N, H)
        if not self.use_attention:
            self._ctx = _FwdCache((S, T, N), None, None, h0, enc_state)
            return self.out(h)
        q = h.transpose(1, 0, 2)  # (N, T, H)
        mask = np.arange(S)[None, :] < np.asarray(src_len)[:, None]  # (N, S)
        context, _ = self.attention(q, mem.transpose(1, 0, 2), mask)  # (N, T, C)
        h_tilde = np.tanh(self.combine(np.concatenate([context, q], axis=2)))  # (N, T, H)
        logits = self.out(h_tilde)  # (N, T, V)
        self._ctx = _FwdCache((S, T, N), q, h_tilde, h0, enc_state)
        return logits.transpose(1, 0, 2)

    def backward(self, dlogits):
        """dlogits (T, N, V) → None; every parameter's gradient accumulates."""
        ctx = self._saved(self._ctx)
        S, T, N = ctx.batch_shape
        if not self.use_attention:
            dh = self.out.backward(dlogits)  # (T, N, H)
            dmem = np.zeros((S, N, self.encoder.num_directions * self.encoder.out_size), self._dtype)
        else:
            dht = self.out.backward(np.asarray(dlogits).transpose(1, 0, 2))  # (N, T, H)
            dcat = self.combine.backward(dht * (1.0 - ctx.h_tilde**2))  # (N, T, C + H)
            C = dcat.shape[2] - self.config.hidden
            dq_att, dm = self.attention.backward(dcat[:, :, :C])
            dh = (dcat[:, :, C:] + dq_att).transpose(1, 0, 2)  # (T, N, H): h feeds both attention and h̃
            dmem = dm.transpose(1, 0, 2)  # (S, N, C)
        demb_t, dstate0 = self.decoder.backward(dh)
        self.tgt_embed.backward(demb_t)
        denc_state = self._bridge_backward(dstate0, ctx.h0, ctx.enc_state)
        demb_s, _ = self.encoder.backward(dmem, denc_state)
        self.src_embed.backward(demb_s)
        self._ctx = None
        return None

    def loss(self, batch: Batch, tgt_in=None):
        """Masked mean cross-entropy over real target positions and its gradient: (loss, dlogits)."""
        logits = self.forward(batch.src, batch.src_len, batch.tgt_in if tgt_in is None else tgt_in)
        return cross_entropy(logits, batch.tgt_out, mask=batch.tgt_mask)

    # ------------------------------------------------------------------ decoding
    def encode(self, src, src_len) -> Memory:
        src = np.asarray(src)
        mem, enc_state = self.encoder(self.src_embed(src), None, lengths=src_len)
        state0, _ = self._bridge_forward(enc_state)
        mask = np.arange(src.shape[0])[None, :] < np.asarray(src_len)[:, None]
        return Memory(np.ascontiguousarray(mem.transpose(1, 0, 2)), mask, state0)

    def decode_step(self, tokens, state, memory: Memory):
        """One decoder step: tokens (N,) → (log-probs (N, V) float64, new state, weights (N, S) or None)."""
        h, state = self.decoder(self.tgt_embed(np.asarray(tokens)[None]), state)  # (1, N, H)
        q = h.transpose(1, 0, 2)  # (N, 1, H)
        weights = None
        if self.use_attention:
            context, a = self.attention(q, memory.m, memory.mask)
            q = np.tanh(self.combine(np.concatenate([context, q], axis=2)))
            weights = a[:, 0]
        logits = self.out(q)[:, 0]
        return log_softmax(logits.astype(np.float64)), state, weights

    def score(self, src, src_len, tgt_seqs) -> np.ndarray:
        """(N,) log p(y | x) of given outputs under the model, </s> included."""
        b = make_batch([np.asarray(src[: src_len[n], n]) for n in range(len(src_len))], tgt_seqs)
        logp = log_softmax(self.forward(b.src, b.src_len, b.tgt_in).astype(np.float64))
        self._ctx = None
        picked = np.take_along_axis(logp, b.tgt_out[..., None], axis=2)[..., 0]
        return np.where(b.tgt_mask, picked, 0.0).sum(axis=0)

    def greedy(self, src, src_len, max_len: int, return_attention=False, memory=None) -> DecodeResult:
        """Argmax decoding, batched; each row stops at its </s> (or after max_len tokens).
        ``memory``: ``encode(src, src_len)`` where the caller has it already (beam search)."""
        was_training = self.training
        self.eval()
        try:
            with frozen(self):  # decoding changes no weight: pack them once
                memory = self.encode(src, src_len) if memory is None else memory
                N = memory.m.shape[0]
                tokens = np.full(N, BOS, np.int64)
                state, done = memory.state, np.zeros(N, bool)
                out, weights, total = [], [], np.zeros(N)
                for _ in range(max_len):
                    logp, state, a = self.decode_step(tokens, state, memory)
                    tokens = np.argmax(logp, axis=1)
                    total += np.where(done, 0.0, logp[np.arange(N), tokens])
                    tokens[done] = PAD
                    out.append(tokens)
                    weights.append(a)
                    done |= tokens == EOS
                    if done.all():
                        break
        finally:
            self.train(was_training)
        return _collect(np.stack(out, 1), total, weights if return_attention and self.use_attention else None, src_len)

    def beam_search(self, src, src_len, beam: int, max_len: int, alpha: float = 0.0,
                    return_attention=False) -> DecodeResult:
        """Beam search, batched over the N inputs (N·B hypotheses advance together).

        A hypothesis that emits </s> is frozen (it can only be extended by <pad>
        at zero cost) and keeps its slot; search stops when every slot is frozen
        or after max_len tokens.  The answer is the slot maximising
        log p / lp(|y|) with GNMT's lp(n) = ((5 + n) / 6)^α (α = 0: plain log p).
        Width 1 takes the argmax at every step, which is greedy decoding exactly; for
        wider beams greedy's answer is kept as a candidate, so the result never
        scores below greedy on the same objective.
        """
        if int(beam) < 1:
            raise ValueError(f"beam width must be at least 1, got {beam}")
        B = int(beam)
        was_training = self.training
        self.eval()
        try:
            with frozen(self):  # decoding changes no weight: pack them once
                encoded = self.encode(src, src_len)
                N, S = encoded.mask.shape
                memory = encoded.select(np.repeat(np.arange(N), B))  # row n·B + b is slot b of input n
                state = memory.state
                scores = np.full((N, B), -np.inf)
                scores[:, 0] = 0.0  # all slots start as the same empty hypothesis: keep only one
                finished = np.zeros((N, B), bool)
                length = np.zeros((N, B))
                tokens = np.full(N * B, BOS, np.int64)
                toks, backs, atts = [], [], []
                for _ in range(max_len):
                    logp, state, a = self.decode_step(tokens, state, memory)
                    V = logp.shape[1]
                    logp = logp.reshape(N, B, V)
                    logp[finished] = -np.inf
                    logp[finished, PAD] = 0.0
                    cand = (scores[:, :, None] + logp).reshape(N, B * V)
                    # stable sort: among equal scores the lowest (slot, token) wins, as np.argmax does
                    best = np.argsort(-cand, axis=1, kind="stable")[:, :B]
                    scores = np.take_along_axis(cand, best, axis=1)
                    back, tok = best // V, best % V
                    was_finished = np.take_along_axis(finished, back, axis=1)
                    length = np.take_along_axis(length, back, axis=1) + ~was_finished
                    finished = was_finished | (tok == EOS)
                    rows = (np.arange(N)[:, None] * B + back).reshape(-1)
                    state = select_streams(state, rows)
                    tokens = tok.reshape(-1)
                    toks.append(tok)
                    backs.append(back)
                    atts.append(None if a is None else a.reshape(N, B, S))
                    if finished.all():
                        break
        finally:
            self.train(was_training)
        final = scores / (((5.0 + length) / 6.0) ** alpha) if alpha else scores
        slot = np.argmax(final, axis=1)  # (N,)
        seq, weights = [], []
        for t in reversed(range(len(toks))):  # follow the back pointers from the chosen slots
            seq.append(toks[t][np.arange(N), slot])
            if atts[t] is not None:
                weights.append(atts[t][np.arange(N), slot])
            slot = backs[t][np.arange(N), slot]
        out = np.stack(seq[::-1], axis=1)
        best = np.argmax(final, axis=1)[:, None]
        logprob = np.take_along_axis(scores, best, axis=1)[:, 0]
        result = _collect(out, logprob, weights[::-1] if (return_attention and weights) else None, src_len)
        if B == 1:
            return result
        # A beam can lose greedy's path (seen on 1 of 2000 reversal inputs without attention),
        # so greedy's answer is one more candidate: the result never scores below greedy's.
        greedy = self.greedy(src, src_len, max_len, return_attention, memory=encoded)  # not encoded twice
        beam_obj = np.take_along_axis(final, best, axis=1)[:, 0]
        g_len = np.array([min(len(sq) + 1, max_len) for sq in greedy.tokens], np.float64)  # </s> counts
        g_obj = greedy.logprob / (((5.0 + g_len) / 6.0) ** alpha) if alpha else greedy.logprob
        for n in np.flatnonzero(g_obj > beam_obj):
            result.tokens[n] = greedy.tokens[n]
            result.logprob[n] = greedy.logprob[n]
            if result.attention is not None and greedy.attention is not None:
                result.attention[n] = greedy.attention[n]
        return result

    def translate(self, src, src_len, max_len: int, beam: int = 1, alpha: float = 0.0, return_attention=False):
        """Greedy for beam ≤ 1, else beam search."""
        if beam <= 1:
            return self.greedy(src, src_len, max_len, return_attention)
        return self.beam_search(src, src_len, beam, max_len, alpha, return_attention)


def _collect(out, logprob, weights, src_len) -> DecodeResult:
    """(N, steps) ids → per-row lists up to </s>; attention cut to each row's lengths."""
    N = out.shape[0]
    seqs, atts = [], [] if weights is not None else None
    for n in range(N):
        row = out[n]
        stop = np.flatnonzero(row == EOS)
        k = int(stop[0]) if stop.size else len(row)
        seqs.append([int(i) for i in row[:k]])
        if atts is not None:
            atts.append(np.stack([w[n, : int(src_len[n])] for w in weights[: min(k + 1, len(weights))]]))
    return DecodeResult(seqs, np.asarray(logprob, np.float64), atts)


def train_step(model: Seq2Seq, batch: Batch, teacher_forcing: float = 1.0, rng=None) -> float:
    """Forward, masked cross-entropy, backward (gradients accumulate; the caller steps the optimizer).

    With ``teacher_forcing`` < 1, the two-pass scheduled sampling of the module docstring.
    """
    tgt_in = batch.tgt_in
    if teacher_forcing < 1.0:
        rng = resolve_rng(rng)
        was_training = model.training
        logits = model.forward(batch.src, batch.src_len, tgt_in)  # pass 1: predictions from gold prefixes
        model._ctx = None
        pred = np.argmax(logits, axis=2)  # (T, N): pred[t] is the model's guess for tgt_in[t + 1]
        model.train(was_training)
        swap = rng.random(tgt_in.shape) >= teacher_forcing
        swap[0] = False  # <s> always
        swap &= batch.tgt_mask  # only real positions (tgt_in[t] is real where t ≤ length)
        tgt_in = tgt_in.copy()
        tgt_in[1:][swap[1:]] = pred[:-1][swap[1:]]
    loss, dlogits = model.loss(batch, tgt_in)
    model.backward(dlogits)
    return loss
