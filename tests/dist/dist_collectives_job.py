"""Run under ``mpiexec -n K``: each collective of MPIWorld against what it must return.

Every rank checks with ``assert`` (a failure is an uncaught exception: the
world's excepthook aborts the job, so mpiexec exits non-zero) and prints
``ok <rank> <size>`` at the end.  With argv[1] == "mismatch" rank 1 builds a
different model, and ``allreduce_grads`` must end the job with one line.
"""

import os
import sys

import numpy as np

from bptt.dist import MPIWorld, current_world, node_cores
from bptt.dist.threads import USER_THREAD_VARS
from bptt.nn.layers import Linear
from bptt.nn.optim import make_optimizer

world = current_world(require=True)
assert isinstance(world, MPIWorld)
K, r = world.size, world.rank
assert world.threads >= 1 and len(world.rank_hosts) == K
if not any(os.environ.get(v) for v in ("BPTT_THREADS", *USER_THREAD_VARS)):  # each rank's share of the cores
    from bptt.kernels import blas_threads

    assert world.threads == max(1, node_cores() // world.local_size)
    assert blas_threads() == world.threads, (blas_threads(), world.threads)

if len(sys.argv) > 1 and sys.argv[1] == "mismatch":
    model = Linear(3, 2 if r == 0 else 4, dtype=np.float64, rng=0)
    world.allreduce_grads(model, 1.0)
    print(f"rank {r}: mismatch not noticed", flush=True)
    sys.exit(0)

# allreduce_sum: a float, a list of floats, an array
assert world.allreduce_sum(1.5) == 1.5 * K
assert world.allreduce_sum([1.0, float(r)]) == [float(K), float(sum(range(K)))]
arr = world.allreduce_sum(np.full((2, 3), r + 1, dtype=np.float32))
assert arr.dtype == np.float64 and arr.shape == (2, 3) and np.all(arr == K * (K + 1) / 2)

# broadcast_object, first_error
assert world.broadcast_object({"rank": r, "list": [1, 2]}) == {"rank": 0, "list": [1, 2]}
assert world.first_error(None) is None
assert world.first_error("bad from rank 1" if r == 1 else None) == "bad from rank 1"
assert world.first_error(f"bad {r}" if r >= 1 else None) == "bad 1"

# shards of uneven batches cover every row once, weights sum to 1
for n in (K, 7, 10, 11):
    rows = world.broadcast_object(None)  # keep ranks in step
    mine = np.zeros(n)
    mine[world.shard(n)] = 1
    assert np.all(world.allreduce_sum(mine) == 1), n
    assert abs(world.allreduce_sum(world.weight(n)) - 1.0) < 1e-15

# allreduce_grads: Σ_r w_r g_r, in every gradient array, twice (the layout reused)
model = Linear(4, 3, dtype=np.float64, rng=r)
for step in range(2):
    for k, (_, _, g) in enumerate(model.named_parameters()):
        g[...] = (r + 1) * (k + 1) * (step + 1)
    world.allreduce_grads(model, 0.5)
    for k, (_, _, g) in enumerate(model.named_parameters()):
        assert np.all(g == 0.5 * (k + 1) * (step + 1) * K * (K + 1) / 2)

# broadcast_model with an optimizer: rank 0 has taken 3 steps alone (state, step count, lr differ)
model = Linear(4, 3, dtype=np.float64, rng=10 + r)
opt = make_optimizer("adam", model, 1e-2)
if r == 0:
    for _ in range(3):
        for _, _, g in model.named_parameters():
            g[...] = 0.1
        opt.step()
    opt.lr = 0.5
world.broadcast_model(model, opt)
ref = world.broadcast_object((model.state_dict(), opt.state_dict()))
for k, v in model.state_dict().items():
    assert np.array_equal(v, ref[0][k]), k
arrays, meta = opt.state_dict()
assert meta == ref[1][1] and meta["step"] == 3 and opt.lr == 0.5
for k, v in arrays.items():
    assert np.array_equal(v, ref[1][0][k]) and np.any(v != 0), k

world.barrier()
print(f"ok {r} {K}", flush=True)
