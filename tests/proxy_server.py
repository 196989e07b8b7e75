"""An HTTP forward proxy on 127.0.0.1, for tests, in front of the stand-in hub (hub_server.py).

`FakeProxy` relays absolute-URI ``GET``/``HEAD`` requests and ``CONNECT``
tunnels. ``hosts`` maps names only it can resolve (e.g. ``hub.invalid``) to
real addresses, so a client that reaches such a name went through it; it
records what passed in ``requests`` as ``(method, target)`` and counts
connections.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from hub_server import _Stopping


class FakeProxy(_Stopping):
    """A forward HTTP proxy. ``hosts`` maps a host name to the (host, port) it really is."""

    def __init__(self, hosts: dict[str, tuple[str, int]] | None = None):
        self.hosts = dict(hosts or {})
        self.requests: list[tuple[str, str]] = []
        self.connections = 0
        self._lock = threading.Condition()
        self._serve(_ProxyHandler)

    def env(self) -> dict[str, str]:
        """Variables that send a subprocess's HTTP and HTTPS traffic through this proxy."""
        names = {"HTTP_PROXY": self.url, "HTTPS_PROXY": self.url, "ALL_PROXY": "", "NO_PROXY": ""}
        return {n: v for name, v in names.items() for n in (name, name.lower())}

    def record(self, method, target):
        with self._lock:
            self.requests.append((method, target))

    def count_connection(self):
        with self._lock:
            self.connections += 1
            self._lock.notify_all()

    def wait_for_connections(self, n: int, timeout: float = 30) -> bool:
        """True once n connections have come in (they are counted on the server's own thread)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.connections >= n, timeout)

    def address(self, host: str, port: int) -> tuple[str, int]:
        return self.hosts.get(host, (host, port))


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    @property
    def proxy(self) -> FakeProxy:
        return self.server.owner

    def setup(self):
        super().setup()
        self.proxy.count_connection()

    def do_GET(self):
        self._forward()

    def do_HEAD(self):
        self._forward()

    def _forward(self):
        self.proxy.record(self.command, self.path)
        url = urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            return self._answer(400, b"absolute http:// URI expected")
        host, port = self.proxy.address(url.hostname, url.port or 80)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("proxy-connection", "proxy-authorization", "connection", "keep-alive")}
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request(self.command, url.path + (f"?{url.query}" if url.query else ""), headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            return self._answer(502, f"proxy: {e}".encode())
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_CONNECT(self):
        self.proxy.record("CONNECT", self.path)
        name, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection(self.proxy.address(name, int(port)), timeout=30)
        except (OSError, ValueError) as e:
            return self._answer(502, f"proxy: {e}".encode())
        self.send_response(200, "Connection established")
        self.end_headers()
        self._pipe(self.connection, upstream)
        self.close_connection = True

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket):
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 30)
                if not ready:
                    return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            b.close()

    def _answer(self, status, data: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
