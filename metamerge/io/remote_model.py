"""A model in S3 as a run listed it, and the process's count of bytes fetched by range: plain
data, so that code which only names remote models (type hints, `isinstance`) or reports the
count imports no S3 client. A local merge then needs neither boto3 nor its start-up;
`io/ranged.py` reads the bytes and adds to the count."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class S3File:
    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class RemoteModel:
    """A model in S3 read in place: its files as listed once by this run (key, ETag, size)."""

    ref: str
    bucket: str
    files: dict[str, S3File]
    fingerprint: str
    endpoint_url: str | None = None

    @property
    def label(self) -> str:
        return self.ref


@dataclass
class FetchCounter:
    """Bytes and requests a process fetched by range: what benchmarks and tests compare."""

    bytes: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, count: int) -> None:
        with self.lock:
            self.bytes += count
            self.requests += 1


FETCHED = FetchCounter()  # this process's total, across models
