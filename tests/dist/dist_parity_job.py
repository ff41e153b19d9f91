"""Run under ``mpiexec -n K`` (or plain python): data-parallel training of a small CharLM.

Each rank builds the model from its own seed (seed + rank), so the run only
matches one process if :meth:`broadcast_model` really copies rank 0's weights.
Every step: a fresh (T, N) window of ids (the same on every rank), this rank's
columns of it, the hidden state of its own streams carried to the next step,
loss = mean over its T·n_r characters, backward, ``allreduce_grads`` with
w_r = n_r / N, norm clipping, optimizer step.  Rank 0 writes the final
parameters to argv[1] (npz).  ``train(world, ...)`` is imported by the test to
build the one-process reference.
"""

import sys

import numpy as np

from bptt.lm.model import CharLM, CharLMConfig
from bptt.nn.optim import clip_grad_norm, make_optimizer

V, T, N, STEPS = 11, 5, 7, 20
OPTIMIZERS = {"adam": {"lr": 1e-2}, "rmsprop": {"lr": 1e-2, "momentum": 0.5}, "sgd": {"lr": 1.0, "momentum": 0.9}}


def build(rank):
    """The model as rank ``rank`` initialises it: different on each rank until the broadcast."""
    cfg = CharLMConfig(vocab_size=V, model="lstm", hidden=8, layers=2, dropout=0.0, dtype="float64")
    return CharLM(cfg, rng=100 + rank)


def train(world, optimizer="adam", batch=N, steps=STEPS):
    model = build(world.rank)
    opt = make_optimizer(optimizer, model, **OPTIMIZERS[optimizer])
    world.broadcast_model(model, opt)
    cols = world.shard(batch)
    w = world.weight(batch)
    data = np.random.default_rng(7)
    state = None
    for _ in range(steps):
        ids = data.integers(0, V, size=(T + 1, batch))  # the global window: every rank draws it whole
        x, y = ids[:-1, cols], ids[1:, cols]
        opt.zero_grad()
        _, dlogits, state = model.loss(x, y, state)
        model.backward(dlogits)
        world.allreduce_grads(model, w)
        clip_grad_norm(model, 0.5)  # after the reduction: the norm of the full-batch gradient
        opt.step()
    return model.state_dict()


if __name__ == "__main__":
    from bptt.dist import current_world

    world = current_world(require=len(sys.argv) > 3 and sys.argv[3] == "require")
    optimizer = sys.argv[2] if len(sys.argv) > 2 else "adam"
    params = train(world, optimizer)
    if world.is_main:
        np.savez(sys.argv[1], **params)
        print(world.layout_line(), flush=True)
