"""Arrays on cache lines (bptt.runtime.memory)."""

import numpy as np
import pytest

from bptt.runtime import memory


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_aligned_empty_starts_on_a_cache_line(dtype):
    """``aligned_empty`` starts on a 64-byte boundary (NumPy's own arrays start 16 bytes past one
    here), with the shape and dtype asked for, writable and contiguous; arrays under
    ``ALIGN_MIN_BYTES`` are NumPy's own, unless ``min_bytes`` says otherwise."""
    assert memory.aligned_empty((3, 5), dtype).base is None  # small: plain np.empty
    for shape in [(1,), (3, 5), (2, 7, 33), (0, 4), (1, 1024), (3, 40, 17)]:
        for _ in range(5):  # several allocations: the offset NumPy's allocator gives varies with the heap
            a = memory.aligned_empty(shape, dtype)
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
            if a.nbytes >= memory.ALIGN_MIN_BYTES:
                assert a.ctypes.data % 64 == 0
    for _ in range(20):
        small = memory.aligned_empty(3, dtype, min_bytes=0)
        assert small.shape == (3,) and small.ctypes.data % 64 == 0
