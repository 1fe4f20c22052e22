"""Streaming reads of (sharded) safetensors checkpoints.

Reading goes one tensor (or row chunk) at a time, after the header has been checked against
the file: a truncated or corrupt checkpoint is one clear CheckpointError before any work
starts. A piece is read into a caller's buffer (pread) or mapped from the page cache.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from metamerge.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:  # on the hot path of every read and write: no tensor allocation here
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_ELEMENTS = 1 << 23  # 32 MB of float32 per input per step: bounds a merge's memory


def read_header(path: Path, label: str) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Parses and validates a safetensors header; returns (data start, infos, byte ranges).

    Every byte range is checked against the file size here, so a truncated download fails
    at open with the file's name instead of mid-merge with a short read.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            length = header_length(prefix, size, label, path.name)
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read {path.name} ({exc.strerror})") from None
    return parse_header(raw, size, label, path.name)


def header_length(prefix: bytes, size: int, label: str, filename: str) -> int:
    """The header's byte count from a file's first 8 bytes, checked against the file's size."""
    if len(prefix) < 8:
        raise CheckpointError(f"{label}: {filename} is not a safetensors file (only {size} bytes)")
    length = int.from_bytes(prefix[:8], "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{label}: {filename} is truncated or not safetensors (header of {length} bytes, file of {size})")
    return length


def parse_header(raw: bytes, size: int, label: str, filename: str,
                 ) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """The header's JSON (bytes 8 … 8+len) of a file of `size` bytes: local and ranged reads share it."""
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{label}: {filename} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: {filename} has a corrupt safetensors header")
    data_start = 8 + len(raw)
    infos: dict[str, TensorInfo] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{label}: {filename} has a corrupt entry for tensor {name!r}") from None
        if code not in CODE_DTYPES:
            raise CheckpointError(f"{label}: tensor {name!r} in {filename} has unsupported dtype {code}")
        info = TensorInfo(name, CODE_DTYPES[code], shape)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{label}: tensor {name!r} in {filename} has inconsistent byte offsets")
        if data_start + end > size:
            raise CheckpointError(
                f"{label}: {filename} is truncated (tensor {name!r} needs {data_start + end} bytes, file has {size})"
            )
        infos[name] = info
        ranges[name] = (data_start + begin, data_start + end)
    return data_start, infos, ranges


