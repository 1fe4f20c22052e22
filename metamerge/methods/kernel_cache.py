"""numba's disk cache of this folder's kernels, stamped with every source file in the folder.

numba stamps a cached function with the hash of its own file only. Our kernels call code from
other files, which numba compiles into them (`simd.py`'s `scan_band` intrinsic in TIES' first
pass; `compiled.py`'s gram helpers in the linear pass): after a change to such a file alone (a
`git pull` into an editable install, an edit while developing), the callers' cached machine
code was the old one, and it ran. That happened while this folder was being worked on, and no
test from a fresh clone can see it. Here every function defined in the folder is stamped with
the hash of all of the folder's `.py` files: any change recompiles them all, once.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core import caching

KERNELS = Path(__file__).resolve().parent


@functools.cache
def sources_digest(folder: Path) -> bytes:
    """sha256 over the names and contents of the folder's `.py` files (read once per process)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


class _FolderStamped:
    """A locator for the functions defined in `folder`, stamped with `sources_digest(folder)`;
    functions defined elsewhere go to numba's own locators."""

    folder: Path = KERNELS

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != cls.folder:
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return sources_digest(self.folder)


def install(folder: Path = KERNELS) -> None:
    """Puts the folder's locators ahead of numba's own (where numba would look: a user's cache
    folder, the package's `__pycache__`, the user-wide cache), once per folder and process."""
    classes = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    if classes is None or not all(hasattr(caching, name) for name in names):
        return  # another numba than constraints.txt's, laid out otherwise: its own stamps, as before
    if any(issubclass(cls, _FolderStamped) and cls.folder == folder for cls in classes):
        return
    classes[:0] = [type(f"FolderStamped{name}", (_FolderStamped, getattr(caching, name)), {"folder": folder})
                   for name in names]
