"""The BLAS a benchmark ran on, as one line for its header (every benchmark prints it: OpenBLAS picks
its kernel from the CPU unless OPENBLAS_CORETYPE forces one, and a forced one can be 5-7x slower)."""

import os


def blas_line() -> str:
    """``openblas 0.3.31 SkylakeX (2 threads); OPENBLAS_CORETYPE=unset, OPENBLAS_L2_SIZE=unset``: NumPy's
    BLAS first (threadpoolctl's view of the loaded libraries), then any other (PyTorch's, if loaded)."""
    from threadpoolctl import threadpool_info

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    libs.sort(key=lambda i: "numpy" not in i.get("filepath", ""))
    names = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} ({i.get('num_threads')} threads"
             f"{'' if 'numpy' in i.get('filepath', '') else ', ' + os.path.basename(i.get('filepath', ''))})"
             for i in libs]
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))
    return f"{'; '.join(names) or 'unknown'}; {env}"
