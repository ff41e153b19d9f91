"""Shared test helpers.

PyTorch is the reference implementation, never a dependency.  Tests that need it
call ``require_torch()``: it skips when torch is missing, unless
``BPTT_REQUIRE_TORCH=1`` is set (as in CI), where a missing torch is a failure.
"""

import os

import numpy as np
import pytest


def require_torch():
    if os.environ.get("BPTT_REQUIRE_TORCH") == "1":
        import torch  # must be importable in CI: an ImportError here fails the test

        return torch
    return pytest.importorskip("torch")


@pytest.fixture
def torch():
    return require_torch()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# In CI, hypothesis draws the same examples every run (no flaky landings); locally it explores.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
