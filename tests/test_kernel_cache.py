"""A cached kernel follows the files it calls into (`methods/kernel_cache.py`), where numba's own
stamp, the hash of the kernel's own file, keeps running the old machine code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metamerge.methods import compiled, kernel_cache

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")

CALLER = "from numba import njit\nfrom helper import value\n\n\n@njit(cache=True)\ndef kernel():\n    return value()\n"


def _helper(number: int) -> str:
    return f"from numba import njit\n\n\n@njit(cache=True)\ndef value():\n    return {number}\n"


def _kernel_in_a_new_process(folder: Path, stamped: bool) -> int:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(folder)!r})
        if {stamped}:
            from metamerge.methods import kernel_cache
            kernel_cache.install(Path({str(folder)!r}).resolve())
        import caller
        print(caller.kernel())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.parametrize("stamped", [True, False])
def test_a_change_to_a_called_file_alone_recompiles_the_caller(tmp_path, stamped):
    (tmp_path / "caller.py").write_text(CALLER)
    (tmp_path / "helper.py").write_text(_helper(1))
    assert _kernel_in_a_new_process(tmp_path, stamped) == 1
    assert list((tmp_path / "__pycache__").glob("caller.kernel-*.nbi"))  # cached on disk
    (tmp_path / "helper.py").write_text(_helper(2))
    assert _kernel_in_a_new_process(tmp_path, stamped) == (2 if stamped else 1)  # unstamped: the stale kernel ran


def test_the_stamp_covers_every_source_file_of_the_folder(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    before = kernel_cache.sources_digest(tmp_path)
    kernel_cache.sources_digest.cache_clear()
    (tmp_path / "b.py").write_text("y = 2\n")
    assert kernel_cache.sources_digest(tmp_path) != before
    kernel_cache.sources_digest.cache_clear()


def test_the_packages_kernels_are_stamped_with_their_folder():
    from metamerge.methods import linear_kernels, norm_kernels, ties_bands

    for kernel in (compiled._second_pass, compiled._uncounted_second_pass, compiled._first_pass,
                   linear_kernels._linear_pass, ties_bands._cuts,
                   norm_kernels._square_sums):
        locator = kernel._cache._impl._locator
        assert isinstance(locator, kernel_cache._FolderStamped) and locator.folder == kernel_cache.KERNELS
        assert locator.get_source_stamp() == kernel_cache.sources_digest(kernel_cache.KERNELS)
