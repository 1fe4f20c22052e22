"""A checkpoint in S3 read in place: headers by one ranged GET per file, tensors by byte range.

It is a CheckpointReader whose three file hooks (which files, their headers, a byte range)
go to S3 instead of the local disk, so every engine path (extraction, the streaming merge, a
shard task) reads remote inputs without knowing it. `expect` hands it the reads to come; they
are coalesced and fetched ahead (metamerge/io/ranged.py), so a shard task costs about its
tensors' bytes from each input, not each input whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from metamerge.engine.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    TensorInfo,
    header_length,
    parse_header,
)
from metamerge.errors import CheckpointError
from metamerge.io.remote_model import RemoteModel

if TYPE_CHECKING:
    from types import ModuleType

    from metamerge.io.ranged import Prefetcher

ModelSource = Path | RemoteModel  # where an engine function reads a model from


def _ranged() -> ModuleType:
    """`io/ranged.py`, imported on the first remote read: it brings boto3, which a merge of local
    folders never uses (and a GPU host need not have)."""
    from metamerge.io import ranged

    return ranged


class RemoteCheckpointReader(CheckpointReader):
    """Name-addressed view of a remote model's safetensors files (see the module docstring)."""

    def __init__(self, model: RemoteModel, label: str | None = None):
        self.model = model
        self.prefetcher: Prefetcher | None = None
        super().__init__(Path(model.ref.removeprefix("s3://")), label or model.label)

    def _shard_files(self) -> list[str]:
        files = self.model.files
        if INDEX_NAME in files:
            raw = _ranged().get_range(self.model, INDEX_NAME, 0, files[INDEX_NAME].size)
            try:
                shards = sorted(set(json.loads(raw)["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.label}: {INDEX_NAME} is not a valid index ({exc})") from None
            missing = [f for f in shards if f not in files]
            if missing:
                raise CheckpointError(f"{self.label}: shard(s) named in {INDEX_NAME} are missing: {', '.join(missing)}")
            return shards
        shards = sorted(name for name in files if name.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{self.label}: no .safetensors objects under {self.model.ref}")
        return shards

    def _header(self, file: str) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]]]:
        size = self.model.files[file].size
        ranged = _ranged()
        first = ranged.get_range(self.model, file, 0, min(ranged.HEADER_GUESS, size)) if size else b""
        length = header_length(first, size, self.label, file)
        raw = first[8 : 8 + length]
        if len(raw) < length:  # a header larger than the guess: one more GET for the rest
            raw += ranged.get_range(self.model, file, len(first), 8 + length)
        return parse_header(raw, size, self.label, file)

    def expect(self, reads: list[tuple[str, tuple[int, int] | None]]) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        ranges = [self.byte_range(name, rows) for name, rows in reads if name in self]
        ranged = _ranged()
        self.prefetcher = ranged.Prefetcher(self.model, ranged.coalesce(ranges))

    def _read_range(self, name: str, file: str, begin: int, view: memoryview) -> None:
        if self.prefetcher is not None and self.prefetcher.take(file, begin, view):
            return
        view[:] = _ranged().get_range(self.model, file, begin, begin + len(view))

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None


def open_checkpoint(source: ModelSource, label: str | None = None) -> CheckpointReader:
    """A reader for a local folder or a model in S3 read in place."""
    if isinstance(source, RemoteModel):
        return RemoteCheckpointReader(source, label)
    return CheckpointReader(Path(source), label=label)
