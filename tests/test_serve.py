"""The server (t5dialog.serve) as clients use it: the real server, on a free 127.0.0.1 port, answering with the tests' tiny T5."""

import http.client
import json
import os
import re
import signal
import socket
import threading
from argparse import Namespace

import pytest
import launcher
from serving import CPU, first_piece, long_stream, request, serving, start_long_stream, wait_until

import infer
from dataset import encode_history
from t5dialog.generation import generate_response
from t5dialog.models import GENERATION_DEFAULTS
from t5dialog.serve import server as serve

MAX_LENGTH = 64
DEFAULTS = {**GENERATION_DEFAULTS, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_model, loaded):
    with serving(loaded, tiny_model, DEFAULTS, MAX_LENGTH) as listener:
        yield listener


@pytest.fixture
def settings(server):
    """The server's --max-batch and --queue, put back after a test changes them."""
    engine = server.engine
    saved = engine.max_batch, engine.queue
    yield engine
    engine.max_batch, engine.queue = saved


def expected(loaded, message, history=(), **options):
    """What infer.py's generate_response answers, with the server's defaults under ``options``."""
    model, tokenizer = loaded
    return generate_response(message, model, tokenizer, CPU, history=list(history), max_length=MAX_LENGTH,
                             **{**DEFAULTS, **options})


def ask(server, **fields):
    status, headers, body = request(server, "POST", "/api/reply", fields)
    assert status == 200, body
    return json.loads(body)["reply"]


def events(body: bytes) -> list[str]:
    """The `data:` payloads of an event stream, in order."""
    return [block.removeprefix("data: ") for block in body.decode().split("\n\n") if block]


