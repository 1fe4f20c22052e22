"""A real S3-compatible HTTP server on 127.0.0.1 (moto), for the demo and the tests.

Nothing else in the code knows it is not AWS: clients reach it only through `endpoint_url`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "metamerge-local",
    "AWS_SECRET_ACCESS_KEY": "metamerge-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def local_s3_server(buckets: tuple[str, ...] = ()) -> Iterator[str]:
    """Starts moto's threaded server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key, value in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        if buckets:
            from metamerge.io.s3 import s3_client

            client = s3_client(endpoint)
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
