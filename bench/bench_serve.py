"""How much `python infer.py --serve` answers per second when several clients chat at once.

    python bench/bench_serve.py                            # a model built here that always writes --max-new-tokens tokens
    python bench/bench_serve.py --checkpoint DIR           # a real checkpoint (replies may end early)
    python bench/bench_serve.py --startup --checkpoint DIR # server vs one-shot `python infer.py PROMPT` (one client)

Concurrency (the default): the server runs as a user runs it (`python infer.py --serve --port 0`,
a process of its own), and 1, 4 and 16 clients (--clients) talk to it. Each client is a thread
with its own http.client connection that sends streaming `POST /api/reply` requests back to back;
--requests requests per level are shared out evenly among its clients. Per level:

  tokens/s         generated tokens of all replies / wall time from the clients' start to the last [DONE]
  first token      one request's time until its first `data: {"text": ...}` event (p50, p95)
  whole reply      one request's time until `data: [DONE]` (p50, p95)

The server runs twice: batched (--max-batch, default 16; it generates waiting requests
together) at every level, and one request at a time (`--max-batch 1`) at the largest level, so
the table shows what batching buys. Both get --queue (default 32) so that no client is refused
with 503.

Tokens: without --checkpoint the bench builds its own model (models.build_scratch's shape, random
weights, a tokenizer trained on data/sample) whose output layer can only ever pick whole words
(tokens `▁` + letters): never </s>, <pad> or <unk>. Every reply is therefore exactly
--max-new-tokens tokens, and its text is that many space-separated words: the bench checks this
for every reply and counts max_new_tokens per reply. With --checkpoint, replies end when the
model says so: tokens are counted by re-tokenizing each reply with the checkpoint's tokenizer
(an estimate: decoding and encoding again need not give the same pieces).

Threads: the server gets OMP_NUM_THREADS=1 unless the variable is set (see bench/README.md).

Startup (--startup, one client): every figure but the server's start (once) is the median of --runs,
wall time as the user sees it:

  one-shot, load included   `python infer.py --checkpoint DIR PROMPT`, a whole process
  one-shot, load excluded   generation.generate_response on a model already loaded (this process)
  server start              `python infer.py --serve --port 0` until it prints its address
  POST, plain               POST /api/reply, until the JSON reply is read
  POST, stream: first piece POST /api/reply with "stream": true, until the first `data: {"text": ...}` event
  POST, stream: whole reply the same request, until `data: [DONE]`

The three answers are checked to be the same text.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Could you tell me how to get to the railway station from here ?"  # 25 tokens for the model built here
STARTUP_PROMPT = "How are you?"
BANNER = re.compile(r"at http://127\.0\.0\.1:(\d+)/")


# ---------------------------------------------------------------- a model that never stops early


def build_fixed_length_model(out: Path, seed: int = 0) -> dict:
    """Write into ``out`` a random T5 (build_scratch's shape) that only ever writes whole words; return what it is.

    Its output layer is untied from the embeddings: the rows of </s>, <pad>, <unk> and every token that is not
    `▁` + letters are zero (logit exactly 0), and the whole-word rows come in pairs w, -w. The pairs (356 of
    them) span the hidden space, so for any hidden state h some pair has h.w != 0, and one of its two words
    scores above 0: greedy decoding picks a whole word at every step. With no_repeat_ngram_size a few words
    may be banned at a step; the pairs left still span the space. The check is made anyway, on every reply.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from t5dialog import models

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model, tokenizer = models.build_scratch(ROOT / "data" / "sample" / "train.txt", vocab_size=8000, seed=seed,
                                            tie_word_embeddings=False)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = [i for i, p in enumerate(pieces) if p.startswith("▁") and p[1:].isascii() and p[1:].isalpha()]
    words = words[: len(words) // 2 * 2]
    with torch.no_grad():
        head = model.lm_head.weight  # (vocab, d_model)
        kept = head[words[0::2]].clone()
        if torch.linalg.matrix_rank(kept) < head.shape[1]:
            sys.exit(f"bench_serve.py: the {len(kept)} word pairs do not span the model's hidden space")
        head.zero_()
        head[words[0::2]] = kept
        head[words[1::2]] = -kept
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(tokenizer),
            "writable_words": len(words), "config": {k: getattr(model.config, k) for k in models.SCRATCH_CONFIG}}


def check_fixed_length(path: Path, prompt: str, max_new_tokens: int):
    """In this process: the model's greedy reply to ``prompt`` is max_new_tokens whole-word tokens."""
    import torch

    from t5dialog.dialogues import encode_history
    from t5dialog.generation import load

    model, tokenizer = load(path, torch.device("cpu"))
    ids = encode_history(tokenizer, [prompt], 512)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)[0, 1:].tolist()  # 0: decoder start
    special = set(tokenizer.all_special_ids)
    if len(out) != max_new_tokens or special & set(out):
        sys.exit(f"bench_serve.py: the model built here wrote {len(out)} tokens {out}, not {max_new_tokens} words")
    return len(ids)


