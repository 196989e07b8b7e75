"""infer.py as users run it: one-shot, piped, chat, and its errors."""

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_user_error, run_cli, script_env

import infer
from t5dialog import checkpoint as ckpt
from t5dialog import generation
from t5dialog.cli import UserError


@pytest.mark.slow
def test_one_shot_prints_only_the_response_on_stdout(tiny_model):
    result = run_cli("infer.py", "--checkpoint", tiny_model, "How are you?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip()


@pytest.mark.slow
def test_piped_input_gives_one_response_per_line(tiny_model):
    result = run_cli("infer.py", "--checkpoint", tiny_model, "--max-new-tokens", "6",
                     input="Hello there .\n\nWhat time is it ?\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 3 and lines[0] and lines[1] == "" and lines[2]
    assert "line 2 is empty" in result.stderr


def test_default_checkpoint_is_the_best_else_the_latest(tiny_model, tmp_path):
    out = tmp_path / "checkpoints"
    for name in ("checkpoint-00000004", "checkpoint-00000008"):
        shutil.copytree(tiny_model, out / name)
    assert ckpt.choose_checkpoint(None, out) == out / "checkpoint-00000008"  # no index: newest
    (out / "checkpoints.json").write_text(json.dumps({"latest": "checkpoint-00000008", "best": "checkpoint-00000004"}))
    assert ckpt.choose_checkpoint(None, out) == out / "checkpoint-00000004"
    assert ckpt.choose_checkpoint(str(out)) == out / "checkpoint-00000004"  # --checkpoint may name the output dir


def encoder_inputs(model):
    """Record the input ids of every encoder call (one per `generate`) and keep it running."""
    seen = []
    handle = model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    return seen, handle


def test_generate_response_feeds_the_history_to_the_model(loaded):
    model, tokenizer = loaded
    history, text = ["Hello there .", "Hi , can I help you ?"], "What time is it ?"
    with_history = infer.encode_history(tokenizer, history + [text], 64)
    alone = infer.encode_history(tokenizer, [text], 64)
    assert with_history != alone and with_history[-len(alone):] == alone  # the earlier turns come first
    seen, handle = encoder_inputs(model)
    try:
        reply = infer.generate_response(text, model, tokenizer, "cpu", history=history, max_length=64, max_new_tokens=5)
        infer.generate_response(text, model, tokenizer, "cpu", max_length=64, max_new_tokens=5)
    finally:
        handle.remove()
    assert seen == [with_history, alone]  # what the model was given, with and without the history
    assert reply


def test_generate_response_decoding_options(loaded):
    model, tokenizer = loaded
    kw = dict(max_new_tokens=5)
    a = infer.generate_response("How are you ?", model, tokenizer, "cpu")
    assert a  # the default decoding answers with text
    # Greedy decoding is deterministic; sampling with a seed is reproducible.
    assert a == infer.generate_response("How are you ?", model, tokenizer, "cpu")
    torch.manual_seed(1)
    s1 = infer.generate_response("How are you ?", model, tokenizer, "cpu", do_sample=True, top_k=0, **kw)
    torch.manual_seed(1)
    assert s1 == infer.generate_response("How are you ?", model, tokenizer, "cpu", do_sample=True, top_k=0, **kw)
    # The default is 64 new tokens, not the library's 20: with </s> held back, the
    # decoder runs once per new token until the limit stops it.
    steps = []
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        infer.generate_response("How are you ?", model, tokenizer, "cpu", min_new_tokens=64)
    finally:
        handle.remove()
    assert len(steps) == 64


@pytest.mark.slow
def test_a_100k_character_prompt_is_truncated_and_answered(tiny_model):
    prompt = "blah " * 20_000 + "How are you ?"
    result = run_cli("infer.py", "--checkpoint", tiny_model, "--max-new-tokens", "4", prompt)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_chat_keeps_history_and_resets(loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    seen = []
    real = infer.stream_response

    def spy(text, *args, history=None, **kw):  # records what the real function was given
        seen.append(list(history or []))
        return real(text, *args, history=history, **kw)

    monkeypatch.setattr(infer, "stream_response", spy)
    typed = iter(["Hi .", "How are you ?", "/reset", "Bye .", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    infer.chat(model, tokenizer, "cpu", 64, dict(max_new_tokens=3))
    assert [len(h) for h in seen] == [0, 2, 0]  # history grows by (you, bot), /reset clears it
    assert seen[1][0] == "Hi ."
    assert capsys.readouterr().out.count("bot>") == 3


def test_chat_answers_then_ends_on_eof(loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    lines = ["Hello there ."]

    def typed(prompt=""):
        if not lines:
            raise EOFError  # what input() raises at Ctrl-D
        return lines.pop(0)

    monkeypatch.setattr("builtins.input", typed)

    infer.chat(model, tokenizer, "cpu", 64, {})  # returns at Ctrl-D instead of raising
    out = capsys.readouterr().out.splitlines()
    expected = infer.generate_response("Hello there .", model, tokenizer, "cpu", max_length=64)
    assert out == [f"bot> {expected}"]  # one answer, then a clean exit


# ---------------------------------------------------------------- errors


@pytest.mark.slow
def test_error_paths_are_one_line_with_exit_code_2(tiny_model, tmp_path):
    assert_user_error(run_cli("infer.py", "--checkpoint", tmp_path / "nope", "Hi"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("infer.py", "--checkpoint", tmp_path / "empty", "Hi"), "holds no model")
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "   "), "empty prompt")
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "--bogus", "Hi"), "unrecognized")
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "--top-p", "0", "Hi"), "--top-p")


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--repetition-penalty", "nan"),
                                         ("--temperature", "inf"), ("--top-p", "nan")])
