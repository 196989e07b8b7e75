"""train.py end to end, as users run it, on a tiny T5 built by a fixture."""

import json
import os
import stat

import pytest
import torch
from conftest import TINY_FLAGS, assert_user_error, run_cli
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import checkpoint as ckpt
import models
import train
from dataset import DailyDialogDataset, collate


def train_args(model, data, out, *extra):
    return ["train.py", "--model", model, "--train-file", data / "train.txt", "--val-file", data / "validation.txt",
            "--output-dir", out, *TINY_FLAGS, *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpts"
    result = run_cli(*train_args(tiny_model, data_dir, out, "--epochs", "2", "--keep", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_training_writes_loadable_checkpoints_metrics_and_plot(finished_run):
    out, result = finished_run
    index = json.loads((out / "checkpoints.json").read_text())
    latest = out / index["latest"]
    files = {p.name for p in latest.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "training_state.pt", "run_config.json", "manifest.json"} <= files
    # Hugging Face loads the folder as is.
    model = AutoModelForSeq2SeqLM.from_pretrained(latest)
    tokenizer = AutoTokenizer.from_pretrained(latest)
    assert model.config.d_model == 32 and len(tokenizer) == 400
    assert ckpt.verify(latest) is None
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, len(train_rows) + 1))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_rows[0])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    val = [r for r in rows if "val_loss" in r]
    assert len(val) >= 2 and all(r["val_ppl"] > 1 for r in val)
    assert (out / "loss.png").stat().st_size > 1000
    # Retention: the newest (--keep 1) and the best survive, nothing else.
    kept = {p.name for p in ckpt.list_checkpoints(out)}
    assert kept == {index["latest"], index["best"]}
    # What the user sees.
    assert "model.safetensors" not in result.stderr  # no library noise about shards
    for words in ("device: cpu", "parameters", "dialogues", "pairs", "batch token budget", "example 0:", "validation loss"):
        assert words in result.stdout, words


