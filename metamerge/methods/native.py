"""Whether the compiled (numba) kernels run, and loading them on first use.

numba and LLVM cost about 130 MB of memory and a second of start-up (0.65 s from numba's disk
cache, measured), which a process that never merges on the CPU or extracts norms should not
pay: a `metamerge` command that only publishes or evaluates imports none of it. Every CPU merge
does since linear merges have a compiled pass too (`linear_kernels.py`, issue 18, stop 29).
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


def ties_bands() -> types.ModuleType:
    """`methods/ties_bands.py`: TIES' first pass and the exact trims from its bands."""
    from metamerge.methods import ties_bands as module

    return module


def linear_kernels() -> types.ModuleType:
    """`methods/linear_kernels.py`: the linear merge's one pass."""
    from metamerge.methods import linear_kernels as module

    return module


def norm_kernels() -> types.ModuleType:
    """`methods/norm_kernels.py`: the norm pass's square sums."""
    from metamerge.methods import norm_kernels as module

    return module
