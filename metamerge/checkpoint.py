"""Streaming access to (sharded) safetensors checkpoints.

Reading goes through safetensors' mmap, one tensor at a time. Writing streams too: the
output's shapes and dtypes are known before the first tensor is computed, so each shard's
header is written first and every tensor's bytes are appended as soon as they exist. Peak
memory is therefore one tensor, not one shard, whatever the shard size.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class CheckpointReader:
    """Name-addressed, lazily opened view of every safetensors shard in a folder."""

    def __init__(self, model_dir: Path, label: str | None = None):
        self.dir = Path(model_dir)
        self.label = label or self.dir.name
        self._handles: dict[str, object] = {}
        self._file_of: dict[str, str] = {}
        self._info: dict[str, TensorInfo] = {}
        for file in self._shard_files():
            handle = self._open(file)
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                if name in self._file_of:
                    raise CheckpointError(f"{self.label}: tensor {name!r} appears in two shards")
                sl = handle.get_slice(name)
                code = sl.get_dtype()
                if code not in CODE_DTYPES:
                    raise CheckpointError(f"{self.label}: tensor {name!r} has unsupported dtype {code}")
                self._file_of[name] = file
                self._info[name] = TensorInfo(name, CODE_DTYPES[code], tuple(sl.get_shape()))

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

    def _open(self, file: str):
        path = self.dir / file
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorsError, OSError: the user needs the file name
            raise CheckpointError(f"{self.label}: {file} is not a readable safetensors file ({exc})") from None
        self._handles[file] = handle
        return handle

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except KeyError:
            raise CheckpointError(f"{self.label}: has no tensor {name!r}") from None
        except Exception as exc:
            raise CheckpointError(f"{self.label}: cannot read tensor {name!r} ({exc})") from None


def plan_shards(tensors: Iterable[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
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
    """Writes planned tensors in order, straight to disk, into shards plus an index."""

    def __init__(self, out_dir: Path, tensors: list[TensorInfo], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.filenames = shard_filenames(len(self.shards))
        self._order = [(i, info) for i, shard in enumerate(self.shards) for info in shard]
        self._next = 0
        self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise CheckpointError(f"writer: unexpected extra tensor {name!r}")
        shard_index, info = self._order[self._next]
        if name != info.name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise CheckpointError(
                f"writer: expected {info.name} {info.dtype} {list(info.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        if self._fh is None:
            self._fh = open(self.out_dir / self.filenames[shard_index], "wb")  # noqa: SIM115
            self._fh.write(_header(self.shards[shard_index]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
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
        weight_map = {
            info.name: fname for fname, shard in zip(self.filenames, self.shards, strict=True) for info in shard
        }
        total = sum(info.nbytes for shard in self.shards for info in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return self.filenames

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def verify_checkpoint(model_dir: Path, expected: list[TensorInfo]) -> None:
    """Re-opens every shard from disk and checks it holds exactly the planned tensors."""
    reader = CheckpointReader(model_dir, label=f"written checkpoint {model_dir.name}")
    want = {info.name: info for info in expected}
    got = set(reader.names)
    if got != set(want):
        extra, missing = sorted(got - set(want)), sorted(set(want) - got)
        raise CheckpointError(f"written checkpoint: tensor set differs (missing {missing[:5]}, extra {extra[:5]})")
    for name, info in want.items():
        if reader.info(name) != info:
            raise CheckpointError(f"written checkpoint: {name} is {reader.info(name)}, planned {info}")


AUX_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def copy_aux_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Config, tokenizer and generation files come from the base: a merge changes only weights."""
    copied = []
    for file in sorted(Path(source_dir).iterdir()):
        if not file.is_file() or file.name.startswith(".") or file.name == INDEX_NAME:
            continue
        if file.suffix in AUX_SKIP_SUFFIXES:
            continue
        shutil.copy2(file, out_dir / file.name)
        copied.append(file.name)
    return copied