def test_resume_continues_from_the_saved_step(finished_run, tiny_model, data_dir, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "ckpts"
    import shutil

    shutil.copytree(out, copy)
    steps_before = json.loads((copy / "checkpoints.json").read_text())["latest"]
    result = run_cli(*train_args(tiny_model, data_dir, copy, "--resume", "--epochs", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {steps_before}" in result.stdout
    rows = [r for r in metrics(copy) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1))  # no step twice, none missing
    assert steps[-1] > ckpt.step_of(copy / steps_before)


def test_existing_run_is_not_overwritten(finished_run, tiny_model, data_dir):
    out, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = run_cli(*train_args(tiny_model, data_dir, out))
    assert_user_error(result, "--resume", "--output-dir")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_help_documents_every_flag_with_its_default():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    parser = train.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[0] in result.stdout
    assert "(default: 2048)" in result.stdout.replace("\n", " ").replace("  ", " ")


def test_default_model_falls_back_to_scratch_offline_with_a_loud_warning(data_dir, tmp_path):
    empty_cache = tmp_path / "hf"
    result = run_cli("train.py", "--train-file", data_dir / "train.txt", "--output-dir", tmp_path / "out",
                     "--max-steps", "1", "--scratch-vocab-size", "300", *TINY_FLAGS[:6],
                     env={"HF_HOME": str(empty_cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" in result.stdout and "FROM SCRATCH" in result.stdout
    assert (tmp_path / "out" / "checkpoints.json").exists()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, words", [
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "-1e-4"], ["--lr"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--max-steps", "-3"], ["--max-steps"]),
    (["--max-tokens", "0"], ["--max-tokens"]),
    (["--bogus-flag"], ["unrecognized", "--bogus-flag"]),
    (["--epochs", "two"], ["--epochs", "invalid int"]),
])
def test_bad_flags_are_one_line_errors(flags, words, tiny_model, data_dir, tmp_path, capsys):
    code = call_main(train_args(tiny_model, data_dir, tmp_path / "out", *flags)[1:])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err
    assert not (tmp_path / "out").exists()


def call_main(argv):
    try:
        return train.main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits itself
        return e.code


def test_bad_data_files_are_one_line_errors(tiny_model, data_dir, tmp_path):
    cases = {
        "missing.txt": None,
        "empty.txt": b"",
        "binary.bin": bytes(range(256)) * 20,
        "prose.txt": b"Just a normal text file.\nNothing dialogue about it.\n",
        "bad-utf8.txt": b"Hi . __eou__ Hello . __eou__\n" * 5 + b"caf\xe9 . __eou__ ok . __eou__\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        result = run_cli("train.py", "--model", tiny_model, "--train-file", path, "--val-file", data_dir / "validation.txt",
                         "--output-dir", tmp_path / "out", *TINY_FLAGS)
        assert_user_error(result, name)
        if content is not None:
            assert path.read_bytes() == content
    result = run_cli(*train_args(tiny_model, data_dir, tmp_path / "out2")[:5], "--val-file", tmp_path / "nope.txt",
                     "--output-dir", tmp_path / "out2", *TINY_FLAGS)
    assert_user_error(result, "nope.txt", "not found")


def test_output_dir_problems_are_one_line_errors(tiny_model, data_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert call_main(train_args(tiny_model, data_dir, a_file)[1:]) == 2
    assert "existing file" in capsys.readouterr().err and a_file.read_text() == "keep me"

    assert call_main(train_args(tiny_model, data_dir, tmp_path / "empty", "--resume")[1:]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert call_main(train_args(tiny_model, data_dir, locked / "out")[1:]) == 2
        assert "not writable" in capsys.readouterr().err


def test_named_model_that_cannot_be_loaded_is_an_error_not_a_fallback(data_dir, tmp_path, capsys):
    assert call_main(train_args(tmp_path / "no-such-model", data_dir, tmp_path / "out")[1:]) == 2
    err = capsys.readouterr().err
    assert "cannot load --model" in err and "Traceback" not in err


def test_resume_with_a_different_model_is_refused(finished_run, tmp_path, data_dir, capsys):
    out, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert call_main(train_args("scratch", data_dir, out, "--resume")[1:]) == 2
    assert "--model cannot change on --resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_warmup_then_linear_schedule():
    assert [round(train.lr_factor(s, warmup_steps=4, total_steps=12), 3) for s in range(13)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


def _tiny_examples(tiny_model, data_dir, n):
    """The tiny model (eval mode), its tokenizer and the first n training examples."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = DailyDialogDataset(tok, data_dir / "train.txt", max_length=64)
    return AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval(), tok, [ds[i] for i in range(n)]


def test_loss_is_the_same_for_one_big_batch_and_accumulated_halves(tiny_model, data_dir):
    """Token-normalised accumulation gives the gradient of the whole batch."""
    model, tok, examples = _tiny_examples(tiny_model, data_dir, 8)
    whole = collate(examples, tok.pad_token_id)
    tokens = (whole["labels"] != -100).sum()
    (models.token_loss_sum(model, whole) / tokens).backward()
    g_whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (examples[:3], examples[3:]):
        (models.token_loss_sum(model, collate(part, tok.pad_token_id)) / tokens).backward()
    for a, p in zip(g_whole, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_loss_on_dynamic_padding_equals_the_seed_recipe_padded_to_512(tiny_model, data_dir):
    """Bucketed batches pad to their own longest example; padding to 512 must not change the loss."""
    model, tok, examples = _tiny_examples(tiny_model, data_dir, 6)
    dynamic = collate(examples, tok.pad_token_id)
    seed_style = {k: torch.nn.functional.pad(v, (0, 512 - v.size(1)), value=-100 if k == "labels" else 0 if k == "attention_mask"
                                               else tok.pad_token_id) for k, v in dynamic.items()}
    assert seed_style["input_ids"].shape == (6, 512) and dynamic["input_ids"].size(1) <= 64
    with torch.no_grad():
        torch.testing.assert_close(models.token_loss_sum(model, dynamic), models.token_loss_sum(model, seed_style), rtol=1e-5, atol=1e-4)