def ask_stream(server, **fields) -> list[str]:
    status, headers, body = request(server, "POST", "/api/reply", {**fields, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream"), body
    data = events(body)
    assert data[-1] == "[DONE]", data
    return [json.loads(d)["text"] for d in data[:-1]]


# ---------------------------------------------------------------- the page and the answers


def test_the_page_is_one_offline_html_file(server):
    status, headers, body = request(server, "GET", "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert not re.search(r"https?://", page), re.search(r".{40}https?://.{40}", page)  # no external assets
    assert "__CONFIG__" not in page and '"max_new_tokens": 8' in page  # the server's defaults fill the controls
    assert "'none'" in headers["Content-Security-Policy"]


def test_the_reply_is_generate_responses(server, loaded):
    assert ask(server, message="How are you ?") == expected(loaded, "How are you ?")
    options = dict(max_new_tokens=12, num_beams=2, no_repeat_ngram_size=0, repetition_penalty=1.3)
    assert ask(server, message="Hello there .", **options) == expected(loaded, "Hello there .", **options)


def test_a_stream_comes_in_pieces_that_join_to_the_reply(server, loaded):
    pieces = ask_stream(server, message="What time is it ?", max_new_tokens=40)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == expected(loaded, "What time is it ?", max_new_tokens=40)
    beams = ask_stream(server, message="What time is it ?", max_new_tokens=10, num_beams=3)  # beam search: one piece
    assert beams == [expected(loaded, "What time is it ?", max_new_tokens=10, num_beams=3)]


def test_sampling_with_a_seed_is_reproducible(server):
    fields = dict(message="Hi .", do_sample=True, top_k=0, temperature=1.5, seed=7, max_new_tokens=10)
    assert ask(server, **fields) == ask(server, **fields) == "".join(ask_stream(server, **fields))


def encoder_inputs(model):
    seen = []
    handle = model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    return seen, handle


def test_the_history_is_what_the_model_reads(server, loaded):
    model, tokenizer = loaded
    history, message = ["Hello there .", "Hi , can I help you ?"], "What time is it ?"
    long_history = [f"turn {i} of a very long conversation about nothing in particular ." for i in range(300)]
    seen, handle = encoder_inputs(model)
    try:
        with_history = ask(server, message=message, history=history)
        alone = ask(server, message=message)
        "".join(ask_stream(server, message=message, history=history))
        ask(server, message=message, history=long_history)
    finally:
        handle.remove()
    assert seen[0] == encode_history(tokenizer, history + [message], MAX_LENGTH) != seen[1]
    assert seen[1] == encode_history(tokenizer, [message], MAX_LENGTH)
    assert seen[2] == seen[0]  # streamed or not, the same input
    assert seen[3] == encode_history(tokenizer, long_history + [message], MAX_LENGTH) and len(seen[3]) <= MAX_LENGTH
    assert with_history == expected(loaded, message, history) and alone == expected(loaded, message)


def test_concurrent_clients_each_get_their_own_answer(server, loaded, capsys):
    """16 clients at once, half of them streaming: all are answered with the defaults (--max-batch 16, --queue 8)."""
    messages = [f"Message number {i} , {'with more words ' * (i % 4)}?" for i in range(16)]
    want = {m: expected(loaded, m, max_new_tokens=6 + i % 3) for i, m in enumerate(messages)}
    got = {}

    def client(i, m):
        fields = dict(message=m, max_new_tokens=6 + i % 3)
        got[m] = "".join(ask_stream(server, **fields)) if i % 2 else ask(server, **fields)

    threads = [threading.Thread(target=client, args=(i, m)) for i, m in enumerate(messages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    lines = [line for line in capsys.readouterr().err.splitlines() if "/api/reply" in line]
    assert len(lines) == 16 and all(re.fullmatch(r'serve: 127\.0\.0\.1 "POST /api/reply HTTP/1\.1" 200 [\d.]+s', line)
                                    for line in lines), lines  # one whole line per request


def test_waiting_requests_are_generated_together_each_as_if_alone(server, loaded):
    """Requests that wait while the model is busy go as one batch; a greedy reply in it is the reply alone."""
    engine = server.engine
    messages = ["Hi .", "How are you doing today , my friend ?", "What time is it ?", "Bye .",
                "I would like to book a table for two people tonight , please ."]
    want = {m: expected(loaded, m, max_new_tokens=5 + i) for i, m in enumerate(messages)}
    got = {}

    def client(i, m):
        fields = dict(message=m, max_new_tokens=5 + i)
        got[m] = "".join(ask_stream(server, **fields)) if i % 2 else ask(server, **fields)

    threads = [threading.Thread(target=client, args=(i, m)) for i, m in enumerate(messages)]
    with long_stream(server):  # the model is busy: the requests wait
        for t in threads:
            t.start()
        wait_until(lambda: len(engine.waiting) == len(messages), "all requests wait")
        sizes = engine.batch_sizes.copy()
    for t in threads:  # the long stream's client left: the waiting requests are the next batch
        t.join()
    assert got == want
    assert engine.batch_sizes - sizes == {len(messages): 1}  # after the long stream, all five in one batch


def test_a_client_that_leaves_a_batch_does_not_stop_the_others(server, loaded):
    engine = server.engine
    messages = ["Hi .", "What time is it ?", "How are you ?"]
    want = {m: expected(loaded, m, max_new_tokens=40) for m in messages}
    got = {}
    threads = [threading.Thread(target=lambda m=m: got.update({m: "".join(ask_stream(server, message=m, max_new_tokens=40))}))
               for m in messages]
    stopped = engine.stopped_early
    with long_stream(server):
        for t in threads:
            t.start()
        leaver = start_long_stream(server)  # joins the batch of three, and leaves it after its first piece
        wait_until(lambda: len(engine.waiting) == len(messages) + 1, "the streams wait")
    with leaver:
        first_piece(leaver)
    for t in threads:
        t.join()
    assert got == want
    assert engine.stopped_early == stopped + 2


# ---------------------------------------------------------------- bad requests


def raw_request(server, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are (what http.client would not send); (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        while len(body) < length:
            body += s.recv(65536)
    return int(head.split()[1]), json.loads(body)


BAD_BODIES = [
    (b'{"message": "Hi"', "malformed JSON"),
    (b"", "malformed JSON"),
    (b'["Hi"]', "JSON object"),
    (b'{"message": "Hi", "temperature": NaN}', "NaN"),
    (b'{"message": "\xff\xfe Hi"}', "UTF-8"),
    (b"{}", '"message"'),
    (b'{"message": ""}', '"message"'),
    (b'{"message": "   "}', '"message"'),
    (b'{"message": 42}', '"message"'),
    (b'{"message": "Hi", "history": "Hello"}', '"history"'),
    (b'{"message": "Hi", "history": ["Hello", 3]}', '"history"'),
    (b'{"message": "Hi", "stream": "yes"}', '"stream"'),
    (b'{"message": "Hi", "max_new_tokens": "8"}', '"max_new_tokens" must be an integer'),
    (b'{"message": "Hi", "max_new_tokens": 8.5}', '"max_new_tokens" must be an integer'),
    (b'{"message": "Hi", "do_sample": 1}', '"do_sample" must be true or false'),
    (b'{"message": "Hi", "num_beams": true}', '"num_beams" must be an integer'),
    (b'{"message": "Hi", "max_new_tokens": 0}', "max_new_tokens"),
    (b'{"message": "Hi", "max_new_tokens": 100000}', "limit"),
    (b'{"message": "Hi", "top_p": 1.5}', "top_p 1.5: must be in (0, 1]"),
    (b'{"message": "Hi", "temperature": 0}', "temperature"),
    (b'{"message": "Hi", "repetition_penalty": -1}', "repetition_penalty"),
    (b'{"message": "Hi", "seed": -1}', "seed"),
    (b'{"message": "Hi", "do_sample": true, "temperature": 1e400}', "temperature inf: not a finite number"),  # JSON's inf
    (b'{"message": "Hi", "do_sample": true, "temperature": 1e-320}', "temperature 1e-320: must be from 0.001"),  # was a 500
    (b'{"message": "Hi", "do_sample": true, "temperature": 1e39, "no_repeat_ngram_size": 1}',
     "temperature 1e+39: must be from 0.001 to 1000"),  # was a 500: inf in float32, and -inf / inf is NaN
    (b'{"message": "Hi", "do_sample": true, "repetition_penalty": 1e39}', "repetition_penalty 1e+39: must be from"),
    (b'{"message": "Hi", "seed": 18446744073709551616}', "seed 18446744073709551616: must be in [0, 2**63)"),
    (b'{"message": "Hi", "repetition_penalty": 1e400}', "repetition_penalty inf"),
    (b'{"msg": "Hi"}', "unknown field(s) msg"),
]


@pytest.mark.parametrize("body, words", BAD_BODIES)
def test_a_bad_body_is_400_with_a_one_line_reason(server, body, words):
    status, headers, answer = request(server, "POST", "/api/reply", body, {"Content-Type": "application/json"})
    assert status == 400 and headers["Content-Type"] == "application/json", answer
    error = json.loads(answer)["error"]
    assert words in error and "\n" not in error and "Traceback" not in error, error


def test_bodies_too_large_are_refused(server):
    big = json.dumps({"message": "Hi " * 30_000}).encode()
    status, _, answer = request(server, "POST", "/api/reply", big)
    assert status == 413 and "limit is 65536" in json.loads(answer)["error"]
    start = b"POST /api/reply HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    chunk = b"%x\r\n%s\r\n" % (50_000, b"x" * 50_000)
    status, error = raw_request(server, start + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n")
    assert status == 413 and "limit" in error["error"]  # a chunked body is counted as it comes
    status, error = raw_request(server, start + b"Content-Length: 5000000\r\n\r\n")
    assert status == 413 and "5000000" in error["error"]  # refused before it is sent
    status, error = raw_request(server, start + b"Transfer-Encoding: chunked\r\n\r\n" + b'11\r\n{"message": "Hi"}\r\n0\r\n\r\n')
    assert status == 200 and error["reply"]


def test_unknown_paths_are_404_and_wrong_methods_405(server):
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "POST", "/api/nope", {"message": "Hi"})[0] == 404
    status, headers, answer = request(server, "GET", "/api/reply")
    assert status == 405 and headers["Allow"] == "POST" and "POST" in json.loads(answer)["error"]
    assert request(server, "POST", "/", {"message": "Hi"})[0] == 405
    assert request(server, "DELETE", "/api/reply")[0] == 405


def test_requests_from_other_sites_are_refused(server, loaded):
    body = {"message": "Hi ."}
    assert request(server, "POST", "/api/reply", body, {"Origin": "http://evil.example"})[0] == 403
    two_origins = b"POST /api/reply HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: http://evil.example\r\n" % server.port
    two_origins += b"Origin: http://127.0.0.1:%d\r\nContent-Length: 17\r\n\r\n{\"message\": \"Hi\"}" % server.port
    assert raw_request(server, two_origins)[0] == 403  # the last Origin does not hide the first
    status, _, answer = request(server, "POST", "/api/reply", body, {"Host": "evil.example"})  # DNS rebinding
    assert status == 403 and "evil.example" in json.loads(answer)["error"]
    assert request(server, "GET", "/", headers={"Host": "evil.example:8000"})[0] == 403  # the page too
    status, _, answer = request(server, "POST", "/v1/chat/completions", {}, {"Host": "evil.example"})
    assert status == 403 and json.loads(answer)["error"]["type"] == "invalid_request_error"
    same_origin = {"Origin": f"http://127.0.0.1:{server.port}", "Host": f"127.0.0.1:{server.port}"}
    status, _, answer = request(server, "POST", "/api/reply", body, same_origin)
    assert status == 200 and json.loads(answer)["reply"] == expected(loaded, "Hi .")
    assert request(server, "GET", "/", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_beyond_this_machine_host_names_must_be_allowed(tiny_model, loaded):
    """Listening on 0.0.0.0 keeps the Host check: addresses pass (they cannot be rebound), names need --allow-host."""
    with serving(loaded, tiny_model, DEFAULTS, host="0.0.0.0", allow_host=["mybox.lan"]) as listener:
        assert request(listener, "GET", "/", headers={"Host": f"mybox.lan:{listener.port}"})[0] == 200
        assert request(listener, "GET", "/", headers={"Host": f"192.168.1.20:{listener.port}"})[0] == 200
        status, _, answer = request(listener, "GET", "/", headers={"Host": "rebound.example"})
        assert status == 403 and "--allow-host rebound.example" in json.loads(answer)["error"]


def test_a_thousand_idle_connections_leave_the_server_answering(server, loaded):
    """Past 1,023 descriptors select() failed and every request stopped; 1,100 idle connections are now just idle."""
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=60))
        assert ask(server, message="Hi .") == expected(loaded, "Hi .")
    finally:
        for s in idle:
            s.close()


def test_the_connection_cap_fits_the_descriptor_limit():
    """uvicorn answers 503 past the cap; the cap stays below the descriptors the process may open, raised if it can be."""
    import resource

    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, saved[1]))  # as under a low `ulimit -n`
        cap = serve.connection_limit()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert cap <= soft - serve.FD_MARGIN and cap <= serve.MAX_CONNECTIONS
        assert soft > 256 or saved[1] == 256  # raised to the hard limit where that is higher
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


# ---------------------------------------------------------------- the queue, clients that leave


def test_a_full_queue_is_503_and_a_waiting_request_is_answered(server, loaded, settings):
    result = {}
    settings.max_batch, settings.queue = 1, 0  # one at a time, and one waiting (the next batch) at most
    waiting = threading.Thread(target=lambda: result.update(reply=ask(server, message="Hi .")))
    with long_stream(server):
        waiting.start()
        wait_until(lambda: len(settings.waiting) == 1, "the request waits")
        status, headers, answer = request(server, "POST", "/api/reply", {"message": "Bye .", "stream": True})
        assert status == 503 and "--queue 0" in json.loads(answer)["error"] and headers["Retry-After"] == "1"
        settings.queue = 1
        status, _, answer = request(server, "POST", "/v1/chat/completions", {"messages": []})
        assert status == 400  # a bad request is refused before it waits
    waiting.join()
    assert result["reply"] == expected(loaded, "Hi .")


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, loaded):
    model, _ = loaded
    engine = server.engine
    steps = []
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        stopped_before = engine.stopped_early
        with long_stream(server):
            pass
        # The model is free again once the stopped generation ended: this reply comes.
        assert ask(server, message="Hi .", max_new_tokens=5) == expected(loaded, "Hi .", max_new_tokens=5)
    finally:
        handle.remove()
    assert engine.stopped_early == stopped_before + 1
    assert len(steps) < 1000  # the tiny model never writes </s>: uncancelled, this stream would take 1000 steps


def test_a_client_that_leaves_while_waiting_is_dropped_and_its_request_ends(server, loaded, capsys):
    engine = server.engine
    body = json.dumps({"message": "Hi .", "max_new_tokens": 50}).encode()
    with long_stream(server):
        with socket.create_connection(("127.0.0.1", server.port), timeout=300) as waiting:
            waiting.sendall(b"POST /api/reply HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            wait_until(lambda: len(engine.waiting) == 1, "the plain request waits")
        wait_until(lambda: engine.waiting[0].left, "its leaving is seen")
    assert ask(server, message="Bye .") == expected(loaded, "Bye .")
    wait_until(lambda: "client left" in capsys.readouterr().err, "the left request's line")  # its handler ended


def test_beam_searches_share_a_batch_and_answer_as_alone(server, loaded):
    engine = server.engine
    messages = ["Hi .", "How are you doing today , my friend ?", "What time is it ?"]
    options = dict(num_beams=3, max_new_tokens=10, no_repeat_ngram_size=0)
    want = {m: expected(loaded, m, **options) for m in messages}
    got = {}
    threads = [threading.Thread(target=lambda m=m: got.update({m: ask(server, message=m, **options)})) for m in messages]
    with long_stream(server):
        for t in threads:
            t.start()
        wait_until(lambda: len(engine.waiting) == len(messages), "the requests wait")
        sizes = engine.batch_sizes.copy()
    for t in threads:
        t.join()
    assert got == want and engine.batch_sizes - sizes == {3: 1}


def test_a_short_reply_in_a_batch_comes_when_it_ends_not_when_the_batch_does(server, loaded):
    engine = server.engine
    result = {}
    short = threading.Thread(target=lambda: result.update(reply=ask(server, message="Hi .", max_new_tokens=3)))
    with long_stream(server):
        long = start_long_stream(server)  # shares the next batch with the short request, and runs on
        short.start()
        wait_until(lambda: len(engine.waiting) == 2, "both wait")
    with long:
        short.join()  # answered after its 3 tokens, while the long row goes on
        received = b""
        while received.count(b'data: {"text"') < 3:  # the long stream is still being written
            received += long.recv(4096)
        assert b"[DONE]" not in received
    assert result["reply"] == expected(loaded, "Hi .", max_new_tokens=3)


def test_clients_that_left_free_their_places_in_the_line(server, loaded, settings):
    settings.max_batch, settings.queue = 1, 1
    body = json.dumps({"message": "Hi ."}).encode()
    with long_stream(server):
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", server.port), timeout=300) as gone:
                gone.sendall(b"POST /api/reply HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                wait_until(lambda: engine_holds(settings, 1), "it waits")
        wait_until(lambda: all(job.left for job in settings.waiting), "both are seen to leave")
        result = {}
        waiting = threading.Thread(target=lambda: result.update(reply=ask(server, message="Bye .")))
        waiting.start()  # the line is full of clients that left: this one takes a place
        wait_until(lambda: any(not job.left for job in settings.waiting), "it waits")
    waiting.join()
    assert result["reply"] == expected(loaded, "Bye .")


def engine_holds(engine, count: int) -> bool:
    return sum(not job.left for job in engine.waiting) == count


def test_an_ipv6_host_may_be_written_as_in_a_url():
    for host in ("::1", "[::1]"):  # the banner says http://[::1]:PORT/; "[::1]" was "Name or service not known"
        listener = serve.open_server(Namespace(serve=True, host=host, port=0), None)
        try:
            assert listener.host == "::1" and listener.url == f"http://[::1]:{listener.port}/"
        finally:
            listener.close()


def test_a_burst_of_connections_is_taken_at_once():
    """The listen backlog holds a burst: with a backlog of 5, the 7th connect waited for a SYN retry (1 s, 3 s, ...)."""
    listener = serve.open_server(Namespace(serve=True, port=0), None)  # not serving yet: nothing accepts, all wait
    try:
        clients = [socket.create_connection(("127.0.0.1", listener.port), timeout=0.5) for _ in range(40)]
        for c in clients:
            c.close()
    finally:
        listener.close()


# ---------------------------------------------------------------- the command line


def test_listening_beyond_this_machine_is_said_loudly():
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        warning = serve.exposure_warning(host)
        assert "ANYONE WHO CAN REACH THIS PORT CAN USE THE MODEL" in warning and "--host 127.0.0.1" in warning
    for host in ("127.0.0.1", "127.0.1.1", "localhost", "::1"):
        assert serve.exposure_warning(host) is None


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err)


def test_bad_serve_flags_are_one_line_errors(tiny_model, capsys):
    base = ["--checkpoint", str(tiny_model)]
    assert infer.main([*base, "--serve", "--port", "70000"]) == 2
    one_line_error(capsys, "--port 70000", "1-65535")
    assert infer.main([*base, "--serve", "--queue", "-1"]) == 2
    one_line_error(capsys, "--queue -1")
    assert infer.main([*base, "--port", "8000", "Hi"]) == 2
    one_line_error(capsys, "--port", "--serve")
    assert infer.main([*base, "--serve", "Hi"]) == 2
    one_line_error(capsys, "prompt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert infer.main([*base, "--serve", "--port", str(port)]) == 2
        one_line_error(capsys, f"--port {port}", "in use")


def test_bad_serve_flags_are_one_line_errors_too(tiny_model, capsys):
    base = ["--checkpoint", str(tiny_model)]
    assert infer.main([*base, "--serve", "--max-batch", "0"]) == 2
    one_line_error(capsys, "--max-batch 0")
    assert infer.main([*base, "--allow-host", "mybox.lan", "Hi"]) == 2
    one_line_error(capsys, "--allow-host", "--serve")


def stream_under_way(port: int) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/api/reply", json.dumps({"message": "Hi .", "stream": True, "max_new_tokens": 1000}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    return response


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_python_infer_py_serve_logs_one_line_per_request_and_ctrl_c_ends_it_in_one_line(tiny_model, loaded, attempt):
    run = launcher.start("infer.py", "--serve", "--port", "0", "--checkpoint", tiny_model, "--max-new-tokens", "8")
    try:
        wait_until(lambda: "Ctrl-C stops" in run.output_so_far(), "the server listens")
        port = int(re.search(r"at http://127\.0\.0\.1:(\d+)/", run.output_so_far()).group(1))
        server = Namespace(port=port)
        assert ask(server, message="How are you ?") == expected(loaded, "How are you ?")
        assert request(server, "POST", "/api/reply", b'{"message": ')[0] == 400
        with long_stream(server):  # a client that leaves mid-stream
            pass
        assert ask(server, message="Bye .") == expected(loaded, "Bye .")  # served after the stopped one
        streaming = stream_under_way(port)
        os.kill(run.pid, signal.SIGINT)  # Ctrl-C while a reply streams
        rest = streaming.read()  # the stream ends cleanly: no reset, no half chunk
        assert events(rest)[-1] == json.dumps({"error": "the server is stopping; this reply was cut short"}), rest[-300:]
        result = run.wait(60)
    except BaseException:
        os.kill(run.pid, signal.SIGKILL)
        raise
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "infer.py: interrupted" and "Traceback" not in result.stderr and "Abort" not in result.stderr, lines
    assert len(lines) == 7, lines  # the banner, one line per request, and the last line
    assert '"POST /api/reply HTTP/1.1" 200' in lines[1] and '"POST /api/reply HTTP/1.1" 400' in lines[2]
    left, served = sorted(lines[3:5], key=lambda line: "client left" not in line)  # either may finish first
    assert "client left; generation stopped" in left and '"POST /api/reply HTTP/1.1" 200' in served
    assert "the server is stopping" in lines[5]
