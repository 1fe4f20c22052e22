"""One piece (a tensor or a row chunk) of an input as flat float32: mapped, or read into a buffer.

A local float32 piece is mapped straight from the page cache (`CheckpointReader.mapped_f32`):
no copy, and no reader thread busy copying it, which on a 2-core worker is a core. Anything
else (S3, a LoRA fine-tune, bf16 or f16 stored, an unaligned offset) is read into a reused
buffer and converted, as before. Mapped pieces are read-only to the merge's kernels: nothing
may write into them (the mapping is copy-on-write, so a stray write would cost memory, not data).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from collections.abc import Callable

import torch

from metamerge.engine.checkpoint import CHUNK_ELEMENTS, CheckpointReader
from metamerge.engine.compat import Alignment, aligned_rows
from metamerge.engine.lora import LoraReader
from metamerge.engine.remote import RemoteCheckpointReader

MADV_POPULATE_READ = 22  # Linux ≥ 5.14; older kernels answer EINVAL and the pages fault in as used


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _libc_madvise()


def populate(piece: torch.Tensor) -> None:
    """Maps a mapped piece's pages now, on the calling thread, instead of one fault at a time
    where the merge first touches them. Through ctypes, which lets go of the GIL (mmap.madvise
    holds it)."""
    if _MADVISE is not None:
        address = piece.data_ptr()
        lead = address % mmap.PAGESIZE
        _MADVISE(address - lead, piece.numel() * piece.element_size() + lead, MADV_POPULATE_READ)


def can_map(reader: CheckpointReader | LoraReader, names: list[str]) -> bool:
    """Whether every one of `names` comes from `reader` as a mapping (local file, float32)."""
    if isinstance(reader, (LoraReader, RemoteCheckpointReader)):
        return False
    return all(reader.info(name).dtype == torch.float32 for name in names if name in reader)


def read_f32(reader: CheckpointReader | LoraReader, name: str, rows: tuple[int, int] | None, buffer: torch.Tensor,
             mapped: bool = False) -> torch.Tensor:
    """A flat float32 view of the piece: mapped when `mapped` and the reader can, else in `buffer`
    when it fits (no allocation), else a fresh tensor."""
    if mapped:  # the caller checked `can_map` for this reader
        piece = reader.mapped_f32(name, rows)
        if piece is not None:
            return piece
    n = math.prod(reader.piece_shape(name, rows))
    if n > buffer.numel():
        return reader.read(name, rows=rows).reshape(-1).to(torch.float32)
    return reader.read_f32_into(name, buffer[:n], rows)


def packed_rows(buffer: torch.Tensor, count: int, n: int) -> torch.Tensor:
    """A contiguous [count, n] view at the start of `buffer` (count × n ≤ its size). `buffer[:, :n]`
    is strided: copying it to a GPU makes a contiguous (pageable) copy on the host first."""
    return buffer.view(-1)[: count * n].view(count, n)


def stage_to_device(rows: list[torch.Tensor], staging: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[len(rows), n] on `device`, copied from host rows (mapped files) through `staging`, the
    pinned [rows, capacity] workspace (n ≤ capacity).

    The GPU path used to `read` every input into the strided workspace view, one kernel copy per
    row on the loading thread, and `.to(cuda)` of a strided view copies it once more into pageable
    memory first. torch's copy from a mapping is spread over the intra-op threads, and packed
    pinned rows go to the GPU at the copy engine's speed. H100 host, 16 cores, one run
    (`benchmarks/results/gpu_merge.json` against `gpu_merge_before_staging.json`): task
    arithmetic 0.94 → 0.35 s on 2.1 GB of inputs and 2.45 → 0.89 s on 6.0 GB; TIES 1.48 → 1.16 s
    and 4.16 → 3.29 s. Whole tensors above the workspace (TIES) are read into a pinned tensor of
    their own: the only copy they get.
    """
    packed = packed_rows(staging, len(rows), rows[0].numel())
    for target, row in zip(packed, rows, strict=True):
        target.copy_(row)
    return packed.to(device)


