"""Shared test helpers.

PyTorch is the reference implementation, never a dependency.  Tests that need it
call ``require_torch()``: it skips when torch is missing, unless
``BPTT_REQUIRE_TORCH=1`` is set (as in CI), where a missing torch is a failure.
Numba is a dependency whose absence the library survives (the NumPy loops run
instead); the tests of the compiled paths call ``require_numba()``, which is held
to the same rule, so a CI without Numba fails instead of skipping them.
"""

import os

import numpy as np
import pytest


def require_torch():
    if os.environ.get("BPTT_REQUIRE_TORCH") == "1":
        import torch  # must be importable in CI: an ImportError here fails the test

        return torch
    return pytest.importorskip("torch")


def require_numba():
    if os.environ.get("BPTT_REQUIRE_TORCH") == "1":
        import numba  # must be importable in CI

        return numba
    return pytest.importorskip("numba")


@pytest.fixture
def torch():
    return require_torch()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# In CI (CI set by the runner, or BPTT_REQUIRE_TORCH=1 as .ci/run sets it), hypothesis draws the
# same examples every run (no flaky landings); locally it explores.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") or os.environ.get("BPTT_REQUIRE_TORCH") == "1":
    settings.load_profile("ci")
