"""Run an exported language model in ONNX Runtime, through the interface of a bptt CharLM (or TransformerLM).

Shape legend: T time steps, N batch streams, V vocabulary, H hidden units, L layers.

:class:`OnnxCharLM` offers what :func:`bptt.lm.sample.generate` and
:func:`bptt.lm.evaluate.evaluate_text` use from a :class:`bptt.lm.model.CharLM`:
``step(ids (N,)) → logits (N, V)`` keeping the state, ``reset_state()``,
``forward(ids (T, N), state) → (logits (T, N, V), state)``, ``train()/eval()``,
``training``, ``blas_scope``, ``dtype``, ``vocab_size`` and ``config``; so
``bptt sample model.onnx`` and ``bptt eval model.onnx`` only need to call
:func:`load_charlm` instead of ``bptt.lm.model.load_model``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from bptt.onnx.from_onnx import read_model
from bptt.onnx.graph import OnnxError, require_onnx
from bptt.onnx.to_onnx import CHARLM_KIND, META_PREFIX
from bptt.onnx.transformer_lm import TRANSFORMER_LM_KIND

__all__ = ["OnnxCharLM", "OnnxTransformerLM", "InferenceOnly", "load_charlm", "session", "read_bptt_metadata"]


def session(model_or_path, threads: int | None = None):
    """An ONNX Runtime CPU session of a ModelProto or a file; warnings silenced, ``threads`` intra-op threads."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only (not the notes about initializers folded away)
    if threads:
        opts.intra_op_num_threads = int(threads)
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. no kernel for an operator in this dtype (float64: docs/onnx.md): one line
        raise OnnxError(f"ONNX Runtime cannot run this model: {' '.join(str(e).split())}") from None


def read_bptt_metadata(model, path, kind: str, config_class) -> dict:
    """The ``bptt.*`` metadata of a language model written by bptt export, checked to be of ``kind``:
    {"graph", "config" (a ``config_class``), "vocab", "meta"} (parsed from JSON); one OnnxError line otherwise."""
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(META_PREFIX + "kind") != kind:
        what = "Transformer language model" if kind == TRANSFORMER_LM_KIND else "char language model"
        raise OnnxError(f"{path}: not a {what} written by bptt export "
                        f"(metadata {META_PREFIX}kind is {props.get(META_PREFIX + 'kind')!r})")
    try:
        return {"graph": props[META_PREFIX + "graph"],
                "config": config_class.from_dict(json.loads(props[META_PREFIX + "config"])),
                "vocab": json.loads(props[META_PREFIX + "vocab"]), "meta": json.loads(props.get(META_PREFIX + "meta", "{}"))}
    except (KeyError, TypeError, ValueError) as e:
        raise OnnxError(f"{path}: broken bptt metadata ({e})") from None


class InferenceOnly:
    """``train()`` / ``eval()`` / ``training`` of a model run by ONNX Runtime: always in eval mode."""

    training = False

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("an ONNX model runs in inference only: it cannot be put in training mode")
        return self

    def eval(self):
        return self.train(False)


class _OnnxLanguageModel(InferenceOnly):
    """What both language-model wrappers offer alike: the file's metadata read and checked (``config``,
    ``graph``, ``vocab_json``, ``meta``), its session, ``vocab_size``, ``dtype``, ``blas_scope``, checked ids."""

    def __init__(self, model, path, threads, kind: str, config_class):
        props = read_bptt_metadata(model, path, kind, config_class)
        self.config, self.graph, self.vocab_json, self.meta = props["config"], props["graph"], props["vocab"], props["meta"]
        if self.graph not in ("sequence", "step"):
            raise OnnxError(f"{path}: unknown graph kind {self.graph!r}")
        self.session = session(model, threads)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.dtype)

    def blas_scope(self, T, N):
        return contextlib.nullcontext()

    def _check_ids(self, ids, ndim):
        ids = np.asarray(ids)
        if ids.ndim != ndim or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expected integer ids of {ndim} dimension(s), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.int64)


class OnnxCharLM(_OnnxLanguageModel):
    """A char LM ONNX file (``bptt.onnx.export_charlm``) in an ONNX Runtime session.

    The state is ``h`` (L, N, H), or ``(h, c)`` for an LSTM, as the CharLM's.  A step
    graph runs ``forward`` one step at a time; a sequence graph runs ``step`` as T = 1.
    """

    def __init__(self, model, path="<model>", threads: int | None = None):
        from bptt.lm.model import CharLMConfig

        super().__init__(model, path, threads, CHARLM_KIND, CharLMConfig)
        self.lstm = self.config.model == "lstm"
        self.state = None

    # ------------------------------------------------------------------ what CharLM offers
    def reset_state(self):
        self.state = None

    def _zeros(self, N):
        z = np.zeros((self.config.layers, N, self.config.hidden), self.dtype)
        return (z, z.copy()) if self.lstm else z

    def _run(self, ids, state):
        feeds = {"ids": ids}
        if self.lstm:
            feeds["h_0"], feeds["c_0"] = (np.ascontiguousarray(s, self.dtype) for s in state)
        else:
            feeds["h_0"] = np.ascontiguousarray(state, self.dtype)
        out = self.session.run(None, feeds)
        return out[0], ((out[1], out[2]) if self.lstm else out[1])

    def forward(self, ids, state=None):
        """ids (T, N) → logits (T, N, V), final state."""
        ids = self._check_ids(ids, 2)
        state = self._zeros(ids.shape[1]) if state is None else state
        if self.graph == "sequence":
            return self._run(ids, state)
        logits = []
        for t in range(ids.shape[0]):
            z, state = self._run(ids[t], state)
            logits.append(z)
        return np.stack(logits), state

    __call__ = forward

    def step(self, ids):
        """One character per stream: ids (N,) → logits (N, V); the state is kept until reset."""
        ids = self._check_ids(np.asarray(ids).reshape(-1), 1)
        h = self.state[0] if isinstance(self.state, tuple) else self.state
        if self.state is None or h.shape[1] != ids.shape[0]:
            self.state = self._zeros(ids.shape[0])
        if self.graph == "step":
            logits, self.state = self._run(ids, self.state)
            return logits
        logits, self.state = self._run(ids[None], self.state)
        return logits[0]


