"""Run under ``mpiexec -n K``: the ``bptt`` command line, with a way to make one rank fail.

    python dist_cli_job.py [--fail-on-rank R --fail-at-step S] [--hide-mpi4py] -- <bptt arguments>

``--fail-on-rank``: that rank's char-LM job raises a ValueError (a bad input only it sees) at
step S; every rank must stop, with the one line of that error, and mpiexec exit with status 2.
``--hide-mpi4py``: mpi4py cannot be imported (as when the extra is not installed).
"""

import sys

args = sys.argv[1:]
split = args.index("--")
opts, bptt_args = args[:split], args[split + 1 :]

if "--hide-mpi4py" in opts:
    sys.modules["mpi4py"] = None  # import mpi4py → ImportError

if "--fail-on-rank" in opts:
    from bptt.dist import current_world
    from bptt.lm.train import CharLMJob

    fail_rank = int(opts[opts.index("--fail-on-rank") + 1])
    fail_step = int(opts[opts.index("--fail-at-step") + 1])
    original = CharLMJob.forward_backward

    def forward_backward(self, step):
        if step == fail_step and current_world().rank == fail_rank:
            raise ValueError(f"a bad input seen by rank {fail_rank} at step {step}")
        return original(self, step)

    CharLMJob.forward_backward = forward_backward

from bptt.cli import main  # noqa: E402

sys.exit(main(bptt_args))
