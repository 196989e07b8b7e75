"""Piped input answered in batches: the same replies as one line at a time, in order, and no wait for a lone line."""

import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT, run_cli, script_env
from hypothesis import given, settings
from hypothesis import strategies as st

import infer
from t5dialog.generation import load
from t5dialog.piped import line_batches

CPU = torch.device("cpu")
LINES = [f"{w} , how are you {i} ?" if i % 7 else "What time is it ?" for i, w in
         enumerate(["Hello", "Hi", "Good morning", "Excuse me", "Well"] * 8)]  # 40: a full batch of 32, then 8
LINES[5] = ""  # an empty line is answered with an empty line, in its place


def one_at_a_time(loaded, lines, **options):
    model, tokenizer = loaded
    return [infer.generate_response(t, model, tokenizer, CPU, max_length=64, **options) if t.strip() else "" for t in lines]


def pipe_holding(data: bytes) -> int:
    """The read end of a pipe that already holds ``data`` and whose writer has gone."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return read


def test_line_batches_take_what_is_there_in_order():
    fd = pipe_holding(b"".join(b"line %d\n" % i for i in range(70)) + b"last, no newline")
    try:
        batches = list(line_batches(fd, size=32))
    finally:
        os.close(fd)
    assert [len(b) for b in batches] == [32, 32, 7]
    assert sum(batches, []) == [b"line %d" % i for i in range(70)] + [b"last, no newline"]


@pytest.mark.parametrize("first, rest", [
    (b"Hello there .\n", b"Bye .\n"),
    (b"Hello there .\r", b"\nBye .\r"),  # a CR alone ends the line at once; the LF that then comes ends no second one
], ids=["lf", "cr"])
def test_a_lone_line_in_an_open_pipe_is_a_batch_at_once(first, rest):
    read, write = os.pipe()
    batches = line_batches(read, size=32)
    got = []
    reader = threading.Thread(target=lambda: got.append(next(batches)), daemon=True)
    try:
        os.write(write, first)  # and nothing more for now: the writer keeps the pipe open
        reader.start()
        reader.join(timeout=120)  # a hang guard: a batch that waited for more lines (or for the byte after a CR) never comes
        assert got == [[b"Hello there ."]]
        os.write(write, rest)
        os.close(write)
        assert list(batches) == [[b"Bye ."]]
    finally:
        os.close(read)
        if not got:
            os.close(write)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pieces=st.lists(st.sampled_from([b"a", b"bc", b"\xff", b"\n", b"\r", b"\r\n"]), max_size=16),
       chunk=st.integers(1, 5), size=st.integers(1, 4))
def test_line_batches_split_on_lf_crlf_and_a_lone_cr_wherever_the_reads_cut(pieces, chunk, size):
    # chunk bytes per read: a CRLF is often cut in two, its LF arriving in the next read
    data = b"".join(pieces)
    fd = pipe_holding(data)
    try:
        batches = list(line_batches(fd, size=size, chunk=chunk))
    finally:
        os.close(fd)
    lines = re.split(rb"\r\n|\r|\n", data)  # the whole input at once, as dialogues.split_lines splits a data file
    assert sum(batches, []) == (lines[:-1] if lines[-1] == b"" else lines)  # after a last line end comes no line
    assert all(0 < len(batch) <= size for batch in batches)


def test_a_batch_is_one_generate_call_with_the_replies_of_one_at_a_time(loaded, capsys):
    model, tokenizer = loaded
    calls = []
    handle = model.get_encoder().register_forward_pre_hook(lambda *_: calls.append(1))
    fd = pipe_holding("".join(t + "\n" for t in LINES).encode())
    try:
        infer.answer_lines(line_batches(fd), model, tokenizer, CPU, 64, dict(max_new_tokens=10))
    finally:
        handle.remove()
        os.close(fd)
    out, err = capsys.readouterr()
    assert len(calls) == 2  # 39 prompts (one line is empty) in two generate calls
    assert out.split("\n")[:-1] == one_at_a_time(loaded, LINES, max_new_tokens=10)
    assert err.strip() == "infer.py: line 6 is empty; answered with an empty line"


def test_beam_search_in_a_batch_gives_the_replies_of_one_at_a_time(loaded, capsys):
    model, tokenizer = loaded
    lines = LINES[:12]
    fd = pipe_holding("".join(t + "\n" for t in lines).encode())
    try:
        infer.answer_lines(line_batches(fd), model, tokenizer, CPU, 64, dict(max_new_tokens=8, num_beams=3))
    finally:
        os.close(fd)
    assert capsys.readouterr().out.split("\n")[:-1] == one_at_a_time(loaded, lines, max_new_tokens=8, num_beams=3)


# One added token holding every line break str.splitlines knows, and a tab: what a byte-level tokenizer (BART,
# GPT-2) decodes "\n" and "\r" tokens to, inside a reply.
BREAKS = "Fine\nthanks\r\n,\rand\u2028you\x0b?\x0c\x85\u2029\x1c\x1d\x1e\t."


@pytest.fixture(scope="module")
def breaking_model(tiny_model, tmp_path_factory):
    """tiny_model with BREAKS as one more token, which its generation config makes it write at every step."""
    from transformers import AddedToken

    model, tokenizer = load(tiny_model, CPU)
    tokenizer.add_tokens([AddedToken(BREAKS, normalized=False)])
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.sequence_bias = [[[tokenizer.convert_tokens_to_ids(BREAKS)], 100.0]]
    folder = tmp_path_factory.mktemp("breaking-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_replies_holding_line_breaks_are_one_line_each(breaking_model, monkeypatch, capsys):
    lines = ["Hello there .", "", "What time is it ?"]
    model, tokenizer = load(breaking_model, CPU)
    replies = [infer.generate_response(t, model, tokenizer, CPU, max_length=64, max_new_tokens=3) if t else "" for t in lines]
    assert all(c in replies[0] for c in "\n\r\u2028")  # the model really writes line breaks
    with open(pipe_holding("".join(t + "\n" for t in lines).encode())) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert infer.main(["--checkpoint", str(breaking_model), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(out.splitlines()) == len(lines)  # one line out per line in, and no other break
    assert out.splitlines() == [" ".join(reply.split()) for reply in replies]


@pytest.mark.slow
def test_piped_lines_through_infer_py_are_answered_in_order(tiny_model, loaded):
    result = run_cli("infer.py", "--checkpoint", tiny_model, "--max-new-tokens", "10",
                     input="".join(t + "\n" for t in LINES))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:-1] == one_at_a_time(loaded, LINES, max_new_tokens=10)


@pytest.mark.slow
def test_a_line_typed_into_an_open_pipe_is_answered_before_the_next(tiny_model, loaded):
    p = subprocess.Popen([sys.executable, "infer.py", "--checkpoint", str(tiny_model), "--max-new-tokens", "6"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env=script_env(buffered=True))
    try:
        answers = []
        for line in ("Hello there .", "What time is it ?"):
            p.stdin.write(line.encode() + b"\n")
            p.stdin.flush()
            answers.append(p.stdout.readline().decode().rstrip("\n"))  # stdin stays open: no EOF to wait for
        p.stdin.close()
        assert p.wait(timeout=300) == 0 and p.stdout.read() == b""
    finally:
        if p.poll() is None:
            p.kill()
    assert answers == one_at_a_time(loaded, ["Hello there .", "What time is it ?"], max_new_tokens=6)
