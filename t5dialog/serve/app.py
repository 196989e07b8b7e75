"""The server's routes, as a Starlette app: the page, our JSON API and the OpenAI-style chat API.

    GET  /                     the chat page (page.html)
    POST /api/reply            {"message": "...", "history": [...], <decoding options>} -> {"reply": "..."};
                               with "stream": true, `data: {"text": "..."}` per piece, then `data: [DONE]`
    POST /v1/chat/completions  OpenAI's chat completions, plain and streamed (openai_api.py)
    GET  /v1/models            the loaded checkpoint, as OpenAI lists models

Every error is one line of JSON: `{"error": "..."}`, or OpenAI's error
object under /v1/. A handler never waits on the model itself: it hands a
`Job` to the engine (batcher.py) and relays the job's events, and a client
that leaves is noticed (`watch`) and its row stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from t5dialog.files import first_line
from t5dialog.serve import openai_api, page
from t5dialog.serve.batcher import CLOSING, Busy, Engine, Job
from t5dialog.serve.request import BadRequest, Ask, limits, parse_body

MAX_BODY = 64 * 1024  # bytes; a long conversation is a few KiB, and the model reads only max_length tokens of it
DRAIN_LIMIT = 1 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413, not a reset
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "connect-src 'self'; img-src data:",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
EVENT_STREAM = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def build_app(engine: Engine, stopping, refusal) -> Starlette:
    """The app; ``stopping()`` says the server is shutting down (uvicorn's should_exit), so open streams end now;
    ``refusal(headers)`` says why a request from a foreign page is refused (server.HostGuard)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(close_when_stopping(engine, stopping))
        yield
        watcher.cancel()

    routes = [Route("/", partial(page_response, engine=engine), methods=["GET", "HEAD"]),
              Route("/api/reply", partial(reply, engine=engine), methods=["POST"]),
              Route("/v1/chat/completions", partial(chat_completions, engine=engine), methods=["POST"]),
              Route("/v1/models", partial(list_models, engine=engine), methods=["GET"]),
              Route("/v1/models/{name:path}", partial(show_model, engine=engine), methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(RefuseForeign, refusal=refusal)],
                     exception_handlers={HTTPException: http_error, Exception: crash})


class RefuseForeign:
    """A 403, in the answer shape of its path, for every request ``refusal`` names a reason for (the page too)."""

    def __init__(self, app, refusal):
        self.app, self.refusal = app, refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (why := self.refusal(scope["headers"])):
            return await error(Request(scope), 403, why)(scope, receive, send)
        await self.app(scope, receive, send)


async def close_when_stopping(engine: Engine, stopping):
    while not stopping():
        await asyncio.sleep(0.1)
    await asyncio.to_thread(engine.close)


# ---------------------------------------------------------------- errors


def error(request: Request, code: int, message: str, param: str | None = None, **headers) -> JSONResponse:
    note(request, message if code >= 500 else None)
    body = openai_api.error_body(code, message, param) if request.url.path.startswith("/v1/") else {"error": message}
    return JSONResponse(body, code, headers=headers or None)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404 and 405, in our words."""
    if exc.status_code == 404:
        message = f"no such page: {request.url.path}; the chat is at /, the APIs at POST /api/reply and /v1/chat/completions"
    elif exc.status_code == 405:
        message = f"{request.method} {request.url.path}: use {exc.headers['Allow'].replace(', ', ' or ')}"
    else:
        message = exc.detail
    return error(request, exc.status_code, message, **(exc.headers or {}))


async def crash(request: Request, exc: Exception) -> JSONResponse:
    return error(request, 500, f"{type(exc).__name__}: {first_line(exc)}")


def note(request: Request, words: str | None):
    """A few words for this request's log line (`server.RequestLog`)."""
    if words:
        request.scope.setdefault("state", {})["note"] = words


# ---------------------------------------------------------------- the routes


async def page_response(request: Request, engine: Engine) -> Response:
    body = page.render(engine.checkpoint, engine.options, limits(engine.options), MAX_BODY)
    return Response(body, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def list_models(request: Request, engine: Engine) -> JSONResponse:
    return JSONResponse(openai_api.model_list(model_entry(engine)))


async def show_model(request: Request, engine: Engine) -> JSONResponse:
    name = request.path_params["name"]
    if name != engine.checkpoint.name:
        return error(request, 404, f"no model {name}; this server has {engine.checkpoint.name}", "model")
    return JSONResponse(model_entry(engine))


def model_entry(engine: Engine) -> dict:
    return openai_api.model_entry(engine.checkpoint.name, int(engine.checkpoint.stat().st_mtime))


async def reply(request: Request, engine: Engine) -> Response:
    return await answer(request, engine, parse_body, lambda text, job: {"reply": text}, api_events)


async def chat_completions(request: Request, engine: Engine) -> Response:
    completion = openai_api.Completion(engine.checkpoint.name)
    return await answer(request, engine, openai_api.parse_chat,
                        lambda text, job: completion.whole(text, job.finish_reason, usage_of(job)),
                        partial(chat_events, completion=completion))


async def answer(request: Request, engine: Engine, parse, whole, events) -> Response:
    """Check the body (``parse``), queue the job, and answer: the reply as ``whole(text, job)`` makes it, or
    ``events(request, job, ask)`` streamed."""
    try:
        ask = parse(await read_body(request), engine.options)
        job = submit(engine, ask)
    except BadRequest as e:
        return error(request, e.code, str(e), e.param)
    except Busy as e:
        return error(request, 503, str(e), **{"Retry-After": "1"})
    if ask.stream:
        return StreamingResponse(events(request, job, ask), media_type="text/event-stream; charset=utf-8",
                                 headers=EVENT_STREAM)
    async with watch(request, job):
        kind, value = await last_event(job)
    return JSONResponse(whole(value, job)) if kind == "done" else failed(request, job, value)


def failed(request: Request, job: Job, why: str) -> Response:
    """The answer to a job that ended without a reply: 503 while the server stops, 500 for a failed generation,
    and for a client that left, nginx's 499 (for the log: nobody reads it)."""
    if job.left:
        return Response(status_code=499)
    return error(request, 503 if why == CLOSING else 500, why)


def submit(engine: Engine, ask: Ask) -> Job:
    ids = engine.encode(ask.history + [ask.message])
    job = Job(ids, ask.options, asyncio.get_running_loop(), ask.seed, ask.stops)
    engine.submit(job)
    return job


def usage_of(job: Job) -> dict:
    return openai_api.usage(len(job.ids), job.completion_tokens)


# ---------------------------------------------------------------- streams


def event(value) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


async def api_events(request: Request, job: Job, ask: Ask):
    async with watch(request, job):
        while True:
            kind, value = await next_event(job)
            if kind == "text":
                yield event({"text": value})
            elif kind == "done":
                yield b"data: [DONE]\n\n"
                return
            else:
                note(request, value)
                yield event({"error": value})
                return


async def chat_events(request: Request, job: Job, ask: Ask, completion: openai_api.Completion):
    async with watch(request, job):
        yield event(completion.chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = await next_event(job)
            if kind == "text":
                yield event(completion.chunk({"content": value}))
                continue
            if kind == "done":
                yield event(completion.chunk({}, job.finish_reason))
                if ask.include_usage:
                    yield event(completion.usage_chunk(usage_of(job)))
            else:
                note(request, value)
                yield event(openai_api.error_body(500, value))
            yield b"data: [DONE]\n\n"
            return


async def next_event(job: Job) -> tuple[str, str]:
    kind, value = await job.events.get()
    job.answered = kind != "text"
    return kind, value


async def last_event(job: Job) -> tuple[str, str]:
    """("done", reply) or ("error", why), the pieces before it passed over."""
    while True:
        kind, value = await next_event(job)
        if kind != "text":
            return kind, value


@contextlib.asynccontextmanager
async def watch(request: Request, job: Job):
    """While the job runs, notice the client leaving (its row then stops), and note it for the log.

    A stream that ends before its last event (Starlette cancels it when the
    client leaves, or writing to the client failed) counts as left too.
    """

    async def wait_for_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.left = True

    watcher = asyncio.create_task(wait_for_disconnect())
    try:
        yield
    finally:
        if not watcher.done():
            watcher.cancel()
        if not job.answered:
            job.left = True
        if job.left:
            note(request, "client left; generation stopped")


async def read_body(request: Request) -> bytes:
    """The whole body, or BadRequest (413 past MAX_BODY, after draining up to DRAIN_LIMIT so the client reads the 413)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise BadRequest(413, f"the body is {declared} bytes; the limit is {MAX_BODY}")
    body, size = bytearray(), 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= MAX_BODY:
                body += chunk
            elif size > DRAIN_LIMIT:
                break
    except ClientDisconnect:
        raise BadRequest(400, f"the client closed the connection after {size} bytes of the body") from None
    if size > MAX_BODY:
        raise BadRequest(413, f"the body is {'more than ' if size > DRAIN_LIMIT else ''}{size} bytes; the limit is {MAX_BODY}")
    return bytes(body)