class CheckpointReader:
    """Name-addressed view of every safetensors shard in a folder.

    Tensors are read with pread into freshly allocated memory rather than mmap'd: mapped
    pages count towards the process's resident memory until unmapped, which would make a
    merge's RSS grow with model size. Owned buffers are freed as soon as a tensor is done.
    """

    def __init__(self, model_dir: Path, label: str | None = None):
        self.dir = Path(model_dir)
        self.label = label or self.dir.name
        self._file_of: dict[str, str] = {}
        self._info: dict[str, TensorInfo] = {}
        self._range: dict[str, tuple[int, int]] = {}
        self._fds: dict[str, int] = {}
        for file in self._shard_files():
            _, infos, ranges = self._header(file)
            for name, info in infos.items():
                if name in self._file_of:
                    raise CheckpointError(f"{self.label}: tensor {name!r} appears in two shards")
                self._file_of[name] = file
                self._info[name] = info
                self._range[name] = ranges[name]

    def _shard_files(self) -> list[str]:
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.label}: {INDEX_NAME} is not a valid index ({exc})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).exists()]
            if missing:
                raise CheckpointError(f"{self.label}: shard(s) named in {INDEX_NAME} are missing: {', '.join(missing)}")
            return files
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.label}: no .safetensors files in {self.dir}")
        return files

    def _header(self, file: str) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]]]:
        return read_header(self.dir / file, self.label)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return fd

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def piece_shape(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, ...]:
        shape = self._info[name].shape
        return shape if rows is None or not shape else (rows[1] - rows[0], *shape[1:])

    def read(self, name: str, pin: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A new tensor holding `name`'s data, or rows [r0, r1) of it (dim 0).

        Pinned host memory when asked, for fast host-to-device copies.
        """
        info = self._info.get(name)
        if info is None:
            raise CheckpointError(f"{self.label}: has no tensor {name!r}")
        tensor = torch.empty(self.piece_shape(name, rows), dtype=info.dtype, pin_memory=pin)
        self.read_into(name, tensor, rows)
        return tensor

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Fills a caller-owned contiguous buffer of the tensor's dtype: no allocation, no page faults."""
        info = self._info.get(name)
        if info is None:
            raise CheckpointError(f"{self.label}: has no tensor {name!r}")
        _, begin, end = self.byte_range(name, rows)
        if out.dtype != info.dtype or not out.is_contiguous() or out.numel() * out.element_size() != end - begin:
            raise CheckpointError(f"{self.label}: buffer does not fit tensor {name!r}")
        if end > begin:
            self._read_range(name, self._file_of[name], begin, memoryview(out.reshape(-1).view(torch.uint8).numpy()))

    def _read_range(self, name: str, file: str, begin: int, view: memoryview) -> None:
        """Fills `view` with the bytes of `file` from `begin` on (pread: no mmap, no page-cache RSS)."""
        fd, done = self._fd(file), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.label}: short read of tensor {name!r} (file changed or truncated?)")
            done += got

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> tuple[str, int, int]:
        """(file, begin, end) of a tensor or its rows [r0, r1): what a ranged reader fetches."""
        info = self._info[name]
        begin, end = self._range[name]
        if rows is not None and info.shape:
            row_bytes = info.nbytes // max(info.shape[0], 1)
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        return self._file_of[name], begin, end

    def expect(self, reads: list[tuple[str, tuple[int, int] | None]]) -> None:
        """The reads to come, in order: a local file needs no plan (a ranged reader fetches ahead)."""

    def mapped_f32(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The piece straight from the page cache (mmap), no copy; None where a read must copy.

        Copy-on-write, so no write can reach the file. Its pages count as this process's memory
        only while the tensor lives: dropping the last reference unmaps them, which keeps the
        merge's memory at its pieces in flight, as with reads. Only float32 at a 4-byte aligned
        offset maps (other dtypes need a conversion anyway). A file truncated by another process
        while mapped ends this one (SIGBUS) instead of a short read's error: inputs are opened
        from the run's own cache or the user's folders, which nothing truncates in place.
        """
        info = self._info.get(name)
        if info is None:
            raise CheckpointError(f"{self.label}: has no tensor {name!r}")
        file, begin, end = self.byte_range(name, rows)
        if info.dtype != torch.float32 or begin % 4 or end <= begin:
            return None
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(self._fd(file), end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):  # e.g. a file system without mmap: reading still works
            return None
        return torch.frombuffer(mapping, dtype=torch.float32, count=(end - begin) // 4, offset=begin - start)

    def read_f32_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Fills a flat float32 buffer with the piece, converting when stored otherwise; returns it."""
        if self.info(name).dtype == torch.float32:
            self.read_into(name, out, rows)
        else:
            out.copy_(self.read(name, rows=rows).reshape(-1))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:  # noqa: SIM105 - at interpreter shutdown even contextlib may be gone
            self.close()
        except Exception:  # noqa: BLE001
            pass


def row_chunks(info: TensorInfo, max_elements: int) -> list[tuple[int, int] | None]:
    """Splits a tensor along dim 0 into pieces of at most ~max_elements (None = whole tensor).

    Chunking bounds memory by the chunk size instead of the largest tensor (a 128k-vocab
    embedding is 2 GB in float32); methods whose math is element-wise use it.
    """
    if not info.shape or len(info.shape) == 0:
        return [None]
    rows = info.shape[0]
    per_row = max(1, info.nbytes // max(info.dtype.itemsize, 1) // max(rows, 1))
    step = max(1, max_elements // per_row)
    if step >= rows:
        return [None]
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]
