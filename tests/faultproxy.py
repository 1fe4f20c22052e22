"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the real S3 server (tests only).

Clients point `endpoint_url` at the proxy; it forwards requests verbatim to the upstream
server, except that the first `fail_first` requests (or all, when `always`) are answered
with an HTTP error or a dropped connection (`match` limits the faults to some requests, e.g.
one S3 operation). Every request is counted and logged (method, path),
so tests can check how often and in which order a client called. This is the one place tests fake anything, and
it fakes only the network, not S3.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultProxy:
    def __init__(self, upstream: str, fail_first: int = 0, mode: str = "500", always: bool = False,
                 match: Callable[[str, str], bool] | None = None):
        self.upstream = urlsplit(upstream)
        self.fail_first, self.mode, self.always = fail_first, mode, always
        self.match = match  # which requests (method, path) the faults apply to; None: every request
        self.requests = 0
        self.matched = 0
        self.faults = 0
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, in arrival order
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    proxy.log.append((self.command, self.path))
                    eligible = proxy.match is None or proxy.match(self.command, self.path)
                    proxy.matched += eligible
                    fail = eligible and (proxy.always or proxy.matched <= proxy.fail_first)
                    if fail:
                        proxy.faults += 1
                if fail:
                    if proxy.mode == "drop":
                        self.close_connection = True
                        self.connection.close()
                        return
                    message = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(int(proxy.mode))
                    self.send_header("Content-Length", str(len(message)))
                    # a fresh connection for the client's retry: a kept-alive socket that the client
                    # reuses while this thread winds down reads as ConnectionClosed under load, not 500
                    self.send_header("Connection", "close")
                    self.close_connection = True
                    self.end_headers()
                    self.wfile.write(message)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream.hostname}:{proxy.upstream.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # HEAD answers carry the object's length with no body
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # dropped connections are the point
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
