"""Data-parallel training over MPI (mpi4py + an MPI library such as the ``mpich`` wheel).

Optional: ``pip install "bptt[mpi]"``.  Nothing here imports mpi4py until a
process launched by ``mpiexec`` with more than one rank asks for its world.

A training loop written against :class:`World` runs unchanged in one process
and under ``mpiexec -n K``::

    world = current_world()                 # SingleProcess, or MPIWorld under mpiexec
    world.broadcast_model(model, optimizer) # everyone starts from rank 0's weights
    rows = world.shard(N)                   # this rank's rows of the global batch
    for step in ...:
        loss, dlogits, _ = model.loss(x[:, rows], y[:, rows])   # mean over this rank's rows
        model.backward(dlogits)
        world.allreduce_grads(model, world.weight(N))   # now the full-batch mean gradient
        clip_grad_norm(model, 5.0); optimizer.step()
    if world.is_main: save(...)

See :mod:`bptt.dist.world` for the equations and the failure behaviour.
"""

from bptt.dist.threads import node_cores, thread_budget
from bptt.dist.world import (
    INSTALL_HINT,
    DistError,
    MPIWorld,
    SingleProcess,
    World,
    current_world,
    launch_info,
    mark_all_ranks,
    raised_on_all_ranks,
    report_failure,
    shard_sizes,
)

__all__ = [
    "DistError", "World", "SingleProcess", "MPIWorld", "current_world", "launch_info", "shard_sizes",
    "INSTALL_HINT", "node_cores", "thread_budget", "mark_all_ranks", "raised_on_all_ranks", "report_failure",
]