# ---------------------------------------------------------------- the server


class Served:
    """`python infer.py --serve --port 0 --checkpoint DIR *extra` in a process of its own, its stderr drained."""

    def __init__(self, checkpoint, *extra):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.argv = [sys.executable, "infer.py", "--serve", "--port", "0", "--checkpoint", str(checkpoint), *extra]
        start = time.perf_counter()
        self.process = subprocess.Popen(self.argv, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
        self.tail = collections.deque(maxlen=20)
        self.port = None
        for line in self.process.stderr:
            self.tail.append(line)
            if found := BANNER.search(line):
                self.port = int(found.group(1))
                break
        self.started_s = time.perf_counter() - start
        if self.port is None:
            self.process.wait()
            sys.exit(f"bench_serve.py: the server stopped before listening ({' '.join(self.argv[1:])}):\n"
                     + "".join(self.tail))
        # Keep reading: a server that logs every request would otherwise block once the pipe is full.
        threading.Thread(target=lambda: self.tail.extend(self.process.stderr), daemon=True).start()

    def close(self):
        self.process.terminate()
        self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def post(connection: http.client.HTTPConnection, body: dict) -> http.client.HTTPResponse:
    connection.request("POST", "/api/reply", json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse()


def streamed(connection, body) -> tuple[float, float, str]:
    """(seconds to the first text event, seconds to [DONE], the reply) of one streaming request."""
    start = time.perf_counter()
    response, first, pieces = post(connection, dict(body, stream=True)), None, []
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300].decode(errors='replace').strip()}")
    while line := response.readline():
        if line.startswith(b'data: {"text"'):
            first = first or time.perf_counter() - start
            pieces.append(json.loads(line[6:])["text"])
        elif line.startswith(b"data: [DONE]"):
            done = time.perf_counter() - start
            response.read()  # the rest of the stream, so the connection can carry the next request
            return first if first is not None else done, done, "".join(pieces)
        elif line.startswith(b"data: "):
            raise RuntimeError(f"the stream said {line[6:].decode(errors='replace').strip()}")
    raise RuntimeError("the stream ended without [DONE]")


def run_level(port: int, clients: int, requests: int, body: dict) -> dict:
    """``clients`` threads, each with its own connection, sending ``requests`` streaming requests in all."""
    each = math.ceil(requests / clients)
    results: list[tuple[float, float, str]] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        ready.wait()
        try:
            for _ in range(each):
                result = streamed(connection, body)
                with lock:
                    results.append(result)
        except Exception as e:  # reported once all clients are done
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        sys.exit(f"bench_serve.py: {len(errors)} of {clients} clients failed, e.g. {errors[0]}")
    return {"clients": clients, "requests": len(results), "seconds": seconds,
            "first_s": [r[0] for r in results], "whole_s": [r[1] for r in results], "replies": [r[2] for r in results]}


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100), linear between the nearest ranks."""
    values = sorted(values)
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    return values[low] + (values[min(low + 1, len(values) - 1)] - values[low]) * (rank - low)


def count_tokens(level: dict, max_new_tokens: int, tokenizer) -> int:
    """Generated tokens of a level's replies: max_new_tokens each, checked (fixed-length model), or re-tokenized."""
    if tokenizer is None:
        short = [r for r in level["replies"] if len(r.split()) != max_new_tokens]
        if short:
            sys.exit(f"bench_serve.py: {len(short)} replies are not {max_new_tokens} words, e.g. {short[0]!r}")
        return max_new_tokens * len(level["replies"])
    return sum(len(tokenizer(r, add_special_tokens=False).input_ids) for r in level["replies"])


