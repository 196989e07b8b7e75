"""The server (t5dialog.serve) as clients use it: the real server, on a free 127.0.0.1 port, answering with the tests' tiny T5."""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from argparse import Namespace

import pytest
import torch
from conftest import ROOT, script_env

import infer
from dataset import encode_history
from t5dialog.generation import generate_response, load
from t5dialog.models import GENERATION_DEFAULTS
from t5dialog.serve import server as serve

CPU = torch.device("cpu")
MAX_LENGTH = 64
DEFAULTS = {**GENERATION_DEFAULTS, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load(tiny_model, CPU)


@pytest.fixture(scope="module")
def server(tiny_model, loaded):
    """serve.serve in a thread, as `python infer.py --serve --port 0` runs it: .port, .engine."""
    model, tokenizer = loaded
    engine = serve.Engine(model, tokenizer, CPU, "fp32", MAX_LENGTH, DEFAULTS, tiny_model, queue=2)
    srv = serve.open_server(Namespace(serve=True, port=0), None)
    thread = threading.Thread(target=serve.serve, args=(srv, engine), daemon=True)
    thread.start()
    srv.port = srv.server_address[1]
    yield srv
    srv.shutdown()
    thread.join()


def expected(loaded, message, history=(), **options):
    """What infer.py's generate_response answers, with the server's defaults under ``options``."""
    model, tokenizer = loaded
    return generate_response(message, model, tokenizer, CPU, history=list(history), max_length=MAX_LENGTH,
                             **{**DEFAULTS, **options})


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


def test_concurrent_clients_each_get_their_own_answer(server, loaded):
    messages = ["Hi .", "How are you ?", "What time is it ?", "Bye ."]
    want = {m: expected(loaded, m, max_new_tokens=12) for m in messages}
    got = {}

    def client(i, m):
        got[m] = "".join(ask_stream(server, message=m, max_new_tokens=12)) if i % 2 else ask(server, message=m, max_new_tokens=12)

    server.engine.queue = len(messages)  # all may wait: this test is about answers, not the queue's limit
    try:
        threads = [threading.Thread(target=client, args=(i, m)) for i, m in enumerate(messages)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.engine.queue = 2
    assert got == want


# ---------------------------------------------------------------- bad requests


def raw_request(server, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are (headers http.client would fix); (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # all is sent: a body shorter than its Content-Length ends here
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
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
    (b'{"message": "Hi", "top_p": 1.5}', "top_p must be in (0, 1]"),
    (b'{"message": "Hi", "temperature": 0}', "temperature"),
    (b'{"message": "Hi", "repetition_penalty": -1}', "repetition_penalty"),
    (b'{"message": "Hi", "seed": -1}', "seed"),
    (b'{"message": "Hi", "do_sample": true, "temperature": 1e400}', "temperature inf: not a finite number"),  # JSON's inf
    (b'{"message": "Hi", "do_sample": true, "temperature": 1e-320}', "temperature at least"),  # was a 500: NaN probabilities
    (b'{"message": "Hi", "repetition_penalty": 1e400}', "repetition_penalty inf"),
    (b'{"msg": "Hi"}', "unknown field(s) msg"),
]


@pytest.mark.parametrize("body, words", BAD_BODIES)
def test_a_bad_body_is_400_with_a_one_line_reason(server, body, words):
    status, headers, answer = request(server, "POST", "/api/reply", body, {"Content-Type": "application/json"})
    assert status == 400 and headers["Content-Type"] == "application/json", answer
    error = json.loads(answer)["error"]
    assert words in error and "\n" not in error and "Traceback" not in error, error


def test_bodies_too_large_or_of_unknown_length_are_refused(server):
    big = json.dumps({"message": "Hi " * 30_000}).encode()
    status, _, answer = request(server, "POST", "/api/reply", big)
    assert status == 413 and "limit" in json.loads(answer)["error"]
    start = b"POST /api/reply HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    assert raw_request(server, start + b"\r\n")[0] == 411  # no Content-Length
    assert raw_request(server, start + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")[0] == 411
    status, error = raw_request(server, start + b"Content-Length: -5\r\n\r\n")
    assert status == 400 and "Content-Length" in error["error"]
    assert raw_request(server, start + b"Content-Length: 80\r\n\r\n" + b'{"message": "Hi"}')[0] == 400  # ended early
    status, error = raw_request(server, b"GET /a b HTTP/1.1\r\n\r\n")  # http.server's own errors are JSON too
    assert status == 400 and "Bad request syntax" in error["error"]


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
    assert request(server, "POST", "/api/reply", body, {"Host": "evil.example"})[0] == 403  # DNS rebinding
    same_origin = {"Origin": f"http://127.0.0.1:{server.port}", "Host": f"127.0.0.1:{server.port}"}
    status, _, answer = request(server, "POST", "/api/reply", body, same_origin)
    assert status == 200 and json.loads(answer)["reply"] == expected(loaded, "Hi .")


# ---------------------------------------------------------------- one at a time, the queue, clients that leave


def test_a_full_queue_is_503_and_a_waiting_request_is_answered(server, loaded):
    engine = server.engine
    result = {}
    try:
        with engine.lock:  # as if a long reply were being written
            engine.queue = 0
            status, _, answer = request(server, "POST", "/api/reply", {"message": "Hi ."})
            assert status == 503 and "--queue 0" in json.loads(answer)["error"]
            engine.queue = 1
            waiting = threading.Thread(target=lambda: result.update(reply=ask(server, message="Hi .")))
            waiting.start()
            while engine.waiting < 1:  # it is in the line now
                assert waiting.is_alive()
                threading.Event().wait(0.01)
            status, _, answer = request(server, "POST", "/api/reply", {"message": "Bye .", "stream": True})
            assert status == 503 and "retry" in json.loads(answer)["error"]
        waiting.join()
    finally:
        engine.queue = 2
    assert result["reply"] == expected(loaded, "Hi .")


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, loaded):
    model, _ = loaded
    engine = server.engine
    steps = []
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: steps.append(1))
    body = json.dumps({"message": "Tell me a long story .", "stream": True, "max_new_tokens": 1000}).encode()
    try:
        stopped_before = engine.stopped_early
        with socket.create_connection(("127.0.0.1", server.port), timeout=300) as s:
            s.sendall(b"POST /api/reply HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b'data: {"text"' not in received:  # the first piece has arrived
                received += s.recv(4096)
        # The model lock is free again once the stopped generation ended: this reply comes.
        assert ask(server, message="Hi .", max_new_tokens=5) == expected(loaded, "Hi .", max_new_tokens=5)
    finally:
        handle.remove()
    assert engine.stopped_early == stopped_before + 1
    assert len(steps) < 1000  # the tiny model never writes </s>: uncancelled, this stream would take 1000 steps


def test_an_ipv6_host_may_be_written_as_in_a_url():
    for host in ("::1", "[::1]"):  # the banner says http://[::1]:PORT/; "[::1]" was "Name or service not known"
        srv = serve.open_server(Namespace(serve=True, host=host, port=0), None)
        try:
            assert srv.server_address[0] == "::1"
        finally:
            srv.server_close()


def test_a_burst_of_connections_is_taken_at_once():
    """The listen backlog holds a burst: with socketserver's 5, the 7th connect waited for a SYN retry (1 s, 3 s, ...)."""
    srv = serve.open_server(Namespace(serve=True, port=0), None)  # not serving yet: nothing accepts, all wait in the backlog
    try:
        clients = [socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=0.5) for _ in range(40)]
        for c in clients:
            c.close()
    finally:
        srv.server_close()


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


@pytest.mark.slow
def test_python_infer_py_serve_logs_one_line_per_request_and_ctrl_c_ends_it_in_one_line(tiny_model, loaded):
    env = script_env(buffered=True)
    p = subprocess.Popen([sys.executable, "infer.py", "--serve", "--port", "0", "--checkpoint", str(tiny_model),
                          "--max-new-tokens", "8"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        banner = p.stderr.readline()
        port = re.search(r"at http://127\.0\.0\.1:(\d+)/", banner)
        assert port, banner
        server = Namespace(port=int(port.group(1)))
        assert ask(server, message="How are you ?") == expected(loaded, "How are you ?")
        assert request(server, "POST", "/api/reply", b'{"message": ')[0] == 400
        with socket.create_connection(("127.0.0.1", server.port), timeout=300) as s:  # a client that leaves mid-stream
            body = b'{"message": "Hi .", "stream": true, "max_new_tokens": 1000}'
            s.sendall(b"POST /api/reply HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            while b"data: {" not in s.recv(4096):
                pass
        assert ask(server, message="Bye .") == expected(loaded, "Bye .")  # served after the stopped one
        p.send_signal(signal.SIGINT)
        err = p.stderr.read()
        assert p.wait(timeout=300) == 130
    finally:
        if p.poll() is None:
            p.kill()
    lines = err.strip().splitlines()
    assert lines[-1] == "infer.py: interrupted" and "Traceback" not in err, err
    assert len(lines) == 5, err  # one line per request
    assert '"POST /api/reply HTTP/1.1" 200' in lines[0] and '"POST /api/reply HTTP/1.1" 400' in lines[1]
    left, served = sorted(lines[2:4], key=lambda line: "client left" not in line)  # either may finish first
    assert "client left; generation stopped" in left and '"POST /api/reply HTTP/1.1" 200' in served
