"""Run under ``mpiexec -n 2``: rank 1 fails in the middle of a loop of allreduces (argv[1] says how).

sigkill: rank 1 SIGKILLs itself;  raise: rank 1 raises an uncaught exception;
exit: rank 1 returns from the script (sys.exit(0)) while rank 0 keeps reducing;
hang: rank 1 sleeps for an hour (rank 0's watchdog must end the job after BPTT_MPI_TIMEOUT).
In each case the job must end, with a non-zero status, instead of rank 0 waiting forever.
"""

import os
import signal
import sys
import time

import numpy as np

from bptt.dist import current_world

mode = sys.argv[1]
world = current_world(require=True)
grads = np.ones(1000)
for i in range(1_000_000):
    world.allreduce_sum(grads)
    if world.rank == 1 and i == 50:
        print(f"rank 1 fails now ({mode})", flush=True)
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "raise":
            raise ValueError("a bad input seen by rank 1 only")
        elif mode == "exit":
            sys.exit(0)
        elif mode == "hang":
            time.sleep(3600)
print(f"rank {world.rank} finished the loop: the failure was not noticed", flush=True)
