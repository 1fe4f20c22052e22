"""Prefect result storage on any S3-compatible endpoint, so every worker sees every cached result.

prefect-aws offers the same for AWS; this block adds nothing but boto3 and honours the
recipe's `endpoint_url`, which is what on-prem S3 (MinIO, Ceph) and the tests need.
"""

from __future__ import annotations

import asyncio

from prefect.filesystems import WritableFileSystem

from metamerge.io.s3 import s3_client
from metamerge.io.targets import parse_target
from metamerge.pipeline.keys import short_hash


class S3ResultStorage(WritableFileSystem):
    """Task results as objects under s3://bucket/prefix/<cache key>."""

    _block_type_name = "metamerge S3 result storage"
    _block_type_slug = "metamerge-s3-result-storage"

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None

    def _key(self, path: str) -> str:
        return "/".join(p for p in (self.prefix.strip("/"), path.lstrip("/")) if p)

    # Prefect calls the sync methods with `_sync=True` and awaits the `a`-prefixed ones.
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        """A missing key raises, which Prefect reads as "not cached"."""
        return s3_client(self.endpoint_url).get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        s3_client(self.endpoint_url).put_object(Bucket=self.bucket, Key=self._key(path), Body=content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)


def result_storage_for(uri: str | None, endpoint_url: str | None) -> S3ResultStorage | None:
    """A saved block for `results: s3://…` in the recipe (None: Prefect's local default)."""
    if not uri:
        return None
    target = parse_target(uri)
    if not target.is_s3:
        return None
    block = S3ResultStorage(bucket=target.bucket, prefix=target.prefix, endpoint_url=endpoint_url)
    block.save(f"metamerge-results-{short_hash(uri, endpoint_url)}", overwrite=True)
    return block
