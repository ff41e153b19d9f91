"""Compiled whole-sequence kernels (placeholder until the fused loops land).

``sequence_impl(mode, dtype, required)`` returns a ``(forward, backward)`` pair
with the contract of :func:`bptt.recurrence.sequence_forward` /
:func:`bptt.recurrence.sequence_backward`, or None to use the reference loop.
"""


def sequence_impl(mode, dtype, required=False):
    if required:
        raise RuntimeError("fused kernels are not available in this build")
    return None
