"""Model folders that cannot work are refused in one line by train.py, infer.py and eval.py.

The broken folder is built here from a tiny GPT-2 config: a decoder-only
model. The scripts run in-process through their `main`, as a user's command
line would reach them.
"""

import pytest
from conftest import TINY_FLAGS, assert_user_error, run_cli

import eval as eval_script
import infer
import models
import train


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    """name -> (folder, words the one-line error must contain)."""
    root = tmp_path_factory.mktemp("broken")

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = root / "gpt2"
    # vocab_size 100 puts GPT-2's default bos/eos (50256) out of range: transformers warns about it on loading.
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)

    return {
        "gpt2": (gpt2, ["gpt2 is not an encoder-decoder model (GPT2Config)", "t5-small", "seq2seq"]),
    }


def one_line(capsys, *words):
    """What assert_user_error checks of a subprocess, for a script run in-process."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def call(main, argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits itself
        return e.code


KINDS = ["gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_refuses_a_broken_model_folder_before_creating_the_output_dir(kind, broken, data_dir, tmp_path, capsys):
    folder, words = broken[kind]
    out = tmp_path / "out"
    argv = ["--model", folder, "--train-file", data_dir / "train.txt", "--val-file", data_dir / "validation.txt",
            "--output-dir", out, *TINY_FLAGS, "--max-steps", "1"]
    assert call(train.main, argv) == 2
    line = one_line(capsys, *words)
    assert line.startswith(f"train.py: error: --model {folder}"), line
    assert not out.exists()


def test_a_decoder_only_model_is_one_line_in_a_fresh_process(broken, data_dir, tmp_path):
    # transformers warns once per process about the tiny GPT-2's out-of-range token ids; in-process the
    # fixture that built it already had that warning, so only a new process shows whether it reaches the user.
    folder, words = broken["gpt2"]
    out = tmp_path / "out"
    result = run_cli("train.py", "--model", folder, "--train-file", data_dir / "train.txt", "--val-file",
                     data_dir / "validation.txt", "--output-dir", out, *TINY_FLAGS)
    assert_user_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("script", ["infer", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_infer_and_eval_refuse_a_broken_checkpoint(kind, script, broken, data_dir, tmp_path, capsys):
    folder, words = broken[kind]
    before = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "eval"
    if script == "infer":
        assert call(infer.main, ["--checkpoint", folder, "Hi there"]) == 2
    else:
        assert call(eval_script.main, ["--checkpoint", folder, "--data", data_dir / "validation.txt", "--out", out]) == 2
    line = one_line(capsys, *words)
    assert line.startswith(f"{script}.py: error: checkpoint {folder}"), line
    assert not out.exists() and sorted(p.name for p in folder.iterdir()) == before


def test_the_tiny_model_itself_passes_every_check(tiny_model):
    model, tokenizer = models.load_pretrained(str(tiny_model))
    assert len(tokenizer) == 400 and model.config.vocab_size == 400
    model, tokenizer = models.load_checkpoint(tiny_model)
    assert len(tokenizer) == 400
