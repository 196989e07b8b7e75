"""`python infer.py --serve`: the flags, the listening socket, and uvicorn running the app (app.py).

The socket is bound before the model loads, so that a busy port fails in a
second, not after the load. `HostGuard` is the rule that refuses requests a
web page elsewhere makes through the user's browser (DNS rebinding,
cross-site posts), and `RequestLog`, an ASGI layer around the app, writes
one whole line per request. uvicorn's own messages come out as one line each, never a
traceback. Ctrl-C (SIGINT) stops the server: open streams end at their next
token with an error event, and `run_script` prints one line and exits 130.
SIGTERM stops it the same way, then ends the process as SIGTERM does (143).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import resource
import socket
import sys
import time

from t5dialog.cli import UserError
from t5dialog.files import first_line

HOST, PORT, QUEUE, MAX_BATCH = "127.0.0.1", 8000, 8, 16
MAX_CONNECTIONS = 4096  # open connections (idle ones too) before uvicorn answers new requests with 503
FD_MARGIN = 128  # descriptors kept for the model's files, logs and the like


def add_serve_args(parser: argparse.ArgumentParser):
    """--serve and its settings; these have no default in `args` (SUPPRESS), so that given without --serve they are caught."""
    a = parser.add_argument_group("serving").add_argument
    a("--serve", action="store_true",
      help="serve a chat page, a JSON API (POST /api/reply) and an OpenAI-style API (/v1/chat/completions)")
    a("--host", default=argparse.SUPPRESS, help=f"address to listen on with --serve (default {HOST}: this machine only)")
    a("--port", type=int, default=argparse.SUPPRESS, help=f"port for --serve (default {PORT}; 0 picks a free one)")
    a("--max-batch", type=int, default=argparse.SUPPRESS,
      help=f"requests generated together (default {MAX_BATCH}; 1 answers one at a time)")
    a("--queue", type=int, default=argparse.SUPPRESS,
      help=f"requests that may wait beyond what the next batch takes (default {QUEUE}); more get 503")
    a("--allow-host", action="append", default=argparse.SUPPRESS, metavar="NAME",
      help="a host name clients may use to reach a server listening beyond this machine (repeatable; "
           "IP addresses and localhost always work)")


SERVE_FLAGS = ("host", "port", "max_batch", "queue", "allow_host")


def exposure_warning(host: str) -> str | None:
    """The loud line for a server that other machines may reach; None for loopback."""
    if host == "localhost" or is_loopback(host):
        return None
    return (f"WARNING: listening on {host}: ANYONE WHO CAN REACH THIS PORT CAN USE THE MODEL (no password, no TLS); "
            f"use --host {HOST} to keep it to this machine")


def address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``host`` writes ([::1] as URLs write it too); None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    return (ip := address(host)) is not None and ip.is_loopback


class Listener:
    """The bound socket and the server's settings, until `serve` runs uvicorn on it."""

    def __init__(self, sock: socket.socket, queue: int, max_batch: int, allowed: set[str]):
        self.socket, self.queue, self.max_batch, self.allowed = sock, queue, max_batch, allowed
        self.host, self.port = sock.getsockname()[:2]
        self.uvicorn = None  # the running uvicorn.Server
        self.engine = None  # the model's batcher.Engine, once serving

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}/"

    def shutdown(self):
        """Stop serving, as Ctrl-C does (for a server run in a thread)."""
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def close(self):
        self.socket.close()


def open_server(args, prompt) -> Listener | None:
    """The listening socket for --serve (None without it), bound before the model loads so that a busy port fails fast."""
    given = vars(args)
    if not args.serve:
        if stray := [f"--{flag.replace('_', '-')}" for flag in SERVE_FLAGS if flag in given]:
            raise UserError(f"{', '.join(stray)} without --serve: add --serve or drop {'it' if len(stray) == 1 else 'them'}")
        return None
    if prompt is not None:
        raise UserError("--serve answers over HTTP, not a prompt given here; drop the prompt (or --serve)")
    host, port = given.get("host", HOST), given.get("port", PORT)
    queue, max_batch = given.get("queue", QUEUE), given.get("max_batch", MAX_BATCH)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1] as URLs write it; bind wants ::1
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: not a port; use 1-65535 (0 picks a free one)")
    if queue < 0:
        raise UserError(f"--queue {queue}: cannot be negative; 0 means no waiting beyond the next batch")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be at least 1 (1 answers one request at a time)")
    sock = bind(host, port)
    if warning := exposure_warning(host):
        print(warning, file=sys.stderr, flush=True)
    allowed = {"localhost", host.lower(), *(name.lower() for name in given.get("allow_host", []))}
    return Listener(sock, queue, max_batch, allowed)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart binds at once, as uvicorn's own bind does
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits in the backlog instead of retrying SYNs for seconds
    except (OSError, UnicodeError) as e:  # UnicodeError: a host name that is not even a valid name
        sock.close()
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host}; stop what uses it or pick another --port") from None
        reason = getattr(e, "strerror", None) or first_line(e)
        raise UserError(f"cannot listen on {host}:{port} ({reason}); check --host and --port") from None
    return sock