def test_a_decoding_flag_that_is_not_a_finite_number_is_one_line(flag, value, capsys):
    """nan reached generate() and ended in a transformers traceback; inf decoded noise with exit 0."""
    with pytest.raises(SystemExit) as e:
        infer.main(["Hi", "--do-sample", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flag in err[0] and f"'{value}' is not a" in err[0], err


def test_a_checkpoint_flag_naming_a_file_says_it_is_a_file(tiny_model, capsys):
    assert infer.main(["--checkpoint", tiny_model / "model.safetensors", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors: a file, not a folder" in err[0], err


@pytest.mark.parametrize("flags, words", [
    (["--do-sample", "--temperature", "1e-320"], ["--temperature 1e-320: must be from 0.001 to 1000"]),  # scores overflow
    (["--do-sample", "--repetition-penalty", "1e-300"], ["--repetition-penalty 1e-300: must be from 0.001 to 1000"]),
    # Past float32's largest number the temperature is inf, and a banned token's score -inf / inf is NaN.
    (["--do-sample", "--temperature", "1e39", "--no-repeat-ngram-size", "1"], ["--temperature 1e+39: must be from 0.001"]),
    (["--do-sample", "--repetition-penalty", "1e39"], ["--repetition-penalty 1e+39: must be from 0.001 to 1000"]),
    (["--num-beams", "1000000000"], ["--num-beams 1000000000: must be from 1 to 1000"]),  # 40 GB asked for at once
    (["--seed", str(2**64)], [f"--seed {2**64}: must be in [0, 2**63)"]),  # more than torch.manual_seed takes
    (["--seed", "-1"], ["--seed -1: must be in [0, 2**63)"]),  # the API's rule
])
def test_decoding_numbers_that_break_generate_are_one_line_errors(tiny_model, capsys, flags, words):
    assert infer.main(["--checkpoint", str(tiny_model), "--max-new-tokens", "4", *flags, "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err)


def test_a_temperature_past_float32_is_one_line_for_piped_lines_too(tiny_model, capsys, monkeypatch):
    read, write = os.pipe()
    os.write(write, b"Hi\nHello there .\n")
    os.close(write)
    with open(read) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert infer.main(["--checkpoint", str(tiny_model), "--do-sample", "--temperature", "1e39",
                           "--no-repeat-ngram-size", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "infer.py: error: --temperature 1e+39: must be from 0.001 to 1000", err


@pytest.mark.parametrize("stream, words", [("stdin", ["standard input is closed", "prompt"]),
                                            ("stdout", ["standard output is closed", "lost"])])
def test_a_closed_stdin_or_stdout_is_a_one_line_error(tiny_model, capsys, monkeypatch, stream, words):
    """`python infer.py <&-` was an AttributeError traceback; `... >&-` answered into nothing with exit code 0."""
    monkeypatch.setattr(sys, stream, None)
    assert infer.main(["--checkpoint", str(tiny_model), *(["Hi"] if stream == "stdout" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_no_checkpoint_at_all_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert infer.main(["Hi"]) == 2
    err = capsys.readouterr().err
    assert "python train.py" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_truncated_safetensors_is_a_one_line_error(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(run_cli("infer.py", "--checkpoint", broken, "Hi"), "broken", "damaged")


# ---------------------------------------------------------------- input that is not UTF-8



@pytest.mark.slow
def test_piped_bytes_that_are_not_utf8_still_get_one_answer_per_line(tiny_model):
    result = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(tiny_model), "--max-new-tokens", "6"],
                            input=b"Hello there .\n\xff\xfe bad\nWhat time is it ?\n", capture_output=True, cwd=ROOT,
                            env=script_env(buffered=True), timeout=300)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err[-2000:]
    assert len(result.stdout.decode().split("\n")[:-1]) == 3  # one answer line per input line, the last one included
    assert result.stdout.decode().split("\n")[2]
    assert "Traceback" not in err and [line for line in err.splitlines() if line.strip()] == [
        "infer.py: line 2 is not valid UTF-8; its undecodable bytes were replaced by U+FFFD"]


def test_a_prompt_with_undecodable_bytes_is_answered(tiny_model, capsys):
    # Python hands `python infer.py $'\xff Hi'` over as a lone surrogate, which the tokenizer refuses.
    assert infer.main(["--checkpoint", tiny_model, "--max-new-tokens", "4", "\udcff Hi"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert infer.as_text("\udcff\udcfe Hi \ud800") == "\ufffd\ufffd Hi \ufffd"


# ---------------------------------------------------------------- a reader that goes away


def closed_pipe():
    """The write end of a pipe whose reader has already gone (``| head -0``, a closed viewer)."""
    read, write = os.pipe()
    os.close(read)
    return write


def assert_quiet_exit(process, err: bytes):
    text = err.decode(errors="replace")
    assert process.returncode == 0, text[-2000:]
    assert "Traceback" not in text and "Exception ignored" not in text and "BrokenPipe" not in text, text


@pytest.mark.slow
def test_one_shot_into_a_closed_pipe_ends_quietly(tiny_model):
    write = closed_pipe()
    p = subprocess.Popen([sys.executable, "infer.py", "--checkpoint", str(tiny_model), "--max-new-tokens", "4", "Hi"],
                         stdout=write, stderr=subprocess.PIPE, cwd=ROOT, env=script_env(buffered=True))
    os.close(write)
    _, err = p.communicate(timeout=300)
    assert_quiet_exit(p, err)


def piped_infer_answered_once(tiny_model) -> subprocess.Popen:
    """`python infer.py` reading piped lines, after its answer to the first one has arrived."""
    p = subprocess.Popen([sys.executable, "infer.py", "--checkpoint", str(tiny_model), "--max-new-tokens", "4"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env=script_env(buffered=True))
    p.stdin.write(b"Hello there .\n")
    p.stdin.flush()
    assert p.stdout.readline()
    return p


@pytest.mark.slow
def test_piped_lines_end_quietly_when_the_reader_leaves(tiny_model):
    # `yes "How are you?" | python infer.py | head -1`: the reader takes one answer and closes the pipe.
    p = piped_infer_answered_once(tiny_model)  # each answer arrives as soon as it is written, even into a pipe
    p.stdout.close()
    p.stdin.write(b"How are you ?\n" * 3)
    p.stdin.close()
    err = p.stderr.read()
    p.wait(timeout=300)
    assert_quiet_exit(p, err)


# ---------------------------------------------------------------- which checkpoint by default


def save(out, step, model, tokenizer):
    return ckpt.save_checkpoint(out, step, model, tokenizer, {"step": step}, {"max_length": 64})


@pytest.fixture
def run_dir(loaded, tmp_path):
    """An output dir as train.py leaves it: checkpoints 2, 4 and 8 with manifests; best 4, latest 8."""
    model, tokenizer = loaded
    out = tmp_path / "checkpoints"
    out.mkdir()
    for step in (2, 4, 8):
        save(out, step, model, tokenizer)
    (out / ckpt.INDEX).write_text(json.dumps({"latest": "checkpoint-00000008", "best": "checkpoint-00000004"}))
    return out


def truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize("index", ["[]", "null", '"x"', "3", "{"])
def test_an_index_that_is_not_a_json_object_is_ignored(run_dir, index, capsys):
    (run_dir / ckpt.INDEX).write_text(index)
    assert ckpt.choose_checkpoint(None, run_dir) == run_dir / "checkpoint-00000008"  # no hint: the newest
    assert infer.main(["--checkpoint", run_dir, "Hi"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_readers_never_fail_while_train_py_prunes_under_them(tiny_model, data_dir, tmp_path):
    """A checkpoint every step and only one kept: readers keep losing their choice to pruning, and must move on."""
    out = tmp_path / "out"
    flags = ["--model", tiny_model, "--train-file", data_dir / "train.txt", "--val-file", data_dir / "validation.txt",
             "--output-dir", out, "--max-length", "64", "--max-target-length", "24", "--max-tokens", "512",
             "--save-every", "1", "--eval-every", "1000", "--keep", "1", "--epochs", "400"]  # killed when done
    writer = subprocess.Popen([sys.executable, "train.py", *map(str, flags)], cwd=ROOT, env=script_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while writer.poll() is None and not (out / ckpt.INDEX).exists():
            time.sleep(0.1)
        loaded_steps = []
        while writer.poll() is None and len(loaded_steps) < 30:
            path, model, _ = generation.find_and_load(str(out), torch.device("cpu"), warn=lambda message: None)
            assert model.config.d_model == 32
            loaded_steps.append(ckpt.step_of(path))
    finally:
        writer.kill()
        stderr = writer.communicate()[1]
    assert len(loaded_steps) == 30, stderr[-2000:]  # the writer was still pruning when the last reader finished
    assert loaded_steps == sorted(loaded_steps) and len(set(loaded_steps)) > 1  # it did prune under the readers


def test_a_damaged_best_checkpoint_is_skipped_for_the_latest(run_dir):
    truncate(run_dir / "checkpoint-00000004")
    said = []
    assert ckpt.choose_checkpoint(None, run_dir, warn=said.append) == run_dir / "checkpoint-00000008"
    assert len(said) == 1 and "checkpoint-00000004" in said[0] and "model.safetensors" in said[0]
    assert "using checkpoint-00000008" in said[0] and "\n" not in said[0]


def test_damaged_best_and_latest_fall_back_to_older_ones_in_one_line(run_dir):
    truncate(run_dir / "checkpoint-00000004")
    (run_dir / "checkpoint-00000008" / "tokenizer.json").unlink()  # a file the manifest lists is gone
    said = []
    assert ckpt.choose_checkpoint(str(run_dir), warn=said.append) == run_dir / "checkpoint-00000002"
    assert len(said) == 1 and "checkpoint-00000004" in said[0] and "tokenizer.json is missing" in said[0]
    for name in ("checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000008"):
        truncate(run_dir / name)
    with pytest.raises(UserError, match="no usable checkpoint"):
        ckpt.choose_checkpoint(str(run_dir))


def test_folders_a_running_train_py_writes_are_never_picked(run_dir, tiny_model):
    # A save in progress (.tmp-*) and a prune in progress (.trash-*) hold complete-looking models,
    # and an index may name them (stale, or edited); only committed checkpoint-* folders count.
    shutil.copytree(tiny_model, run_dir / ".tmp-checkpoint-00000012-4242")
    shutil.copytree(tiny_model, run_dir / ".trash-checkpoint-00000002")
    (run_dir / ckpt.INDEX).write_text(json.dumps({"latest": ".tmp-checkpoint-00000012-4242",
                                                  "best": ".trash-checkpoint-00000002"}))
    assert ckpt.choose_checkpoint(None, run_dir) == run_dir / "checkpoint-00000008"
    with pytest.raises(UserError, match="writing or deleting"):
        ckpt.choose_checkpoint(str(run_dir / ".tmp-checkpoint-00000012-4242"))


def test_the_cli_skips_a_damaged_default_in_one_line_and_refuses_it_when_named(run_dir, monkeypatch, capsys):
    truncate(run_dir / "checkpoint-00000004")
    monkeypatch.chdir(run_dir.parent)  # checkpoints/ is the default output dir
    assert infer.main(["--max-new-tokens", "4", "Hi"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "skipped checkpoint-00000004" in lines[0], lines
    assert infer.main(["--checkpoint", run_dir / "checkpoint-00000004", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-00000004" in err[0] and "does not match" in err[0], err


# ---------------------------------------------------------------- Ctrl-C


@pytest.fixture
def real_ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_reply_cancels_it_and_keeps_the_conversation(loaded, monkeypatch, capsys, real_ctrl_c):
    model, tokenizer = loaded
    typed = iter(["Hello there .", "What time is it ?", "Bye .", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    seen, handle = encoder_inputs(model)
    # Ctrl-C as the terminal sends it, while the model encodes the second message.
    interrupt = model.get_encoder().register_forward_pre_hook(
        lambda *_: os.kill(os.getpid(), signal.SIGINT) if len(seen) == 2 else None)
    try:
        infer.chat(model, tokenizer, "cpu", 64, dict(max_new_tokens=4))
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test run
        pytest.fail("Ctrl-C during a reply left the chat")
    finally:
        handle.remove()
        interrupt.remove()
    out, err = capsys.readouterr()
    replies = [line[len("bot> "):] for line in out.splitlines()]
    assert len(replies) == 2 and "reply cancelled" in err
    # The cancelled turn is not in the conversation; the one before it is.
    assert seen[-1] == infer.encode_history(tokenizer, ["Hello there .", replies[0], "Bye ."], 64)


def read_until(fd, transcript: bytearray, marker: bytes, after: int = 0) -> bool:
    """Read the terminal into ``transcript`` until ``marker`` shows past ``after``; False when it closed first."""
    while transcript.find(marker, after) < 0:
        ready, _, _ = select.select([fd], [], [], 120)
        assert ready, f"infer.py printed no {marker!r}; so far: {bytes(transcript)!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the program ended and closed the terminal
            return False
        if not chunk:
            return False
        transcript += chunk
    return True


def wait_until_reading_the_terminal(pid):
    """Until the program waits for a key under its prompt: in read(0, ...), or in readline's pselect on fd 0.

    A ^C that lands between the prompt and the read is seen by Python only
    after the next key (a person never types that fast; a test does).
    """
    for _ in range(12_000):
        try:
            fields = open(f"/proc/{pid}/syscall").read().split()
        except OSError:
            pytest.skip("needs Linux's /proc/<pid>/syscall to know when the prompt waits for a key")
        # read(0, ...) and pselect6(1, {0}, ...) on x86-64, then arm64
        if fields[:2] in (["0", "0x0"], ["270", "0x1"], ["63", "0x0"], ["72", "0x1"]):
            return
        time.sleep(0.01)
    raise AssertionError("infer.py never waited for input at its prompt")


@pytest.mark.slow
def test_ctrl_c_at_the_chat_prompt_leaves_quietly(tiny_model):
    pid, fd = pty.fork()  # a real terminal: chat mode, and ^C typed there becomes SIGINT
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "infer.py", "--checkpoint", str(tiny_model), "--max-new-tokens", "4"],
                  script_env(buffered=True))
    transcript = bytearray()
    try:
        assert read_until(fd, transcript, b"you> ")
        os.write(fd, b"Hello there .\r")
        assert read_until(fd, transcript, b"bot> ")
        assert read_until(fd, transcript, b"you> ", transcript.index(b"bot> "))  # back at the prompt
        wait_until_reading_the_terminal(pid)
        os.write(fd, b"\x03")
        assert not read_until(fd, transcript, b"you> ", transcript.rindex(b"you> ") + 1)  # it ends, no new prompt
    except BaseException:  # a failed step leaves it waiting at its prompt
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = transcript.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Traceback" not in text and "interrupted" not in text, text


@pytest.mark.slow
def test_ctrl_c_while_answering_piped_lines_is_one_line_and_130(tiny_model):
    p = piped_infer_answered_once(tiny_model)  # inside the program now, waiting for the next line
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130
    assert err.decode().strip().splitlines() == ["infer.py: interrupted"]
