"""Byte ranges of S3 objects: how a worker reads only the tensors its task needs.

A shard task of a 70B merge needs about 1/70 of each input. Downloading every input whole to
each worker costs (T+1) × model bytes per worker whatever the number of workers; fetching the
byte ranges of the task's tensors costs (T+1) × model / workers. Ranges that touch are
coalesced into requests of at most MAX_REQUEST_BYTES, and the planned requests are fetched
ahead, IN_FLIGHT at a time per object set, so memory stays bounded and the network stays busy.

Every GET carries `If-Match` with the ETag the run listed, so an object replaced during a run
is one clear error, never a merge of two versions' bytes.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from metamerge.errors import InputError, TransientError
from metamerge.io.remote_model import FETCHED, RemoteModel
from metamerge.io.s3 import S3_FAILURES, ClientError, error_code, s3_client, s3_error

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # one GET: large enough to stream at full speed, small enough to hold a few
IN_FLIGHT = 2  # requests fetched ahead per model: memory ≤ IN_FLIGHT × MAX_REQUEST_BYTES per input
HEADER_GUESS = 64 * 1024  # first GET of a file: the 8-byte length plus, nearly always, the whole header




_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def ranged_client(endpoint_url: str | None):
    """One client per endpoint, credentials and process, with a pool for the fetch-ahead threads."""
    key = (endpoint_url, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_PROFILE"), os.getpid())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = s3_client(endpoint_url, connections=64)
        return client


def get_range(model: RemoteModel, name: str, begin: int, end: int) -> bytes:
    """Bytes [begin, end) of one file, only if it is still the object this run listed."""
    file = model.files[name]
    client = ranged_client(model.endpoint_url)
    uri = f"s3://{model.bucket}/{file.key}"
    try:
        answer = client.get_object(Bucket=model.bucket, Key=file.key, Range=f"bytes={begin}-{end - 1}",
                                   IfMatch=f'"{file.etag}"')
        data = answer["Body"].read()
    except ClientError as exc:
        if error_code(exc) in ("PreconditionFailed", "412"):
            raise InputError(f"{model.ref}: {uri} changed during this run (its ETag is no longer {file.etag}); "
                             "re-run to merge the new version") from None
        if error_code(exc) in ("NoSuchKey", "404"):
            raise InputError(f"{model.ref}: {uri} was deleted during this run") from None
        raise s3_error(client, f"ranged read of {uri}", exc, model.bucket) from exc
    except S3_FAILURES as exc:
        raise s3_error(client, f"ranged read of {uri}", exc, model.bucket) from exc
    if len(data) != end - begin:
        raise TransientError(f"{model.ref}: short ranged read of {uri} ({len(data)} of {end - begin} bytes)")
    FETCHED.add(len(data))
    return data


def coalesce(reads: list[tuple[str, int, int]], max_request: int = MAX_REQUEST_BYTES) -> list[tuple[str, int, int]]:
    """Reads in order → requests: consecutive reads that touch in one file merge, up to `max_request`.

    A read longer than `max_request` is split, so no request (and no buffer) exceeds it.
    """
    requests: list[tuple[str, int, int]] = []
    for file, begin, end in reads:
        if end <= begin:
            continue
        if requests and requests[-1][0] == file and requests[-1][2] == begin and requests[-1][2] - requests[-1][1] < max_request:
            last_file, last_begin, _ = requests.pop()
            begin = last_begin
        while end - begin > max_request:
            requests.append((file, begin, begin + max_request))
            begin += max_request
        requests.append((file, begin, end))
    return requests


class Prefetcher:
    """Hands out planned bytes in plan order, fetching up to `in_flight` requests ahead.

    A read that is not the next planned one (or lies outside the plan) returns False: the caller
    fetches it directly. Skipped requests are dropped, so a reader never holds more than the window.
    """

    def __init__(self, model: RemoteModel, requests: list[tuple[str, int, int]], in_flight: int = IN_FLIGHT):
        self.model = model
        self.requests = requests
        self.in_flight = in_flight
        self.pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="ranged-read")
        self.window: deque[tuple[tuple[str, int, int], Future]] = deque()
        self.next = 0

    def _fill(self) -> None:
        while len(self.window) < self.in_flight and self.next < len(self.requests):
            request = self.requests[self.next]
            self.window.append((request, self.pool.submit(get_range, self.model, *request)))
            self.next += 1

    def _locate(self, file: str, position: int) -> bool:
        """Drops requests before the one holding (file, position); False when no request ahead holds it."""
        for index in range(len(self.window)):
            (f, b, e), _ = self.window[index]
            if f == file and b <= position < e:
                for _ in range(index):
                    self.window.popleft()
                return True
        for index in range(self.next, len(self.requests)):
            f, b, e = self.requests[index]
            if f == file and b <= position < e:
                self.window.clear()
                self.next = index
                self._fill()
                return True
        return False

    def take(self, file: str, begin: int, view: memoryview) -> bool:
        self._fill()
        if not self._locate(file, begin):
            return False
        done = 0
        while done < len(view):
            if not self.window or not self._locate(file, begin + done):
                raise TransientError(f"{self.model.ref}: planned ranged reads do not cover {file} at {begin + done}")
            (_, b, e), future = self.window[0]
            data = memoryview(future.result())
            start = begin + done - b
            count = min(len(view) - done, e - (begin + done))
            view[done : done + count] = data[start : start + count]
            done += count
            if begin + done >= e:
                self.window.popleft()
                self._fill()
        return True

    def close(self) -> None:
        for _, future in self.window:
            future.cancel()
        self.window.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
