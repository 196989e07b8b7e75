"""infer.py as users run it: one-shot, piped, chat, and its errors."""

import json
import shutil

import pytest
import torch
from conftest import assert_user_error, run_cli

import infer


@pytest.fixture(scope="module")
def loaded(tiny_model):
    model, tokenizer = infer.load(tiny_model, torch.device("cpu"))
    return model, tokenizer


def test_one_shot_prints_only_the_response_on_stdout(tiny_model):
    result = run_cli("infer.py", "--checkpoint", tiny_model, "How are you?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip()


def test_piped_input_gives_one_response_per_line(tiny_model):
    result = run_cli("infer.py", "--checkpoint", tiny_model, "--max-new-tokens", "6", input="Hello there .\n\nWhat time is it ?\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 3 and lines[0] and lines[1] == "" and lines[2]
    assert "line 2 is empty" in result.stderr


def test_default_checkpoint_is_the_best_else_the_latest(tiny_model, tmp_path):
    out = tmp_path / "checkpoints"
    for name in ("checkpoint-00000004", "checkpoint-00000008"):
        shutil.copytree(tiny_model, out / name)
    assert infer.find_checkpoint(None, out) == out / "checkpoint-00000008"  # no index: newest
    (out / "checkpoints.json").write_text(json.dumps({"latest": "checkpoint-00000008", "best": "checkpoint-00000004"}))
    assert infer.find_checkpoint(None, out) == out / "checkpoint-00000004"
    assert infer.find_checkpoint(str(out)) == out / "checkpoint-00000004"  # --checkpoint may name the output dir


def test_generate_response_uses_history_and_the_decoding_options(loaded):
    model, tokenizer = loaded
    kw = dict(max_new_tokens=5)
    a = infer.generate_response("How are you ?", model, tokenizer, "cpu", **kw)
    assert isinstance(a, str)
    # Greedy decoding is deterministic; sampling with a seed is reproducible.
    assert a == infer.generate_response("How are you ?", model, tokenizer, "cpu", **kw)
    torch.manual_seed(1)
    s1 = infer.generate_response("How are you ?", model, tokenizer, "cpu", do_sample=True, top_k=0, **kw)
    torch.manual_seed(1)
    assert s1 == infer.generate_response("How are you ?", model, tokenizer, "cpu", do_sample=True, top_k=0, **kw)
    # The default is 64 new tokens, not the library's 20.
    long = infer.generate_response("How are you ?", model, tokenizer, "cpu", no_repeat_ngram_size=0)
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(ids) > 20 or not long  # a random model rarely stops early


def test_a_100k_character_prompt_is_truncated_and_answered(tiny_model):
    prompt = "blah " * 20_000 + "How are you ?"
    result = run_cli("infer.py", "--checkpoint", tiny_model, "--max-new-tokens", "4", prompt)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_chat_keeps_history_and_resets(loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    seen = []
    real = infer.generate_response

    def spy(text, *args, history=None, **kw):  # records what the real function was given
        seen.append(list(history or []))
        return real(text, *args, history=history, **kw)

    monkeypatch.setattr(infer, "generate_response", spy)
    typed = iter(["Hi .", "How are you ?", "/reset", "Bye .", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    infer.chat(model, tokenizer, "cpu", 64, dict(max_new_tokens=3))
    assert [len(h) for h in seen] == [0, 2, 0]  # history grows by (you, bot), /reset clears it
    assert seen[1][0] == "Hi ."
    assert capsys.readouterr().out.count("bot>") == 3


def test_chat_ends_on_eof(loaded, monkeypatch):
    model, tokenizer = loaded

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    infer.chat(model, tokenizer, "cpu", 64, {})  # returns instead of raising


# ---------------------------------------------------------------- errors


def test_error_paths_are_one_line_with_exit_code_2(tiny_model, tmp_path):
    assert_user_error(run_cli("infer.py", "--checkpoint", tmp_path / "nope", "Hi"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("infer.py", "--checkpoint", tmp_path / "empty", "Hi"), "holds no model")
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "   "), "empty prompt")
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "--bogus", "Hi"), "unrecognized")
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "--top-p", "0", "Hi"), "--top-p")


def test_no_checkpoint_at_all_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert infer.main(["Hi"]) == 2
    err = capsys.readouterr().err
    assert "python train.py" in err and len(err.strip().splitlines()) == 1


def test_truncated_safetensors_is_a_one_line_error(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(run_cli("infer.py", "--checkpoint", broken, "Hi"), "broken", "damaged")