class Workspace:
    """Reusable float32 buffers of one in-flight piece: inputs [T+1, capacity] and its result.

    Two of them alternate (read piece i+1 while computing piece i, write piece i while
    computing i+1); reusing buffers avoids a page fault per fresh megabyte, which otherwise
    costs as much as the arithmetic. Pages of `inputs` that mapped pieces never need are never
    touched, so they cost no memory.
    """

    def __init__(self, inputs: int, capacity: int, pin: bool):
        self.capacity = capacity
        self.inputs = torch.empty((inputs, capacity), dtype=torch.float32, pin_memory=pin)
        self.result = torch.empty(capacity, dtype=torch.float32)


class WholeResult:
    """One reusable result buffer for pieces bigger than a workspace: whole tensors (TIES & co.).

    A fresh result faults in a page per 4 KB as the merge first writes it, on the merging thread:
    24 K faults for each 24.6 M-entry embedding or LM head of the benchmark family. Reused, the
    pages fault once per merge, and the peak RSS of a TIES merge fell from 962 to 898 MB (a
    freed result was not returned before the next one faulted in). One buffer, not one per slot,
    so a merge never holds two whole results: the caller waits for the previous write before
    taking it again.
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.float32)

    def take(self, n: int) -> torch.Tensor:
        if self._buffer.numel() < n:
            self._buffer = torch.empty(0, dtype=torch.float32)  # let the smaller one go before the bigger one
            self._buffer = torch.empty(n, dtype=torch.float32)
        return self._buffer[:n]


class PieceReader:
    """Reads one piece (a tensor or its row chunk) of every checkpoint as float32 rows.

    `reads_only(n)` says whether the merge of an n-entry piece only reads its inputs: then, on
    the CPU and when every input maps, the piece is a list of mapped rows; otherwise a [T+1, n]
    tensor in the workspace. For CUDA it is a [T+1, n] tensor on the GPU: from the mappings
    through the pinned workspace where every input maps and the piece fits (`stage_to_device`),
    else read into it. Mapped rows of a piece up to a chunk have their pages mapped on the
    loading thread (`populate`), while the merge computes the piece before; a bigger piece (a
    whole tensor, for TIES) faults in as it is used, so that two of them are never resident at
    once.
    """

    def __init__(self, base: CheckpointReader, finetunes: list[tuple[CheckpointReader | LoraReader, Alignment]],
                 device: torch.device, reads_only: Callable[[int], bool]):
        self.base, self.finetunes, self.device = base, finetunes, device
        floats = [name for name in base.names if base.info(name).is_float]
        self.maps = all(can_map(r, floats) for r in [base, *(r for r, _ in finetunes)])
        self.reads_only = reads_only

    def load(self, name: str, rows: tuple[int, int] | None, workspace: Workspace) -> torch.Tensor | list[torch.Tensor]:
        """[T+1, n] float32 on the compute device, or its rows (mapped); row 0 is the base.
        Non-float: the raw tensor."""
        if not self.base.info(name).is_float:
            return self.base.read(name, rows=rows)
        n = math.prod(self.base.piece_shape(name, rows))
        sources = [(self.base, rows)] + [(r, aligned_rows(a, name, rows)) for r, a in self.finetunes]
        on_host = self.device.type == "cpu"
        if self.maps and (self.reads_only(n) if on_host else n <= workspace.capacity):
            mapped = [reader.mapped_f32(name, piece_rows) for reader, piece_rows in sources]
            if all(row is not None for row in mapped):
                if n <= CHUNK_ELEMENTS:
                    for row in mapped:
                        populate(row)
                return mapped if on_host else stage_to_device(mapped, workspace.inputs, self.device)
        pin = not on_host
        if n <= workspace.capacity:
            stacked = packed_rows(workspace.inputs, len(sources), n) if pin else workspace.inputs[:, :n]
        else:
            stacked = torch.empty((len(self.finetunes) + 1, n), dtype=torch.float32, pin_memory=pin)
        for row, (reader, piece_rows) in zip(stacked, sources, strict=True):
            if isinstance(reader, LoraReader):  # base + s·B·A from the base row already read
                reader.read_f32_onto(name, row, piece_rows, stacked[0])
            else:
                reader.read_f32_into(name, row, piece_rows)
        return stacked.to(self.device) if pin else stacked
