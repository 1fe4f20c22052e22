"""Streaming writes of sharded safetensors checkpoints, and their verification.

The output's shapes and dtypes are known before the first tensor is computed, so each shard's
header is written first and every tensor's bytes are appended as soon as they exist. Peak
memory is therefore one tensor, not one shard, whatever the shard size.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from metamerge.engine.checkpoint import DTYPE_CODES, INDEX_NAME, SINGLE_NAME, CheckpointReader, TensorInfo, read_header
from metamerge.errors import CheckpointError
from metamerge.io.remote_model import RemoteModel


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Starts writing the file's dirty pages to disk now, without waiting (Linux's sync_file_range).

    Left to the kernel, a fresh output's pages stay dirty until the shard's fsync, which then
    writes the whole shard while the merge waits. Started as each tensor lands, the disk works
    while the next tensors are computed, and the fsync (still the commit point) finds little left.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def group_into_shards(tensors: Iterable[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Greedy split in tensor order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in tensors:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [s for s in shards if s]


def shard_filenames(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(shard: list[TensorInfo]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in shard:
        header[info.name] = {
            "dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes planned tensors in order, straight to disk, into shards plus an index.

    With `only=i` it writes shard i alone (same plan, same header, same bytes as in a
    whole-model run) and no index: that is how a shard is merged by its own task on another
    machine, with `write_index` run once all shards exist.
    """

    def __init__(self, out_dir: Path, tensors: list[TensorInfo], max_shard_bytes: int, only: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards = group_into_shards(tensors, max_shard_bytes)
        self.filenames = shard_filenames(len(self.shards))
        if only is not None and not 0 <= only < len(self.shards):
            raise CheckpointError(f"writer: shard {only} does not exist (the plan has {len(self.shards)})")
        self.only = only
        self._order = [(i, info) for i, shard in enumerate(self.shards) for info in shard if only in (None, i)]
        self._next = 0
        self._written = 0
        self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends `tensor`, the whole planned tensor or its next row chunk, to the output."""
        if self._next >= len(self._order):
            raise CheckpointError(f"writer: unexpected extra tensor {name!r}")
        shard_index, info = self._order[self._next]
        nbytes = tensor.numel() * tensor.element_size()
        fits = tensor.shape[1:] == info.shape[1:] or self._written == 0 and tuple(tensor.shape) == info.shape
        if name != info.name or tensor.dtype != info.dtype or not fits or self._written + nbytes > info.nbytes:
            raise CheckpointError(
                f"writer: expected {info.name} {info.dtype} {list(info.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        if self._fh is None:
            self._fh = open(self.out_dir / self.filenames[shard_index], "wb")  # noqa: SIM115
            self._fh.write(_header(self.shards[shard_index]))
        if nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(data.numpy()))
            self._fh.flush()
            start_writeback(self._fh.fileno())
        self._written += nbytes
        if self._written < info.nbytes:
            return
        self._written = 0
        self._next += 1
        is_last_in_shard = self._next == len(self._order) or self._order[self._next][0] != shard_index
        if is_last_in_shard:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def finish(self) -> list[str]:
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise CheckpointError(f"writer: closed before tensor {missing!r} was written")
        if self.only is not None:
            return [self.filenames[self.only]]
        write_index(self.out_dir, self.shards, self.filenames)
        return self.filenames

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_index(out_dir: Path, shards: list[list[TensorInfo]], filenames: list[str]) -> None:
    """model.safetensors.index.json of a planned checkpoint (the same bytes however it was written)."""
    weight_map = {info.name: fname for fname, shard in zip(filenames, shards, strict=True) for info in shard}
    total = sum(info.nbytes for shard in shards for info in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2))


def verify_shard(path: Path, expected: list[TensorInfo]) -> None:
    """Re-reads one written shard's header: exactly the planned tensors, and every byte present."""
    _, infos, _ = read_header(Path(path), f"written shard {Path(path).name}")
    if list(infos.values()) != list(expected):
        raise CheckpointError(f"written shard {Path(path).name}: holds {list(infos)[:5]}…, planned {[i.name for i in expected][:5]}…")


def verify_checkpoint(model_dir: Path, expected: list[TensorInfo]) -> None:
    """Re-opens every shard from disk and checks it holds exactly the planned tensors."""
    verify_reader(CheckpointReader(model_dir, label=f"written checkpoint {model_dir.name}"), expected)


def verify_reader(reader: CheckpointReader, expected: list[TensorInfo]) -> None:
    """The checkpoint a reader sees (on disk or in S3) holds exactly the planned tensors."""
    want = {info.name: info for info in expected}
    got = set(reader.names)
    if got != set(want):
        extra, missing = sorted(got - set(want)), sorted(set(want) - got)
        raise CheckpointError(f"written checkpoint: tensor set differs (missing {missing[:5]}, extra {extra[:5]})")
    for name, info in want.items():
        if reader.info(name) != info:
            raise CheckpointError(f"written checkpoint: {name} is {reader.info(name)}, planned {info}")


AUX_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def is_aux_file(name: str) -> bool:
    return not name.startswith(".") and name != INDEX_NAME and Path(name).suffix not in AUX_SKIP_SUFFIXES


def copy_aux_files(source_dir: Path | RemoteModel, out_dir: Path) -> list[str]:
    """Config, tokenizer and generation files come from the base (a folder, or in S3): a merge changes only weights."""
    copied = []
    if isinstance(source_dir, RemoteModel):
        from metamerge.io.ranged import get_range  # S3's client only where a model is in S3

        for name in sorted(n for n in source_dir.files if is_aux_file(n)):
            (out_dir / name).write_bytes(get_range(source_dir, name, 0, source_dir.files[name].size)
                                         if source_dir.files[name].size else b"")
            copied.append(name)
        return copied
    for file in sorted(Path(source_dir).iterdir()):
        if file.is_file() and is_aux_file(file.name):
            shutil.copy2(file, out_dir / file.name)
            copied.append(file.name)
    return copied
