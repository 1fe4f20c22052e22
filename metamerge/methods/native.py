"""Whether the compiled (numba) kernels run, and loading them on first use.

numba and LLVM cost about 130 MB of memory and a second of start-up (less from numba's disk
cache), which a process that never runs TIES or a norm pass should not pay: a `metamerge`
command that only publishes, or task arithmetic, imports none of it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types


def use_compiled() -> bool:
    """The compiled kernels when numba is installed; METAMERGE_COMPILED=0 forces the torch ones."""
    return _numba_installed() and os.environ.get("METAMERGE_COMPILED", "1") != "0"


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def ties_kernels() -> types.ModuleType:
    """`methods/compiled.py`: TIES' two passes."""
    from metamerge.methods import compiled

    return compiled


def linear_kernels() -> types.ModuleType:
    """`methods/linear_kernels.py`: the linear merge's one pass."""
    from metamerge.methods import linear_kernels as module

    return module


def norm_kernels() -> types.ModuleType:
    """`methods/norm_kernels.py`: the norm pass's square sums."""
    from metamerge.methods import norm_kernels as module

    return module