class OnnxTransformerLM(_OnnxLanguageModel):
    """A Transformer LM ONNX file (``bptt.onnx.transformer_lm.export_transformer_lm``) in an ONNX Runtime
    session, with what ``generate`` and ``evaluate_text`` use from a TransformerLM: ``forward(ids (T, N))
    → (logits, None)``, ``step(ids (N,)) → logits (N, V)`` until ``reset_state()``, ``train()/eval()``,
    ``training``, ``blas_scope``, ``dtype``, ``vocab_size``, ``config``.

    A step graph keeps the key/value cache here (its presents fed back as the next step's pasts) and runs
    ``forward`` one position at a time; a sequence graph runs ``step`` over the whole prefix since the
    reset (at most the context), the last position's logits."""

    def __init__(self, model, path="<model>", threads: int | None = None):
        from bptt.lm.transformer import TransformerLMConfig

        super().__init__(model, path, threads, TRANSFORMER_LM_KIND, TransformerLMConfig)
        self.history = None  # sequence graph: ids (t, N) fed to step() since the last reset
        self.cache = None  # step graph: {past input name: array (N, h, t, d)}, t the next position
        # the step graph's outputs after the logits are present_key_i, present_value_i: the next step's pasts
        self.pasts = [o.name.replace("present_", "past_") for o in self.session.get_outputs()[1:]]

    def reset_state(self):
        self.history = self.cache = None

    def forward(self, ids, state=None):
        """ids (T, N), T ≤ context → (logits (T, N, V), None)."""
        ids = self._check_ids(ids, 2)
        if ids.shape[0] > self.config.context:
            raise ValueError(f"a window of {ids.shape[0]} positions exceeds the model's context of {self.config.context}")
        if self.graph == "sequence":
            return self.session.run(None, {"ids": ids})[0], None
        saved, self.cache = self.cache, None  # a window of its own, from position 0
        try:
            return np.stack([self.step(row) for row in ids]), None
        finally:
            self.cache = saved

    __call__ = forward

    def step(self, ids):
        """One token per stream: ids (N,) → logits (N, V) for the next one, as TransformerLM.step."""
        ids = self._check_ids(np.asarray(ids).reshape(-1), 1)
        N, c = ids.shape[0], self.config
        if self.graph == "sequence":
            if self.history is None or self.history.shape[1] != N:
                self.history = np.empty((0, N), np.int64)
            self._check_position(self.history.shape[0])
            self.history = np.concatenate([self.history, ids[None]])
            return self.session.run(None, {"ids": self.history})[0][-1]
        if self.cache is None or self.cache[self.pasts[0]].shape[0] != N:
            empty = np.zeros((N, c.heads, 0, c.d_model // c.heads), self.dtype)
            self.cache = dict.fromkeys(self.pasts, empty)
        t = self.cache[self.pasts[0]].shape[2]  # positions cached so far: this token's position
        self._check_position(t)
        logits, *presents = self.session.run(None, {"ids": ids, "position": np.array([t], np.int64), **self.cache})
        self.cache = dict(zip(self.pasts, presents))
        return logits

    def _check_position(self, t):
        if t >= self.config.context:
            raise ValueError(f"position {t} would exceed the context of {self.config.context} positions; "
                             "call reset_state() (or generate with a sliding window)")


def load_charlm(path, threads: int | None = None):
    """(model, vocab, meta) from an ONNX char LM, as ``bptt.lm.model.load_model`` returns from a checkpoint.

    ``meta`` holds what the export kept (e.g. step, best, eval) plus ``kind``, ``config`` and ``vocab``.
    """
    from bptt.lm.units import units_from_json

    model = read_model(path)
    kind = next((p.value for p in model.metadata_props if p.key == META_PREFIX + "kind"), None)
    wrapper = OnnxTransformerLM if kind == TRANSFORMER_LM_KIND else OnnxCharLM
    lm = wrapper(model, Path(path), threads)
    try:
        vocab = units_from_json(lm.vocab_json)  # characters (a list, or with <unk>), bytes or words
    except ValueError as e:  # DataError: saved units of an unknown kind or shape
        raise OnnxError(f"{path}: broken bptt metadata ({e})") from None
    if len(vocab) != lm.vocab_size:
        raise OnnxError(f"{path}: the vocabulary has {len(vocab)} {vocab.unit_name}s, the model {lm.vocab_size}")
    meta = dict(lm.meta, kind=CHARLM_KIND, config=lm.config.to_dict(), vocab=lm.vocab_json)
    return lm, vocab, meta