def concurrency(args):
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tokenizer = None
        if args.checkpoint:
            from transformers import AutoTokenizer

            from t5dialog.checkpoint import choose_checkpoint

            checkpoint = choose_checkpoint(args.checkpoint)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
            model_line = f"checkpoint {checkpoint}; tokens counted by re-tokenizing each reply"
        else:
            checkpoint = Path(tmp) / "fixed-length-t5"
            made = build_fixed_length_model(checkpoint)
            prompt_tokens = check_fixed_length(checkpoint, args.prompt, args.max_new_tokens)
            model_line = (f"random T5 {made['config']}, {made['parameters'] / 1e6:.1f}M parameters, vocabulary "
                          f"{made['vocabulary']} ({made['writable_words']} whole words it can write); "
                          f"prompt {prompt_tokens} tokens; every reply is {args.max_new_tokens} tokens (checked)")
        arms = [("batched", [f"--max-batch={args.max_batch}"], args.clients),
                ("one at a time", ["--max-batch=1"], [max(args.clients)])]
        body = {"message": args.prompt, "max_new_tokens": args.max_new_tokens}
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        print(f"{model_line}\nmax_new_tokens {args.max_new_tokens}, {args.requests} requests per level, "
              f"server OMP_NUM_THREADS={threads}, --queue {args.queue}", flush=True)
        rows = []
        for name, flags, levels in arms:
            with Served(checkpoint, f"--queue={args.queue}", *flags) as server:
                warm_up = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
                for _ in range(2):  # not timed
                    streamed(warm_up, body)
                warm_up.close()
                for clients in levels:
                    level = run_level(server.port, clients, args.requests, body)
                    tokens = count_tokens(level, args.max_new_tokens, tokenizer)
                    row = {"server": name, "flags": flags, "clients": clients, "requests": level["requests"],
                           "tokens": tokens, "seconds": level["seconds"], "tokens_per_s": tokens / level["seconds"],
                           **{f"{what}_p{q}_s": percentile(level[f"{what}_s"], q)
                              for what in ("first", "whole") for q in (50, 95)}}
                    rows.append(row)
                    print(f"  {name}, {clients} clients: {row['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    print("\n| server | clients | requests | tokens/s | first token p50 / p95 | whole reply p50 / p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:,.0f} | "
              f"{r['first_p50_s'] * 1000:,.0f} / {r['first_p95_s'] * 1000:,.0f} ms | "
              f"{r['whole_p50_s'] * 1000:,.0f} / {r['whole_p95_s'] * 1000:,.0f} ms |")
    top = max(args.clients)
    by = {(r["server"], r["clients"]): r for r in rows}
    if ("batched", top) in by:
        gain = by["batched", top]["tokens_per_s"] / by["one at a time", top]["tokens_per_s"]
        print(f"\n{top} clients: batched {gain:.2f}x the tokens/s of one at a time")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_line, "max_new_tokens": args.max_new_tokens,
                                               "omp_num_threads": threads, "rows": rows}, indent=1) + "\n")


# ---------------------------------------------------------------- --startup: server vs one-shot


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


def plain(port, prompt) -> tuple[float, str]:
    start = time.perf_counter()
    response = post(http.client.HTTPConnection("127.0.0.1", port, timeout=600), {"message": prompt})
    reply = json.loads(response.read())["reply"]
    return time.perf_counter() - start, reply


def startup(args):
    if not args.checkpoint:
        sys.exit("bench_serve.py: --startup needs --checkpoint DIR")
    shots = [one_shot(args.checkpoint, args.prompt) for _ in range(args.runs)]
    in_process, reply = loaded_reply(args.checkpoint, args.prompt, args.runs)
    with Served(args.checkpoint) as server:
        plains = [plain(server.port, args.prompt) for _ in range(args.runs)]
        streams = [streamed(http.client.HTTPConnection("127.0.0.1", server.port, timeout=600), {"message": args.prompt})
                   for _ in range(args.runs)]
    median = statistics.median
    replies = {r for _, r in shots} | {reply} | {r for _, r in plains} | {s[2] for s in streams}
    rows = [("one-shot `python infer.py PROMPT`, load included", median(t for t, _ in shots)),
            ("one-shot reply, load excluded (generate_response)", in_process),
            ("server start until it listens, load included", server.started_s),
            ("POST /api/reply, plain", median(t for t, _ in plains)),
            ("POST /api/reply, stream: first piece", median(s[0] for s in streams)),
            ("POST /api/reply, stream: whole reply", median(s[1] for s in streams))]
    print(f"checkpoint {args.checkpoint}, prompt {args.prompt!r}, median of {args.runs}; reply {reply!r}")
    for name, seconds in rows:
        print(f"| {name:<52} | {seconds * 1000:9.1f} ms |")
    if len(replies) != 1:
        sys.exit(f"bench_serve.py: the answers differ: {sorted(replies)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint folder (train.py's checkpoint-<step>, or an output dir); "
                                        "default: a model built here that always writes --max-new-tokens tokens")
    p.add_argument("--prompt", default=None, help=f"default: {PROMPT!r}; with --startup, {STARTUP_PROMPT!r}")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="requests per level, shared out among its clients")
    p.add_argument("--max-new-tokens", type=int, default=32, help="sent with every request")
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--queue", type=int, default=32, help="the server's --queue: enough that no client gets 503")
    p.add_argument("--json", metavar="PATH", help="write the raw figures there")
    p.add_argument("--startup", action="store_true", help="instead: server vs one-shot infer.py, one client")
    p.add_argument("--runs", type=int, default=5, help="--startup: median of this many runs")
    args = p.parse_args()
    args.prompt = args.prompt or (STARTUP_PROMPT if args.startup else PROMPT)
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    if min(args.clients) < 1 or args.requests < 1 or args.max_new_tokens < 1:
        p.error("--clients, --requests and --max-new-tokens must be at least 1")
    (startup if args.startup else concurrency)(args)


if __name__ == "__main__":
    main()
