"""How fast `python infer.py --serve` answers, against the one-shot `python infer.py PROMPT`.

    python bench/bench_serve.py --checkpoint DIR [--runs 5] [--prompt "How are you?"]

Every figure is the median of --runs, wall time as the user sees it:

  one-shot, load included   `python infer.py --checkpoint DIR PROMPT`, a whole process
  one-shot, load excluded   generation.generate_response on a model already loaded (this process)
  server start              `python infer.py --serve --port 0` until it prints its address
  POST, plain               POST /api/reply, until the JSON reply is read
  POST, stream: first piece POST /api/reply with "stream": true, until the first `data: {"text": ...}` event
  POST, stream: whole reply the same request, until `data: [DONE]`

The server and the one-shot command run as users run them, each in a process
of its own; the three answers are checked to be the same text.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_shot(checkpoint, prompt) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "infer.py", "--checkpoint", checkpoint, prompt], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def loaded_reply(checkpoint, prompt, runs) -> tuple[float, str]:
    import torch

    from t5dialog.generation import generate_response, load, max_input_length

    model, tokenizer = load(Path(checkpoint), torch.device("cpu"))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        reply = generate_response(prompt, model, tokenizer, "cpu", max_length=max_input_length(Path(checkpoint)))
        times.append(time.perf_counter() - start)
    return statistics.median(times), reply


def post(port, body: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/api/reply", json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse()


def plain(port, prompt) -> tuple[float, str]:
    start = time.perf_counter()
    reply = json.loads(post(port, {"message": prompt}).read())["reply"]
    return time.perf_counter() - start, reply


def streamed(port, prompt) -> tuple[float, float, str]:
    start = time.perf_counter()
    response, first, pieces = post(port, {"message": prompt, "stream": True}), None, []
    while line := response.readline():
        if line.startswith(b"data: {"):
            first = first or time.perf_counter() - start
            pieces.append(json.loads(line[6:])["text"])
        elif line.startswith(b"data: [DONE]"):
            return first, time.perf_counter() - start, "".join(pieces)
    raise RuntimeError("the stream ended without [DONE]")


def serve_and_measure(checkpoint, prompt, runs) -> dict:
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "infer.py", "--serve", "--port", "0", "--checkpoint", checkpoint],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        banner = server.stderr.readline()
        started = time.perf_counter() - start
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", banner).group(1))
        plains = [plain(port, prompt) for _ in range(runs)]
        streams = [streamed(port, prompt) for _ in range(runs)]
    finally:
        server.terminate()
        server.wait()
    median = statistics.median
    return {"server_start_s": started, "plain_s": median(t for t, _ in plains),
            "stream_first_s": median(s[0] for s in streams), "stream_whole_s": median(s[1] for s in streams),
            "replies": {r for _, r in plains} | {s[2] for s in streams}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (train.py's checkpoint-<step>)")
    p.add_argument("--prompt", default="How are you?")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    shots = [one_shot(args.checkpoint, args.prompt) for _ in range(args.runs)]
    in_process, reply = loaded_reply(args.checkpoint, args.prompt, args.runs)
    served = serve_and_measure(args.checkpoint, args.prompt, args.runs)
    replies = served.pop("replies") | {r for _, r in shots} | {reply}
    rows = [("one-shot `python infer.py PROMPT`, load included", statistics.median(t for t, _ in shots)),
            ("one-shot reply, load excluded (generate_response)", in_process),
            ("server start until it listens, load included", served["server_start_s"]),
            ("POST /api/reply, plain", served["plain_s"]),
            ("POST /api/reply, stream: first piece", served["stream_first_s"]),
            ("POST /api/reply, stream: whole reply", served["stream_whole_s"])]
    print(f"checkpoint {args.checkpoint}, prompt {args.prompt!r}, median of {args.runs}; reply {reply!r}")
    for name, seconds in rows:
        print(f"| {name:<52} | {seconds * 1000:9.1f} ms |")
    if len(replies) != 1:
        sys.exit(f"bench_serve.py: the answers differ: {sorted(replies)}")


if __name__ == "__main__":
    main()
