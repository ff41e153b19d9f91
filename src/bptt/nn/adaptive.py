"""Adaptive softmax (Grave et al. 2017): a large vocabulary's log-probabilities at a fraction of the
cost of a full softmax — PyTorch's ``nn.AdaptiveLogSoftmaxWithLoss``, with a hand-written backward.

Shape legend
------------
    N     rows (tokens)                    D     input features (``in_features``)
    V     classes (``n_classes``)          S     shortlist size, ``cutoffs[0]``
    C     tail clusters, ``len(cutoffs)``  V_i   cluster i's classes, c_{i+1} − c_i
    d_i   cluster i's projection, ⌊D / div_value^(i+1)⌋
    N_i   rows whose target lies in cluster i

The classes, numbered from the most frequent, are cut at c_0 = S < c_1 < … < c_{C−1} < c_C = V:
a class y < S is a *head* (shortlist) class; c_i ≤ y < c_{i+1} puts it in tail cluster i.  The head
scores the S shortlist classes and one entry per cluster; a cluster's own softmax shares out the
head's probability of that cluster, through a projection that shrinks with the cluster's rank::

    head       z   = x W_hᵀ (+ b_h)          (N, S + C)   W_h = head.weight (S + C, D), b_h = head.bias
               ℓ   = log_softmax(z)                       column y < S: class y;  column S + i: cluster i
    cluster i  u_i = x P_iᵀ                  (N, d_i)     P_i = tail.{i}.0.weight (d_i, D)
               z_i = u_i O_iᵀ                (N, V_i)     O_i = tail.{i}.1.weight (V_i, d_i)
               ℓ_i = log_softmax(z_i)

    log p(y | x) = ℓ[y]                          y < S
                 = ℓ[S + i] + ℓ_i[y − c_i]        c_i ≤ y < c_{i+1}

These are the exact log-probabilities of a distribution over all V classes (they sum to one), not an
estimate.  What makes it cheap is that the loss needs only each row's own cluster: ``forward(x, y)``
multiplies the N_i rows of cluster i by P_i and O_i, so a row costs D(S + C) multiply-adds plus, for
a tail word, d_i (D + V_i); a full softmax costs D V for every row.  :meth:`log_prob` (every class,
for sampling) evaluates every cluster on every row.

Loss and backward
-----------------
``forward`` returns ``output`` (N,), output_n = log p(y_n | x_n), and ``loss`` = −(1/N) Σ_n output_n.
``backward(dloss, doutput)`` differentiates J = dloss · loss + Σ_n doutput_n · output_n.  With
a_n = ∂J/∂output_n = doutput_n − dloss / N, and k_n the head column a row reads (y_n, or S + i),
the log-softmax backward of one picked entry per row gives::

    ∂J/∂z_n     = a_n (onehot(k_n) − softmax(z_n))                              (N, S + C)
    ∂J/∂z_{i,n} = a_n (onehot(y_n − c_i) − softmax(z_{i,n}))   rows of cluster i  (N_i, V_i)
    ∂J/∂O_i += ∂z_iᵀ u_i,    ∂u_i = ∂z_i O_i,    ∂J/∂P_i += ∂u_iᵀ x_i,    ∂x_i += ∂u_i P_i
    ∂J/∂W_h += ∂zᵀ x,        ∂J/∂b_h += Σ_n ∂z_n,  ∂J/∂x += ∂z W_h (+ the clusters' rows)

Parameters are named and initialised as PyTorch's (``head.weight``, ``head.bias`` with
``head_bias``, ``tail.{i}.0.weight``, ``tail.{i}.1.weight``; U(±1/√fan_in)), so
``load_state_dict(torch_module.state_dict())`` works both ways.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn.layers import Linear
from bptt.nn.losses import log_softmax
from bptt.nn.module import Module, as_float_array
from bptt.nn.ops import affine_backward, affine_forward
from bptt.nn.cells import resolve_rng

__all__ = ["AdaptiveLogSoftmaxWithLoss", "ASMOutput"]


class ASMOutput(NamedTuple):
    """What :meth:`AdaptiveLogSoftmaxWithLoss.forward` returns (PyTorch's ``_ASMoutput``)."""

    output: np.ndarray  # (N,), or () for one unbatched row: log p(target | input)
    loss: float  # −mean(output)


class _ClusterCache(NamedTuple):
    rows: np.ndarray  # (N_i,) the rows whose target lies in this cluster
    u: np.ndarray  # (N_i, d_i) their projections x P_iᵀ
    logp: np.ndarray  # (N_i, V_i) ℓ_i = log_softmax(u O_iᵀ)
    rel: np.ndarray  # (N_i,) targets inside the cluster, y − c_i


class _Cache(NamedTuple):
    x: np.ndarray  # (N, D)
    head_logp: np.ndarray  # (N, S + C) ℓ
    pick: np.ndarray  # (N,) the head column each row reads: y, or S + i
    clusters: list  # per cluster: _ClusterCache, or None when no target falls in it
    unbatched: bool  # the input was one (D,) row with a () target


class _Indexed(Module):
    """Children named 0, 1, …: the shape of PyTorch's ModuleList / Sequential, for the parameter names."""

    def __init__(self, modules):
        super().__init__()
        for i, m in enumerate(modules):
            self.add_module(str(i), m)
        self._items = list(modules)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)


