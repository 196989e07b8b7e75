"""generation.stream_response, and the terminal chat that prints with it: pieces as they come, joined the reply."""

import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import infer
from t5dialog import generation
from t5dialog.generation import generate_response, stream_response

CPU = torch.device("cpu")


@pytest.mark.parametrize("options", [dict(max_new_tokens=30), dict(max_new_tokens=30, no_repeat_ngram_size=0),
                                     dict(max_new_tokens=1), dict(max_new_tokens=12, num_beams=3)])
def test_the_pieces_join_to_generate_responses_reply(loaded, options):
    model, tokenizer = loaded
    history = ["Hello there .", "Hi , can I help you ?"]
    pieces = list(stream_response("What time is it ?", model, tokenizer, CPU, history=history, max_length=64, **options))
    assert "".join(pieces) == generate_response("What time is it ?", model, tokenizer, CPU, history=history,
                                                max_length=64, **options)
    assert all(pieces) and (len(pieces) > 1 or options["max_new_tokens"] == 1 or options.get("num_beams", 1) > 1)


def test_closing_the_stream_stops_the_model_at_once(loaded):
    model, tokenizer = loaded
    steps = []
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        pieces = stream_response("Tell me a story .", model, tokenizer, CPU, max_length=64, max_new_tokens=1000)
        next(pieces)
        pieces.close()  # returns once the worker has stopped
        stopped_at = len(steps)
        assert not any(isinstance(t, generation._Worker) and t.is_alive() for t in threading.enumerate())
    finally:
        handle.remove()
    assert stopped_at < 1000 and len(steps) == stopped_at  # stopped early, and nothing ran after close() returned


def test_stop_ends_the_reply_early(loaded):
    model, tokenizer = loaded
    seen = []
    reply = "".join(stream_response("Hi .", model, tokenizer, CPU, max_length=64, max_new_tokens=50,
                                    stop=lambda: seen.append(1) or len(seen) >= 5))
    full = generate_response("Hi .", model, tokenizer, CPU, max_length=64, max_new_tokens=50)
    assert full.startswith(reply) and len(reply) < len(full)


def test_an_error_in_the_model_reaches_the_reader(loaded):
    model, tokenizer = loaded

    def broken(*_):
        raise RuntimeError("out of memory, say")

    handle = model.get_decoder().register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            list(stream_response("Hi .", model, tokenizer, CPU, max_length=64))
    finally:
        handle.remove()


def test_bf16_autocast_reaches_the_worker_thread(loaded):
    model, tokenizer = loaded
    dtypes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            list(stream_response("Hi .", model, tokenizer, CPU, max_length=64, max_new_tokens=3))
    finally:
        handle.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_the_chat_prints_the_reply_while_it_is_written(loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    steps, shown_midway = [], []

    def at_step_20(*_):  # the model pauses here until the terminal shows the start of its reply
        steps.append(1)
        if len(steps) == 20:
            for _ in range(60_000):  # a hang guard, not a deadline
                if len(sys.stdout.getvalue()) > len("bot> "):
                    break
                time.sleep(0.001)
            shown_midway.append(sys.stdout.getvalue())

    handle = model.get_decoder().register_forward_pre_hook(at_step_20)
    typed = iter(["What time is it ?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    try:
        infer.chat(model, tokenizer, CPU, 64, dict(max_new_tokens=40))
    finally:
        handle.remove()
    out = capsys.readouterr().out
    reply = generate_response("What time is it ?", model, tokenizer, CPU, max_length=64, max_new_tokens=40)
    assert out == f"bot> {reply}\n"
    assert shown_midway[0].startswith("bot> ") and len("bot> ") < len(shown_midway[0]) < len(out)  # part of it, early


@settings(max_examples=400)
@given(st.lists(st.text("a: \n", max_size=4), max_size=8), st.lists(st.text("a: \n", min_size=1, max_size=3), max_size=3))
def test_reply_pieces_join_to_the_reply_cut_at_its_first_stop(texts, stops):
    """Whatever the streamer's pieces and the stop strings, what is sent is the final reply, nothing more or less."""
    pieces = generation.ReplyPieces(stops)
    sent = written = ""
    for text in texts:
        if pieces.stopped:  # the server's row stops at the step a stop string comes: nothing more is written
            break
        written += text
        sent += pieces.add(text)
    reply = written.strip()  # what generate_ids gives for the same tokens
    assert sent + pieces.finish(reply) == pieces.final(reply)
