"""Where a publish goes (or a small document is read from): an s3:// prefix or a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import (
    InputError,
)


@dataclass(frozen=True)
class Target:
    uri: str
    bucket: str | None = None
    prefix: str = ""
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def join(self, *parts: str) -> str:
        clean = [p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/")]
        return "/".join(clean)


def parse_target(uri: str) -> Target:
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if len(bucket) < 3:
            raise InputError(f"publish target {uri!r}: bucket name must have at least 3 characters")
        return Target(uri=uri, bucket=bucket, prefix=prefix.strip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"publish target {uri!r}: only s3:// and local folders are supported")
    return Target(uri=uri, path=Path(uri.removeprefix("file://")))
