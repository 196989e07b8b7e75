"""Model folders that cannot work are refused in one line by train.py, infer.py and eval.py.

Each broken folder is built here from the tiny T5 of conftest (or a tiny
GPT-2 config): a model saved without its tokenizer, a tokenizer_config.json
with no vocabulary beside it, a truncated model.safetensors, a decoder-only
model. The scripts run in-process through their `main`, as a user's command
line would reach them; the stand-in hub serves repos missing their tokenizer
or with their weights cut short.
"""

import shutil

import pytest
from conftest import TINY_CONFIG, TINY_FLAGS, assert_user_error, run_cli
from hub_server import FakeHub, Repo

import eval as eval_script
import infer
import train
from t5dialog import models

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def copy_model_alone(tiny_model, to):
    """What `model.save_pretrained(to)` writes without `tokenizer.save_pretrained(to)`."""
    to.mkdir()
    for name in MODEL_FILES:
        shutil.copy(tiny_model / name, to)
    return to


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    """name -> (folder, words the one-line error must contain)."""
    root = tmp_path_factory.mktemp("broken")
    no_tokenizer = copy_model_alone(tiny_model, root / "no-tokenizer")

    # A tokenizer_config.json naming T5Tokenizer but no vocabulary: transformers builds a stand-in of special tokens.
    config_only = copy_model_alone(tiny_model, root / "tokenizer-config-only")
    shutil.copy(tiny_model / "tokenizer_config.json", config_only)

    truncated = root / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = root / "gpt2"
    # vocab_size 100 puts GPT-2's default bos/eos (50256) out of range: transformers warns about it on loading.
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)

    return {
        "no-tokenizer": (no_tokenizer, ["no-tokenizer has no tokenizer (none of tokenizer.json, spiece.model, "
                                        "tokenizer_config.json", "tokenizer.save_pretrained(DIR)"]),
        "tokenizer-config-only": (config_only, ["tokenizer-config-only has no tokenizer vocabulary", "makes one up",
                                                "every word into <unk>", "tokenizer.save_pretrained(DIR)"]),
        "truncated": (truncated, ["truncated: model.safetensors is damaged or truncated"]),
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


KINDS = ["no-tokenizer", "tokenizer-config-only", "truncated", "gpt2"]


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


@pytest.mark.parametrize("kind, words", [
    ("no-tokenizer", ["has no tokenizer vocabulary", "every word into <unk>", "tokenizer.save_pretrained(DIR)"]),
    ("truncated", [": model.safetensors is damaged or truncated"]),
])
def test_a_broken_hub_repo_is_refused_and_trains_nothing(kind, words, broken, tiny_model, data_dir, tmp_path):
    # A repo holds what its owner uploaded: no tokenizer, or weights cut short, which only loading them reveals.
    folder = copy_model_alone(tiny_model, tmp_path / "model-alone") if kind == "no-tokenizer" else broken[kind][0]
    repo_id = f"someone/t5-{kind}"
    out = tmp_path / "out"
    with FakeHub({("models", repo_id): Repo.from_folder(folder)}) as hub:
        result = run_cli("train.py", "--model", repo_id, "--train-file", data_dir / "train.txt",
                         "--val-file", data_dir / "validation.txt", "--output-dir", out, *TINY_FLAGS, "--max-steps", "1",
                         env=hub.env(tmp_path / "cache"))
        asked = [path for _, path in hub.requests if repo_id in path]
    assert asked  # the hub was reached, and answered
    if kind == "no-tokenizer":  # refused from its config and tokenizer files, before its weights are fetched
        assert not [path for path in asked if path.endswith("/model.safetensors")], asked
    assert_user_error(result, f"--model {repo_id}", *words)
    assert not out.exists()


def test_a_byte_level_tokenizer_needs_no_vocabulary_file(tiny_model, tmp_path):
    """ByT5's tokenizer is the 256 bytes: tokenizer_config.json alone describes it, and it spells every word."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    folder = tmp_path / "byt5"
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **TINY_CONFIG)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert "vocab.json" not in {p.name for p in folder.iterdir()}
    model, loaded = models.load_pretrained(str(folder))
    assert loaded.decode(loaded("Hello there .").input_ids, skip_special_tokens=True) == "Hello there ."
    models.load_checkpoint(folder)


def test_the_tiny_model_itself_passes_every_check(tiny_model):
    model, tokenizer = models.load_pretrained(str(tiny_model))
    assert len(tokenizer) == 400 and model.config.vocab_size == 400
    model, tokenizer = models.load_checkpoint(tiny_model)
    assert len(tokenizer) == 400


def test_a_base_model_gets_the_decoding_defaults_that_its_checkpoints_carry(tiny_model, tmp_path):
    """A base model's leftover beam settings are unset: save_pretrained refuses a greedy config that keeps them."""
    from transformers import AutoModelForSeq2SeqLM, GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    GenerationConfig(num_beams=4, early_stopping=True, length_penalty=2.0, forced_eos_token_id=1,
                     decoder_start_token_id=0, eos_token_id=1, pad_token_id=0).save_pretrained(base)
    model, _ = models.load_pretrained(str(base))
    model.save_pretrained(tmp_path / "saved")
    saved = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved").generation_config
    assert {k: getattr(saved, k) for k in models.GENERATION_DEFAULTS if k not in models.SAMPLING_ONLY} == {
        k: v for k, v in models.GENERATION_DEFAULTS.items() if k not in models.SAMPLING_ONLY}
    assert (saved.early_stopping, saved.length_penalty) == (None, None)
    assert saved.forced_eos_token_id == 1  # the base model's own settings stay
