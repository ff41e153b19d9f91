"""bptt.dist: the world outside MPI (in this process), and K-rank jobs launched with mpiexec.

The mpiexec tests run the small scripts next to this file as separate jobs
(``mpiexec -n K python tests/dist/<script>``) and look at what they wrote and
their exit status.  Without mpi4py or mpiexec they skip, unless
``BPTT_REQUIRE_TORCH=1`` (CI), where they fail: CI installs ``.[test,mpi,onnx]``.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bptt.dist import DistError, SingleProcess, current_world, launch_info, shard_sizes, thread_budget
from bptt.dist import world as world_mod
from bptt.nn.layers import Linear

HERE = Path(__file__).resolve().parent
LAUNCHER_VARS = [v for pair in world_mod.LAUNCHER_VARS for v in pair]  # (size, rank) names


def load_job(name):
    """A module of this folder by file name (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = load_job("mpi_launch")


@pytest.fixture
def mpirun():
    """run(K, script, *args, timeout=, extra_env=) → CompletedProcess of ``mpiexec -n K python tests/dist/script``."""
    return launch.launcher()


@pytest.fixture
def clean_world(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    world_mod.forget_world()
    yield
    world_mod.forget_world()


# ============================================================================ in this process
def test_launch_info_reads_each_launcher():
    assert launch_info({}) is None
    assert launch_info({"PMI_SIZE": "4", "PMI_RANK": "2"}) == (4, 2)
    assert launch_info({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1"}) == (3, 1)
    assert launch_info({"MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_RANK": "0"}) == (2, 0)


def test_without_launcher_the_world_is_one_process(clean_world):
    world = current_world()
    assert isinstance(world, SingleProcess) and world.size == 1 and world.rank == 0 and world.is_main
    assert current_world() is world
    assert world.shard(5) == slice(0, 5) and world.weight(5) == 1.0


def test_require_without_mpiexec_names_the_command_and_the_extra(clean_world):
    with pytest.raises(DistError) as e:
        current_world(require=True)
    msg = str(e.value)
    assert "\n" not in msg and "mpiexec" in msg and 'pip install "bptt[mpi]"' in msg


def test_under_mpiexec_without_mpi4py_is_an_error_not_k_runs(clean_world, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py → ImportError
    with pytest.raises(DistError) as e:
        current_world()
    msg = str(e.value)
    assert "\n" not in msg and 'pip install "bptt[mpi]"' in msg and "2 ranks" in msg


def test_a_single_rank_launch_is_one_process(clean_world, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert isinstance(current_world(), SingleProcess)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shards_cover_every_row_once_and_weights_sum_to_one(size):
    for n in range(size, 3 * size + 4):
        sizes = shard_sizes(n, size)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        rows = []
        for r in range(size):
            w = SingleProcess()
            w.size, w.rank = size, r
            s = w.shard(n)
            rows.extend(range(n)[s])
            assert w.weight(n) == sizes[r] / n
        assert rows == list(range(n))


def test_a_batch_smaller_than_the_world_is_rejected_clearly():
    with pytest.raises(DistError, match="batch of 2 rows cannot be shared by 3 ranks"):
        shard_sizes(2, 3)


def test_single_process_collectives_are_the_identity():
    world = SingleProcess()
    model = Linear(3, 2, dtype=np.float64, rng=0)
    for _, _, g in model.named_parameters():
        g[...] = 2.0
    world.allreduce_grads(model, 1.0)
    assert all(np.all(g == 2.0) for _, _, g in model.named_parameters())
    world.allreduce_grads(model, 0.25)  # Σ over one rank of w·g
    assert all(np.all(g == 0.5) for _, _, g in model.named_parameters())
    assert world.allreduce_sum(1.5) == 1.5 and world.allreduce_sum([1, 2]) == [1.0, 2.0]
    assert world.broadcast_object({"a": 1}) == {"a": 1} and world.first_error("x") == "x"


def test_thread_budget_shares_the_cores_unless_the_user_chose(monkeypatch):
    for var in ("BPTT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert thread_budget(2, cores=8) == 4
    assert thread_budget(3, cores=8) == 2
    assert thread_budget(3, cores=2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_budget(2, cores=8) == 3
    monkeypatch.setenv("BPTT_THREADS", "5")
    assert thread_budget(2, cores=8) == 5


# ============================================================================ mpiexec jobs
PARITY = load_job("dist_parity_job")


@pytest.fixture(scope="module")
def reference():
    """One process, full batch: the parameters every K-rank run must reproduce."""
    cache = {}

    def get(optimizer):
        if optimizer not in cache:
            cache[optimizer] = PARITY.train(SingleProcess(), optimizer)
        return cache[optimizer]

    return get


@pytest.mark.parametrize("k, optimizer", [(1, "adam"), (2, "adam"), (3, "adam"), (2, "rmsprop"), (3, "sgd")])
def test_k_ranks_train_the_same_parameters_as_one_process(mpirun, reference, tmp_path, k, optimizer):
    """A batch of 7 streams: 7 rows on 1 rank, 4+3 on 2, 3+2+2 on 3 (weighted); 20 steps, float64."""
    out = tmp_path / "params.npz"
    proc = mpirun(k, "dist_parity_job.py", out, optimizer, "require")
    assert proc.returncode == 0, proc.stderr
    assert f"{k} ranks on 1 host" in proc.stdout
    got, ref = np.load(out), reference(optimizer)
    assert sorted(got.files) == sorted(ref)
    init = PARITY.build(rank=0).state_dict()
    for name, p in ref.items():
        assert np.max(np.abs(p - init[name])) > 1e-3, f"{name} did not train: the comparison would prove nothing"
        rel = np.max(np.abs(got[name] - p)) / np.max(np.abs(p))
        assert rel < 1e-12, f"{name}: relative difference {rel:.2e} with {k} ranks"


@pytest.mark.parametrize("k", [2, 3])
def test_collectives_return_what_they_promise(mpirun, k):
    proc = mpirun(k, "dist_collectives_job.py")
    assert proc.returncode == 0, proc.stderr
    for r in range(k):
        assert f"ok {r} {k}" in proc.stdout, proc.stdout + proc.stderr


def test_ranks_with_different_models_stop_with_one_line(mpirun):
    proc = mpirun(2, "dist_collectives_job.py", "mismatch")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bptt: error:")]
    assert errors == ["bptt: error: rank 1's parameters differ from rank 0's (names, shapes or dtype): every rank "
                      "must build the same model"]
    assert "mismatch not noticed" not in proc.stdout


@pytest.mark.parametrize("mode, says", [
    ("sigkill", None),  # hydra ends the job itself
    ("raise", "bptt: error: rank 1 stopped on an uncaught ValueError"),
    ("exit", "bptt: error: rank 1 is exiting but another rank did not reach its end"),
    ("hang", "bptt: error: rank 0 waited more than 3 s in allreduce_sum"),
])
def test_a_failing_rank_ends_the_whole_job(mpirun, mode, says):
    """Rank 1 fails inside a loop of allreduces; mpiexec must return (non-zero), not wait forever.

    The subprocess timeout is the bound: 60 s, against 3 s for the safeguards (BPTT_MPI_TIMEOUT=3).
    """
    proc = mpirun(2, "dist_fault_job.py", mode, timeout=60, extra_env={"BPTT_MPI_TIMEOUT": "3"})
    assert "rank 1 fails now" in proc.stdout
    assert proc.returncode != 0
    assert "finished the loop" not in proc.stdout
    if says:
        assert says in proc.stderr, proc.stderr


def test_without_mpi4py_the_mpiexec_tests_fail_in_ci_and_skip_elsewhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("BPTT_REQUIRE_TORCH", "1")
    with pytest.raises(pytest.fail.Exception, match=r"mpi4py not installed: CI must install bptt\[mpi\]"):
        launch.require_mpi()
    monkeypatch.delenv("BPTT_REQUIRE_TORCH")
    with pytest.raises(pytest.skip.Exception, match="mpi4py not installed"):
        launch.require_mpi()
