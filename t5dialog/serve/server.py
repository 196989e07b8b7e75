"""`python infer.py --serve`: a chat page and a JSON API for the loaded checkpoint.

    GET  /           the chat page (serve_page.html: one file, no external assets, works offline)
    POST /api/reply  {"message": "...", "history": ["...", ...], <decoding options>}  ->  {"reply": "..."}
                     with "stream": true: text/event-stream, `data: {"text": "..."}` per piece, then `data: [DONE]`

The standard library's ThreadingHTTPServer, one thread per connection. The
model answers one request at a time (a lock); up to ``--queue`` more wait,
and beyond that a request gets 503 at once rather than a long silence. A
client that goes away stops its generation at the next token. Errors are
JSON (`{"error": "..."}`), one log line per request, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import re
import select
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from t5dialog.cli import UserError
from t5dialog.files import first_line
from t5dialog.generation import generate_response, stop_when, stream_response
from t5dialog.models import autocast
from t5dialog.serve import page
from t5dialog.serve.request import BadRequest, limits, parse_body

HOST, PORT, QUEUE = "127.0.0.1", 8000, 8
MAX_BODY = 64 * 1024  # bytes; a long conversation is a few KiB, and the model reads only max_length tokens of it
DRAIN_LIMIT = 1 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413, not a reset
ROUTES = {"/": ("GET", "HEAD"), "/api/reply": ("POST",)}

# ---------------------------------------------------------------- flags and socket


def add_serve_args(parser: argparse.ArgumentParser):
    """--serve and its settings; these have no default in `args` (SUPPRESS), so that given without --serve they are caught."""
    a = parser.add_argument_group("serving").add_argument
    a("--serve", action="store_true", help="serve a chat page and a JSON API (POST /api/reply) instead of answering here")
    a("--host", default=argparse.SUPPRESS, help=f"address to listen on with --serve (default {HOST}: this machine only)")
    a("--port", type=int, default=argparse.SUPPRESS, help=f"port for --serve (default {PORT}; 0 picks a free one)")
    a("--queue", type=int, default=argparse.SUPPRESS,
      help=f"requests that may wait while one is answered (default {QUEUE}); more get 503")


def exposure_warning(host: str) -> str | None:
    """The loud line for a server that other machines may reach; None for loopback."""
    if host == "localhost" or _is_loopback(host):
        return None
    return (f"WARNING: listening on {host}: ANYONE WHO CAN REACH THIS PORT CAN USE THE MODEL (no password, no TLS); "
            f"use --host {HOST} to keep it to this machine")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for clients
    # socketserver's backlog is 5: in a burst (a page and its scripts, a load test) the kernel drops the 7th
    # connection's SYN and the client retries after 1, 3, 7... s, up to a minute, before the server even sees it.
    request_queue_size = socket.SOMAXCONN
    engine: Engine
    queue: int

    def __init__(self, address, handler):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer's own would look the host's name up in DNS (getfqdn): seconds lost offline, for a name never used.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):  # a client that left is no error of ours
            log(f"error with {client_address[0]}: {type(error).__name__}: {first_line(error)}")


def open_server(args, prompt) -> Server | None:
    """The listening socket for --serve (None without it), bound before the model loads so that a busy port fails fast."""
    given = vars(args)
    if not args.serve:
        if stray := [f"--{flag}" for flag in ("host", "port", "queue") if flag in given]:  # a mistake, not something to ignore
            raise UserError(f"{', '.join(stray)} without --serve: add --serve or drop {'it' if len(stray) == 1 else 'them'}")
        return None
    if prompt is not None:
        raise UserError("--serve answers over HTTP, not a prompt given here; drop the prompt (or --serve)")
    host, port, queue = given.get("host", HOST), given.get("port", PORT), given.get("queue", QUEUE)
    if host.startswith("[") and host.endswith("]"):  # [::1] as URLs (and our banner) write it; bind wants ::1
        host = host[1:-1]
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: not a port; use 1-65535 (0 picks a free one)")
    if queue < 0:
        raise UserError(f"--queue {queue}: cannot be negative; 0 means no waiting (503 while busy)")
    try:
        server = Server((host, port), Handler)
    except (OSError, UnicodeError) as e:  # UnicodeError: a host name that is not even a valid name
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host}; stop what uses it or pick another --port") from None
        reason = getattr(e, "strerror", None) or first_line(e)
        raise UserError(f"cannot listen on {host}:{port} ({reason}); check --host and --port") from None
    if warning := exposure_warning(host):
        print(warning, file=sys.stderr, flush=True)
    server.queue = queue  # for the Engine, once the model is loaded
    return server


def serve(server: Server, engine: Engine):
    """Answer until Ctrl-C, which run_script turns into one line and exit code 130, as in the other modes."""
    server.engine = engine
    host, port = server.server_address[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    log(f"serving {engine.checkpoint} at {url} ({engine.device}, {engine.precision}); Ctrl-C stops")
    try:
        server.serve_forever()
    finally:
        engine.closing.set()  # generations in flight stop at their next token
        server.server_close()


def log(line: str):
    print(f"serve: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the model, one request at a time


class Busy(Exception):
    """The model is answering and the waiting line is full."""


class Engine:
    """The loaded model and what guards it: one generation at a time, at most ``queue`` more waiting."""

    def __init__(self, model, tokenizer, device, precision, max_length, options, checkpoint, queue=None):
        self.model, self.tokenizer, self.device, self.precision = model, tokenizer, device, precision
        self.max_length, self.options, self.checkpoint = max_length, dict(options), Path(checkpoint)
        self.queue = QUEUE if queue is None else queue
        self.lock = threading.Lock()  # held while the model generates
        self._mutex = threading.Lock()  # guards `waiting`
        self.waiting = 0
        self.stopped_early = 0  # generations ended because their client left
        self.closing = threading.Event()

    @contextlib.contextmanager
    def turn(self):
        """The model, once it is free (raises Busy at once when the waiting line is full)."""
        with self._mutex:
            free = self.lock.acquire(blocking=False)
            if not free and self.waiting >= self.queue:
                raise Busy(f"the model is busy and {self.waiting} request(s) already wait (--queue {self.queue}); retry shortly")
            self.waiting += not free
        if not free:
            try:
                self.lock.acquire()
            finally:
                with self._mutex:
                    self.waiting -= 1
        try:
            with autocast(self.device, self.precision):  # per thread: infer.py's own autocast does not reach this one
                yield
        finally:
            self.lock.release()

    def page(self) -> bytes:
        return page.render(self.checkpoint, self.options, limits(self.options), MAX_BODY)


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 60  # seconds a client may stall mid-request or mid-stream before it counts as gone

    def version_string(self):
        return "t5-dailydialog-chat"  # not the Python version: nothing a client needs

    # ------------------------------------------------------------ routing

    def dispatch(self):
        path = urlsplit(self.path).path
        allowed = ROUTES.get(path)
        if allowed is None:
            return self.send_json(404, {"error": f"no such page: {path}; the chat is at / and the API at POST /api/reply"})
        if self.command not in allowed:
            return self.send_json(405, {"error": f"{self.command} {path}: use {' or '.join(allowed)}"}, Allow=", ".join(allowed))
        if path == "/":
            return self.send_page()
        if refusal := self.foreign():
            return self.send_json(403, {"error": refusal})
        self.answer()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def foreign(self) -> str | None:
        """Why a request that a web page elsewhere made through the user's browser is refused; None when it is fine.

        A page on another site may POST here (the browser sends its Origin),
        and one whose DNS name was pointed at 127.0.0.1 sends its own Host;
        curl and scripts send neither, and the chat page sends its own.
        """
        host = self.headers.get("Host", "")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            return f"cross-site request from {origin} refused; use the chat page this server serves"
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.split(":")[0]
        if _is_loopback(self.server.server_address[0]) and name and name != "localhost" and not _is_loopback(name):
            return f"Host {host} is not this machine; open http://127.0.0.1:{self.server.server_address[1]}/"
        return None

    # ------------------------------------------------------------ answers

    def answer(self):
        engine = self.server.engine
        try:
            message, history, stream, options, seed = parse_body(self.read_body(), engine.options)
        except BadRequest as e:
            return self.send_json(e.code, {"error": str(e)})
        try:
            with engine.turn():
                if seed is not None:
                    torch.manual_seed(seed)
                (self.stream if stream else self.reply)(message, history, options)
                if self.left:
                    engine.stopped_early += 1
                    self.note = "client left; generation stopped"
        except Busy as e:
            self.send_json(503, {"error": str(e)}, **{"Retry-After": "1"})

    def reply(self, message, history, options):
        e = self.server.engine
        try:
            text = generate_response(message, e.model, e.tokenizer, e.device, history=history, max_length=e.max_length,
                                     stopping_criteria=stop_when(self.gone), **options)
        except Exception as error:  # one line for the client and the log, the server keeps serving
            self.note = f"generation failed: {type(error).__name__}: {first_line(error)}"
            return self.send_json(500, {"error": self.note})
        if not self.cut_short():
            self.send_json(200, {"reply": text})

    def stream(self, message, history, options):
        e = self.server.engine
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        pieces = stream_response(message, e.model, e.tokenizer, e.device, history=history, max_length=e.max_length,
                                 stop=self.gone, **options)
        try:
            for piece in pieces:
                self.wfile.write(b"data: " + json.dumps({"text": piece}).encode() + b"\n\n")
            if not self.cut_short():
                self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client left: closing `pieces` stops the generation and waits for it
            self.left = True
        except Exception as error:
            self.note = f"generation failed: {type(error).__name__}: {first_line(error)}"
            with contextlib.suppress(OSError):
                self.wfile.write(b"data: " + json.dumps({"error": self.note}).encode() + b"\n\n")
        finally:
            pieces.close()

    def cut_short(self) -> bool:
        """The generation was stopped (client gone, server stopping): its text is no complete reply to send."""
        return self.left or self.server.engine.closing.is_set()

    def gone(self) -> bool:
        """Whether the client has closed its end (or the server is stopping); checked once per generated token.

        Like nginx, a client that closes its sending side counts as gone: curl,
        browsers and http.client keep it open until they have the answer.
        """
        if self.server.engine.closing.is_set():
            return True
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            self.left = bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            self.left = True
        return self.left

    # ------------------------------------------------------------ bodies and replies

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise BadRequest(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise BadRequest(411, "a Content-Length header is required")
        if len(set(lengths)) > 1 or not re.fullmatch(r"\d{1,18}", lengths[0].strip()):
            raise BadRequest(400, f"Content-Length {', '.join(lengths)}: not a byte count")
        size = int(lengths[0])
        if size > MAX_BODY:
            if size <= DRAIN_LIMIT and "100-continue" not in self.headers.get("Expect", "").lower():
                with contextlib.suppress(OSError):
                    self.rfile.read(size)
            raise BadRequest(413, f"the body is {size} bytes; the limit is {MAX_BODY}")
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            raise BadRequest(408, f"the body did not arrive within {self.timeout} s") from None
        if len(body) < size:
            raise BadRequest(400, f"the body ended after {len(body)} of its {size} bytes")
        return body

    def send_page(self):
        self.send_bytes(200, self.server.engine.page(), "text/html; charset=utf-8",
                        **{"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                           "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    def send_json(self, code: int, value: dict, **headers):
        self.send_bytes(code, json.dumps(value).encode() + b"\n", "application/json", **headers)

    def send_bytes(self, code: int, body: bytes, content_type: str, **headers):
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.note = "the client left before the answer was sent"

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a garbled request line, an unknown method) as JSON too."""
        self.close_connection = True
        self.send_json(code, {"error": message or HTTPStatus(code).phrase})

    # ------------------------------------------------------------ the log: one line per request

    def setup(self):
        super().setup()
        self.started, self.status, self.note, self.left = time.monotonic(), None, None, False

    def log_request(self, code="-", size="-"):
        self.status = int(code) if str(code).isdigit() else code

    def log_message(self, format, *args):
        self.note = format % args  # http.server's own complaints (a timeout, a bad request line) join the request's line

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()
        if self.status is None and self.note is None:
            return  # a connection that never sent a request
        request = "".join(c if c.isprintable() else "?" for c in getattr(self, "requestline", "-"))[:200]
        note = f" ({self.note})" if self.note else ""
        log(f'{self.client_address[0]} "{request}" {self.status or "-"} {time.monotonic() - self.started:.2f}s{note}')
