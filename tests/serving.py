"""The real server (t5dialog.serve) run in a thread of the test process, as `python infer.py --serve --port 0` runs it."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from argparse import Namespace

import torch

from t5dialog.serve import server as serve

CPU = torch.device("cpu")


@contextlib.contextmanager
def serving(loaded, checkpoint, options, max_length=64, **flags):
    """A listening server with its own model engine: .port, .url, .engine; stopped as Ctrl-C stops it."""
    model, tokenizer = loaded
    listener = serve.open_server(Namespace(serve=True, port=0, **flags), None)
    thread = threading.Thread(target=serve.serve, args=(listener, model, tokenizer, CPU, "fp32", max_length, options,
                                                        checkpoint), daemon=True)
    thread.start()
    while listener.uvicorn is None or not listener.uvicorn.started:  # uvicorn has its app up and the socket open
        assert thread.is_alive(), "the server stopped while starting"
        time.sleep(0.01)
    try:
        yield listener
    finally:
        listener.shutdown()
        thread.join()


def request(server, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request; a dict body is sent as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def start_long_stream(server, path="/api/reply") -> socket.socket:
    """Ask for a streamed reply that would take 1000 tokens (the tiny model never ends one); the connection."""
    body = json.dumps({"message": "Tell me a long story .", "stream": True, "max_new_tokens": 1000}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body)
    return s


def first_piece(s: socket.socket):
    received = b""
    while b'data: {"text"' not in received:
        chunk = s.recv(4096)
        assert chunk, received
        received += chunk


@contextlib.contextmanager
def long_stream(server, path="/api/reply"):
    """A never-ending streamed reply under way (its first piece has come): the model is busy; leaving closes it."""
    with start_long_stream(server, path) as s:
        first_piece(s)
        yield s


def wait_until(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
