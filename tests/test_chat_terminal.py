"""infer.py's chat at a terminal: its commands, and line editing through readline in a real pty."""

import os
import pty
import select
import signal
import sys

import pytest
from conftest import ROOT, script_env

import infer
from t5dialog import generation
from t5dialog.models import GENERATION_DEFAULTS


def chat_with(loaded, monkeypatch, lines: list[str]) -> list[str]:
    """Type ``lines`` into the chat; the messages the model was asked about."""
    asked = []
    monkeypatch.setattr(infer, "stream_response", lambda text, *args, **kw: asked.append(text) or iter(["Fine ."]))
    typed = iter(lines)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    model, tokenizer = loaded
    infer.chat(model, tokenizer, "cpu", 64, {})
    return asked


def test_help_lists_the_commands_and_is_not_sent(loaded, monkeypatch, capsys):
    asked = chat_with(loaded, monkeypatch, ["/help", "/?", "Hi .", "/quit"])
    err = capsys.readouterr().err
    assert asked == ["Hi ."]
    assert err.count(infer.HELP) == 2
    for words in ("/reset", "/quit", "/help", "Ctrl-C", "Ctrl-D"):
        assert words in infer.HELP


def test_an_unknown_command_is_named_and_not_sent(loaded, monkeypatch, capsys):
    asked = chat_with(loaded, monkeypatch, ["/rest now", "Hi .", "/quit"])
    err_lines = capsys.readouterr().err.splitlines()
    assert asked == ["Hi ."]
    assert "unknown command /rest; /help lists them" in err_lines


def read_until(fd, transcript: bytearray, marker: bytes, after: int = 0):
    """Read the terminal into ``transcript`` until ``marker`` shows past ``after``; where it starts."""
    while (found := transcript.find(marker, after)) < 0:
        ready, _, _ = select.select([fd], [], [], 120)
        assert ready, f"infer.py printed no {marker!r}; so far: {bytes(transcript)!r}"
        chunk = os.read(fd, 4096)  # OSError (EIO) when it ended early: the assertion's traceback says so
        transcript += chunk
    return found


def next_reply(fd, transcript: bytearray, after: int) -> tuple[str, int]:
    """The text of the next ``bot> `` line past ``after``, and where that line ends."""
    start = read_until(fd, transcript, b"bot> ", after) + len(b"bot> ")
    end = read_until(fd, transcript, b"\r\n", start)
    return transcript[start:end].decode(), end


LEFT, UP = b"\x1b[D", b"\x1b[A"  # the arrow keys as a terminal sends them
TYPED = b"there ." + LEFT * 7 + b"Hello \r"  # "Hello there ." once readline moved the cursor to the start


@pytest.mark.slow
def test_arrow_keys_edit_the_line_and_up_recalls_the_last_message(tiny_model, loaded):
    model, tokenizer = loaded
    options = {**GENERATION_DEFAULTS, "max_new_tokens": 12}

    def expected(text, history=()):  # infer.py reads 512 tokens of a checkpoint without a run config
        return generation.generate_response(text, model, tokenizer, "cpu", history=list(history), max_length=512,
                                            **options)

    pid, fd = pty.fork()  # a real terminal: chat mode, with readline
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "infer.py", "--checkpoint", str(tiny_model), "--max-new-tokens", "12"],
                  script_env())
    transcript = bytearray()
    try:
        read_until(fd, transcript, b"you> ")
        os.write(fd, TYPED)
        first, end = next_reply(fd, transcript, 0)
        read_until(fd, transcript, b"you> ", end)
        os.write(fd, UP + b"\r")  # the same message again, now after the first turn
        second, end = next_reply(fd, transcript, end)
        read_until(fd, transcript, b"you> ", end)
        os.write(fd, b"\x04")  # Ctrl-D leaves
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, transcript.decode(errors="replace")
    # The tiny model's replies tell these apart: the line as edited, as first typed, and with the arrows left in it.
    unedited = {expected("there ."), expected(TYPED.decode().strip())}
    assert first == expected("Hello there .") and first not in unedited
    assert second == expected("Hello there .", ["Hello there .", first]) and second != first