class AdaptiveLogSoftmaxWithLoss(Module):
    """Efficient softmax approximation (Grave et al. 2017), PyTorch's constructor and outputs.

    Args:
        in_features: D, features of each input row.
        n_classes: V, number of classes (class ids sorted by decreasing frequency work best).
        cutoffs: increasing whole numbers in [1, V − 1]: where the shortlist ends and each tail
            cluster starts (``[10, 100]``: head classes 0–9, clusters 10–99 and 100–V−1).
        div_value: cluster i projects to ⌊D / div_value^(i+1)⌋ features (default 4.0).
        head_bias: give the head a bias (default False, as PyTorch).

    ``forward(input (N, D), target (N,))`` → ``ASMOutput(output (N,), loss)``; also one row
    ``input (D,)``, ``target ()``.  ``backward(dloss=1.0, doutput=None)`` → ∂J/∂input.
    ``log_prob(input (N, D))`` → (N, V) log-probabilities of every class; ``predict`` → (N,) argmax.
    """

    def __init__(self, in_features, n_classes, cutoffs, div_value=4.0, head_bias=False, dtype=np.float32, rng=None):
        super().__init__()
        cutoffs = list(cutoffs)
        if not cutoffs:
            raise ValueError("cutoffs should be a sequence of length larger than 0")
        for name, v in (("in_features", in_features), ("n_classes", n_classes)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if (any(isinstance(c, bool) or not isinstance(c, (int, float, np.integer, np.floating)) or int(c) != c
                for c in cutoffs)
                or cutoffs != sorted(cutoffs) or len(set(cutoffs)) != len(cutoffs)
                or min(cutoffs) <= 0 or max(cutoffs) > n_classes - 1):
            raise ValueError("cutoffs should be a sequence of unique, positive integers sorted in an increasing "
                             f"order, where each value is between 1 and n_classes-1 = {n_classes - 1}; got {cutoffs}")
        if not (isinstance(div_value, (int, float, np.integer, np.floating)) and np.isfinite(div_value) and div_value > 0):
            raise ValueError(f"div_value must be a finite number > 0, got {div_value!r}")
        self.in_features, self.n_classes = int(in_features), int(n_classes)
        self.cutoffs = [int(c) for c in cutoffs] + [self.n_classes]  # c_0 … c_C, as PyTorch keeps them
        self.div_value, self.head_bias = float(div_value), bool(head_bias)
        self.shortlist_size = self.cutoffs[0]  # S
        self.n_clusters = len(self.cutoffs) - 1  # C
        self.head_size = self.shortlist_size + self.n_clusters  # S + C
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        D = self.in_features
        self.head = self.add_module("head", Linear(D, self.head_size, bias=self.head_bias, dtype=dtype, rng=rng))
        tails = []
        for i in range(self.n_clusters):
            d_i = int(D // (self.div_value ** (i + 1)))
            V_i = self.cutoffs[i + 1] - self.cutoffs[i]
            tails.append(_Indexed([Linear(D, d_i, bias=False, dtype=dtype, rng=rng),  # P_i (d_i, D)
                                   Linear(d_i, V_i, bias=False, dtype=dtype, rng=rng)]))  # O_i (V_i, d_i)
        self.tail = self.add_module("tail", _Indexed(tails))
        self._ctx: _Cache | None = None

    def extra_repr(self):
        sizes = ", ".join(f"{self.cutoffs[i]}-{self.cutoffs[i + 1] - 1}: d={self.tail[i][0].out_features}"
                          for i in range(self.n_clusters))
        return (f"{self.in_features}, {self.n_classes}, head {self.shortlist_size} + {self.n_clusters} clusters "
                f"({sizes}), div_value={self.div_value:g}, head_bias={self.head_bias}")

    # ------------------------------------------------------------------ pieces
    def _input(self, x, what="input"):
        x = as_float_array(x, self._dtype, what)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{what} must have shape (N, {self.in_features}), got {x.shape}")
        return x

    def _head_log_probs(self, x):
        """ℓ = log_softmax(x W_hᵀ + b_h): (N, D) → (N, S + C)."""
        p = self.head.params
        return log_softmax(affine_forward(x, p["weight"], p.get("bias")))

    def _cluster_log_probs(self, i, x):
        """u_i = x P_iᵀ (N, d_i) and ℓ_i = log_softmax(u_i O_iᵀ) (N, V_i) of cluster i."""
        proj, out = self.tail[i]
        u = affine_forward(x, proj.params["weight"], None)
        return u, log_softmax(affine_forward(u, out.params["weight"], None))

    # ------------------------------------------------------------------ forward and backward
    def forward(self, input, target) -> ASMOutput:
        """output_n = log p(y_n | x_n) (N,), loss = −mean(output).  input (N, D), target (N,) integers in [0, V)
        (or input (D,), target ())."""
        y = np.asarray(target)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"target must be integer class ids, got dtype {y.dtype}")
        x = as_float_array(input, self._dtype, "input")
        if y.ndim == 1:
            if x.ndim != 2:
                raise ValueError(f"1D target tensor expects 2D input tensors, but found inputs with size {x.shape}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"Input and target should have the same size in the batch dimension "
                                 f"({x.shape[0]} and {y.shape[0]})")
        elif y.ndim == 0:
            if x.ndim != 1:
                raise ValueError(f"0D target tensor expects 1D input tensors, but found inputs with size {x.shape}")
        else:
            raise ValueError("0D or 1D target tensor expected, multi-target not supported")
        unbatched = y.ndim == 0
        x, y = self._input(x[None] if unbatched else x), y.reshape(-1).astype(np.int64)
        N = len(y)
        if N == 0:
            raise ValueError("an empty batch has no loss (the mean of no rows)")
        if y.min() < 0 or y.max() >= self.n_classes:
            raise ValueError(f"Target values should be in [0, {self.n_classes - 1}], but values in range "
                             f"[{y.min()}, {y.max()}] were found.")
        S = self.shortlist_size
        local = np.zeros(N, self._dtype)  # ℓ_i[y − c_i] of tail rows, 0 for head rows
        pick = y.copy()  # the head column each row reads
        clusters = []
        for i in range(self.n_clusters):
            lo, hi = self.cutoffs[i], self.cutoffs[i + 1]
            rows = np.flatnonzero((y >= lo) & (y < hi))
            if rows.size == 0:  # no target in this cluster: it is not evaluated at all
                clusters.append(None)
                continue
            u, logp = self._cluster_log_probs(i, x[rows])
            rel = y[rows] - lo
            local[rows] = logp[np.arange(len(rows)), rel]
            pick[rows] = S + i
            clusters.append(_ClusterCache(rows, u, logp, rel))
        head_logp = self._head_log_probs(x)
        output = local + head_logp[np.arange(N), pick]  # log p(y | x) = ℓ[k] (+ ℓ_i[y − c_i])
        self._ctx = _Cache(x, head_logp, pick, clusters, unbatched)
        loss = -float(np.mean(output))
        return ASMOutput(output[0] if unbatched else output, loss)

    def backward(self, dloss=1.0, doutput=None):
        """Backward of J = dloss · loss + Σ doutput · output; accumulates every parameter's gradient and
        returns ∂J/∂input (N, D) (or (D,) for an unbatched row)."""
        c = self._saved(self._ctx)
        N = len(c.pick)
        a = np.full(N, -float(dloss) / N, self._dtype)  # a_n = ∂J/∂output_n
        if doutput is not None:
            d = as_float_array(doutput, self._dtype, "doutput")
            if d.shape != ((N,) if not c.unbatched else ()):
                raise ValueError(f"doutput must have the output's shape {(N,) if not c.unbatched else ()}, got {d.shape}")
            a += d.reshape(-1)
        # head: ∂z = a (onehot(k) − softmax(z))
        dz = np.exp(c.head_logp)
        dz *= -a[:, None]
        dz[np.arange(N), c.pick] += a
        p, g = self.head.params, self.head.grads
        dx = affine_backward(dz, c.x, p["weight"], g["weight"], g.get("bias"))
        # each evaluated cluster: ∂z_i = a (onehot(y − c_i) − softmax(z_i)), then O_i, then P_i
        for i, cl in enumerate(c.clusters):
            if cl is None:
                continue
            proj, out = self.tail[i]
            a_i = a[cl.rows]
            dz_i = np.exp(cl.logp)
            dz_i *= -a_i[:, None]
            dz_i[np.arange(len(cl.rows)), cl.rel] += a_i
            du = affine_backward(dz_i, cl.u, out.params["weight"], out.grads["weight"], None)  # (N_i, d_i)
            dx[cl.rows] += affine_backward(du, c.x[cl.rows], proj.params["weight"], proj.grads["weight"], None)
        self._ctx = None
        return dx[0] if c.unbatched else dx

    # ------------------------------------------------------------------ the whole distribution
    def _full_log_prob(self, x, head_logp):
        """(N, V): ℓ[:, :S] for the shortlist, ℓ[:, S + i] + ℓ_i for cluster i (every cluster on every row)."""
        S = self.shortlist_size
        out = np.empty((x.shape[0], self.n_classes), self._dtype)
        out[:, :S] = head_logp[:, :S]
        for i in range(self.n_clusters):
            _, logp = self._cluster_log_probs(i, x)
            out[:, self.cutoffs[i] : self.cutoffs[i + 1]] = logp + head_logp[:, S + i, None]
        return out

    def log_prob(self, input):
        """log p(c | x) for every class c: input (N, D) → (N, V), rows summing to one in probability.
        No gradient (used to sample and to score every class)."""
        x = self._input(input)
        return self._full_log_prob(x, self._head_log_probs(x))

    def predict(self, input):
        """argmax_c log p(c | x): input (N, D) → (N,) int64.  A row whose best head entry is a shortlist
        class needs no cluster (that class beats the whole of every cluster, hence each of its classes);
        only the other rows compute the full distribution (PyTorch's shortcut, the same answer)."""
        x = self._input(input)
        head_logp = self._head_log_probs(x)
        best = np.argmax(head_logp, axis=1)
        tail_rows = np.flatnonzero(best >= self.shortlist_size)
        if tail_rows.size:
            best[tail_rows] = np.argmax(self._full_log_prob(x[tail_rows], head_logp[tail_rows]), axis=1)
        return best.astype(np.int64)