def serve(listener: Listener, model, tokenizer, device, precision, max_length, options, checkpoint):
    """Answer until Ctrl-C or SIGTERM; uvicorn raises the signal again once it has stopped, and run_script says one line.

    Imported here, the server's libraries cost nothing to the other modes.
    """
    import uvicorn

    from t5dialog.serve.app import build_app
    from t5dialog.serve.batcher import Engine

    engine = listener.engine = Engine(model, tokenizer, device, precision, max_length, options, checkpoint,
                                      listener.queue, listener.max_batch)
    config = uvicorn.Config(
        RequestLog(build_app(engine, lambda: server.should_exit, HostGuard(listener).refusal)),
        log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
        limit_concurrency=connection_limit(), server_header=False, date_header=False)
    server = listener.uvicorn = uvicorn.Server(config)
    quiet_uvicorn()
    engine.start()
    log(f"serving {engine.checkpoint} at {listener.url} ({engine.device}, {engine.precision}, "
        f"batches of up to {engine.max_batch}); Ctrl-C stops")
    try:
        server.run(sockets=[listener.socket])
    finally:
        engine.close()
        listener.close()


def connection_limit() -> int:
    """Concurrent connections to accept: MAX_CONNECTIONS, or fewer when the descriptor limit allows fewer.

    The soft limit is raised to the hard one first: 1024, a common default,
    would otherwise leave the server unable to accept past ~1,000 idle
    connections, while others wait.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = MAX_CONNECTIONS + FD_MARGIN if hard == resource.RLIM_INFINITY else min(hard, MAX_CONNECTIONS + FD_MARGIN)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(1, min(MAX_CONNECTIONS, soft - FD_MARGIN))


# ---------------------------------------------------------------- the two layers around the app


class HostGuard:
    """What a web page on another site makes the user's browser send here, refused (403 through `app.RefuseForeign`).

    A page elsewhere may POST here (its Origin then names that site), and one
    whose DNS name was pointed at this machine (DNS rebinding) sends its own
    name as Host. A Host that is an IP address cannot be rebound, so
    addresses pass; a name must be localhost, the --host name, or an
    --allow-host. curl and scripts send their own Host and no Origin.
    """

    def __init__(self, listener: Listener):
        self.listener = listener

    def refusal(self, raw_headers) -> str | None:
        """Why a request with these headers is refused; None when it is fine."""
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw_headers]
        host = next((value for name, value in headers if name == "host"), "")
        for origin in (value for name, value in headers if name == "origin"):  # every one, should there be two
            if origin != f"http://{host}":
                return f"cross-site request from {origin} refused; use the chat page this server serves"
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        if name and address(name) is None and name.lower() not in self.listener.allowed:
            return (f"Host {host} is not a name this server answers to; open {self.listener.url}"
                    f"{'' if is_loopback(self.listener.host) else ' or start it with --allow-host ' + name}")
        return None


class RequestLog:
    """One line per request, written whole: client, request line, status, seconds, and the handler's note."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, logged = time.monotonic(), [], []

        def write_line():
            if logged:
                return
            logged.append(True)
            client = (scope.get("client") or ("-",))[0]
            path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            line = "".join(c if c.isprintable() else "?" for c in f'{scope["method"]} {path} HTTP/{scope["http_version"]}')
            note = scope.get("state", {}).get("note")
            log(f'{client} "{line[:200]}" {status[0] if status else "-"} {time.monotonic() - started:.2f}s'
                + (f" ({note})" if note else ""))

        async def send_and_see(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                write_line()  # before the last byte goes out: a client that has its answer finds the line written
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            write_line()


def log(line: str):
    """One write per line: lines of concurrent requests never interleave."""
    sys.stderr.write(f"serve: {line}\n")
    sys.stderr.flush()


class OneLine(logging.Handler):
    """uvicorn's own messages (a garbled request, an error in a connection) as one `serve:` line, without traceback."""

    def emit(self, record):
        log(f"uvicorn: {first_line(record.getMessage())}")


def quiet_uvicorn():
    logger = logging.getLogger("uvicorn.error")
    logger.handlers[:] = [OneLine()]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
