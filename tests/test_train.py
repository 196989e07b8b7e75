"""train.py end to end, as users run it, on a tiny T5 built by a fixture."""

import json
import math
import os
import re
import shutil
import stat

import pytest
import torch
from conftest import TINY_FLAGS, assert_user_error, run_cli, train_argv
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import train
from dataset import DailyDialogDataset, collate
from t5dialog import checkpoint as ckpt
from t5dialog import flags, models, plan




def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpts"
    result = run_cli("train.py", *train_argv(tiny_model, data_dir, out, "--epochs", "2", "--keep", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(finished_run, tiny_model, data_dir, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "ckpts"
    shutil.copytree(out, copy)
    steps_before = json.loads((copy / "checkpoints.json").read_text())["latest"]
    result = run_cli("train.py", *train_argv(tiny_model, data_dir, copy, "--resume", "--epochs", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {steps_before}" in result.stdout
    rows = [r for r in metrics(copy) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1))  # no step twice, none missing
    assert steps[-1] > ckpt.step_of(copy / steps_before)


@pytest.mark.slow
def test_existing_run_is_not_overwritten(finished_run, tiny_model, data_dir):
    out, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = run_cli("train.py", *train_argv(tiny_model, data_dir, out))
    assert_user_error(result, "--resume", "--output-dir")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.slow
def test_help_documents_every_flag_with_its_default():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    entries = re.split(r"\n  (?=-)", result.stdout.split("\noptions:", 1)[1])[1:]  # one per flag, as printed
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}  # help wraps lines: single spaces
    actions = [a for a in flags.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) == len(vars(flags.build_parser().parse_args([])))  # every flag is an option here
    for action in actions:
        flag = action.option_strings[0]
        assert f"(default: {action.default})" in entries[flag], f"{flag}: {entries[flag]}"
    assert "N is the last step's number whatever the world size or --grad-accum" in entries["--max-steps"]  # its rule


@pytest.mark.slow
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
    (["--device", "mps"], ["--device mps", "cpu"]),
    (["--device", "xpu"], ["--device xpu", "cpu"]),
    (["--device", "meta"], ["--device meta", "cpu"]),
    (["--device", "gpu7"], ["--device gpu7"]),
    (["--scratch-vocab-size", "3"], ["--scratch-vocab-size", "at least"]),
    (["--scratch-vocab-size", "0"], ["--scratch-vocab-size", "at least"]),
    (["--scratch-vocab-size", "-5"], ["--scratch-vocab-size", "at least"]),
    (["--precision", "fp16"], ["--precision fp16", "bf16"]),
    (["--precision", "fp8"], ["--precision fp8"]),
    (["--val-share", "0"], ["--val-share", "between 0 and 1"]),
    (["--val-share", "1.5"], ["--val-share"]),
    # nan and inf passed the range checks and failed a step later, blaming --lr: refused when parsed
    (["--lr", "inf"], ["--lr", "'inf' is not a finite number"]),
    (["--weight-decay", "nan"], ["--weight-decay", "'nan' is not a number"]),
    (["--warmup-ratio=-inf"], ["--warmup-ratio", "not a finite number"]),
    (["--max-grad-norm", "nan"], ["--max-grad-norm", "not a number"]),
    (["--output-dir", ""], ["--output-dir", "empty"]),
    (["--seed", str(2**64)], ["--seed", "out of range"]),  # torch.manual_seed's traceback
])
def test_bad_flags_are_one_line_errors(flags, words, tiny_model, data_dir, tmp_path, capsys):
    code = call_main(train_argv(tiny_model, data_dir, tmp_path / "out", *flags))
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


@pytest.mark.slow
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
    result = run_cli("train.py", *train_argv(tiny_model, data_dir, tmp_path / "out2")[:4], "--val-file", tmp_path / "nope.txt",
                     "--output-dir", tmp_path / "out2", *TINY_FLAGS)
    assert_user_error(result, "nope.txt", "not found")


def test_output_dir_problems_are_one_line_errors(tiny_model, data_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert call_main(train_argv(tiny_model, data_dir, a_file)) == 2
    assert "existing file" in capsys.readouterr().err and a_file.read_text() == "keep me"

    assert call_main(train_argv(tiny_model, data_dir, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err

    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")  # was "not writable (File exists)"
    assert call_main(train_argv(tiny_model, data_dir, dangling)) == 2
    assert "symlink to" in capsys.readouterr().err and dangling.is_symlink() and not (tmp_path / "gone").exists()

    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert call_main(train_argv(tiny_model, data_dir, locked / "out")) == 2
        assert "not writable" in capsys.readouterr().err


def test_a_refused_run_creates_nothing(tiny_model, data_dir, tmp_path, capsys):
    """Whatever refuses a run (a flag, the model, the data, the output dir) refuses it before any file is made."""
    new = tmp_path / "new"
    assert call_main(train_argv(tiny_model, data_dir, new, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err and not new.exists()

    assert call_main(train_argv(tmp_path / "no-such-model", data_dir, new)) == 2
    assert "cannot load --model" in capsys.readouterr().err and not new.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert call_main(train_argv(tiny_model, data_dir, empty, "--lr", "0")) == 2
    assert "--lr" in capsys.readouterr().err and list(empty.iterdir()) == []

    committed = tmp_path / "run" / "checkpoint-00000010"  # a checkpoint given where its output dir belongs
    committed.mkdir(parents=True)
    (committed / "config.json").write_text("{}")
    for extra in ([], ["--resume"]):
        assert call_main(train_argv(tiny_model, data_dir, committed, *extra)) == 2
        err = capsys.readouterr().err
        assert "is a checkpoint, not an output dir" in err and str(committed.parent.resolve()) in err
        assert [p.name for p in committed.iterdir()] == ["config.json"]  # no train.lock written into it


def test_a_validation_file_that_is_the_training_file_is_refused(tiny_model, data_dir, tmp_path, capsys):
    argv = train_argv(tiny_model, data_dir, tmp_path / "out")
    argv[argv.index("--val-file") + 1] = data_dir / "train.txt"
    assert call_main(argv) == 2
    err = capsys.readouterr().err
    assert "--val-file is the training file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_named_model_that_cannot_be_loaded_is_an_error_not_a_fallback(data_dir, tmp_path, capsys):
    assert call_main(train_argv(tmp_path / "no-such-model", data_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot load --model" in err and "Traceback" not in err


@pytest.mark.slow
def test_resume_with_a_different_model_is_refused(finished_run, tmp_path, data_dir, capsys):
    out, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert call_main(train_argv("scratch", data_dir, out, "--resume")) == 2
    assert "--model cannot change on --resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_warmup_then_linear_schedule():
    assert [round(plan.lr_factor(s, warmup_steps=4, total_steps=12), 3) for s in range(13)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


def _tiny_examples(tiny_model, data_dir, n):
    """The tiny model (eval mode), its tokenizer and the first n training examples."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = DailyDialogDataset(tok, data_dir / "train.txt", max_length=64)
    return AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval(), tok, ds.examples[:n]


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
    for a, p in zip(g_whole, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_loss_on_dynamic_padding_equals_the_seed_recipe_padded_to_512(tiny_model, data_dir):
    """Bucketed batches pad to their own longest example; padding to 512 must not change the loss."""
    model, tok, examples = _tiny_examples(tiny_model, data_dir, 6)
    dynamic = collate(examples, tok.pad_token_id)
    seed_style = {k: torch.nn.functional.pad(v, (0, 512 - v.size(1)), value=-100 if k == "labels" else 0 if k == "attention_mask"
                                               else tok.pad_token_id) for k, v in dynamic.items()}
    assert seed_style["input_ids"].shape == (6, 512) and dynamic["input_ids"].size(1) <= 64
    with torch.no_grad():
        torch.testing.assert_close(models.token_loss_sum(model, dynamic), models.token_loss_sum(model, seed_style),
                                   rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- in-process runs: what a run records and how it resumes


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq) do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def train_rows(out):
    return [r for r in metrics(out) if "loss" in r]


def snapshot(out):
    """Every file's bytes and mtime: a refused command must leave all of them as they were."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def latest(out):
    return out / json.loads((out / "checkpoints.json").read_text())["latest"]


def one_error_line(capsys) -> str:
    """The one line of an error; a progress bar before it (its own line, redrawn with \\r) is allowed."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and not line.lstrip("\r").startswith("training:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and "Traceback" not in err, err
    return lines[0]


def test_the_final_validation_counts_for_the_best_checkpoint(tiny_model, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert call_main(train_argv(tiny_model, data_dir, out, "--max-steps", "6", "--save-every", "3",
                                "--eval-every", "1000")) == 0
    index = strict_json((out / "checkpoints.json").read_text())
    assert index["best"] == "checkpoint-00000006" and index["latest"] == "checkpoint-00000006"
    assert isinstance(index["best_val_loss"], float) and math.isfinite(index["best_val_loss"])
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "None" not in done[0] and f"{index['best_val_loss']:.4f}" in done[0]


@pytest.fixture(scope="module")
def ten_steps(tiny_model, data_dir, tmp_path_factory):
    """A --max-steps 10 run with checkpoints at 5 and 10; tests resume copies of it."""
    out = tmp_path_factory.mktemp("ten-steps") / "ckpts"
    assert call_main(train_argv(tiny_model, data_dir, out, "--max-steps", "10", "--eval-every", "5", "--save-every", "5")) == 0
    return out


@pytest.fixture
def ten_copy(ten_steps, tmp_path):
    copy = tmp_path / "ckpts"
    shutil.copytree(ten_steps, copy)
    return copy


def png_title(path) -> str:
    """The title drawn above the curves, which the PNG also keeps as text."""
    from PIL import Image

    with Image.open(path) as image:
        return image.text["Title"]


def test_loss_png_is_titled_with_the_run_its_model_and_its_data(ten_steps, tiny_model, data_dir):
    run, about = png_title(ten_steps / "loss.png").splitlines()
    assert run == "run ckpts"
    assert about == (f"model {tiny_model.parent.name}/{tiny_model.name}, trained on {data_dir.name}/train.txt, "
                     f"validated on {data_dir.name}/validation.txt")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_and_folder_of_a_run_gets_the_mode_the_umask_gives(umask, tiny_model, data_dir, tmp_path):
    """Under umask 022 others on the machine can load the checkpoint (safetensors alone made its weights 0600);
    under 077 nothing is opened to them."""
    out = tmp_path / "out"
    before = os.umask(umask)
    try:
        assert call_main(train_argv(tiny_model, data_dir, out, "--max-steps", "2", "--eval-every", "2",
                                    "--save-every", "2")) == 0
    finally:
        os.umask(before)
    modes = {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in (out, *out.rglob("*"))}
    assert {"checkpoint-00000002/model.safetensors", "checkpoints.json", "metrics.jsonl", "loss.png"} <= set(modes)
    assert modes == {name: oct((0o777 if (out / name).is_dir() else 0o666) & ~umask) for name in modes}


def test_an_lr_typed_with_resume_sets_the_schedule_from_there(ten_copy):
    assert call_main(["--resume", "--output-dir", ten_copy, "--max-steps", "13", "--lr", "0.1"]) == 0
    rows = {r["step"]: r for r in train_rows(ten_copy)}
    assert sorted(rows) == list(range(1, 14))
    # 13 steps, no warmup step (int(0.05 * 13) = 0): step s runs at 0.1 * (13 - (s - 1)) / 13.
    assert [rows[s]["lr"] for s in (11, 12, 13)] == pytest.approx([0.1 * 3 / 13, 0.1 * 2 / 13, 0.1 * 1 / 13])
    assert rows[10]["lr"] == pytest.approx(5e-4 * 1 / 10)  # the first 10 steps keep their own record
    end = ckpt.load_training_state(latest(ten_copy))
    assert end["step"] == 13
    # The optimizer really ran at that rate, not only the log.
    assert [g["lr"] for g in end["optimizer"]["param_groups"]] == pytest.approx([0.1 / 13] * 2)
    config = strict_json((latest(ten_copy) / ckpt.RUN_CONFIG).read_text())
    assert config["lr"] == 0.1 and config["max_steps"] == 13


@pytest.mark.parametrize("epochs", [2, 3])  # 3: the default, and the value the run recorded
def test_epochs_typed_with_resume_replace_the_recorded_max_steps(epochs, ten_copy):
    assert call_main(["--resume", "--output-dir", ten_copy, "--epochs", str(epochs)]) == 0
    end = ckpt.load_training_state(latest(ten_copy))
    assert end["epoch"] == epochs and end["batch"] == 0  # stopped at the end of the last epoch, not at step 10
    config = strict_json((latest(ten_copy) / ckpt.RUN_CONFIG).read_text())
    assert config["max_steps"] is None and config["epochs"] == epochs
    steps = [r["step"] for r in train_rows(ten_copy)]
    assert steps == list(range(1, end["step"] + 1)) and end["step"] > 20 * (epochs - 1)  # 20 steps an epoch


@pytest.mark.parametrize("start, typed, end", [
    (10, ["--max-steps", "20"], 20),
    (5, [], 10),  # the recorded --max-steps 10
    (5, ["--max-steps", "10"], 10),  # the recorded value typed again
])
def test_max_steps_is_the_last_step_number_whatever_the_grad_accum(start, typed, end, ten_copy):
    """The 10-step run (1 batch a step) resumed with 2 batches a step ends at step number --max-steps, and its
    learning rate decays to 0 over the same step numbers."""
    for path in ckpt.list_checkpoints(ten_copy):
        if ckpt.step_of(path) > start:
            shutil.rmtree(path)
    assert call_main(["--resume", "--output-dir", ten_copy, "--grad-accum", "2", *typed]) == 0
    assert latest(ten_copy).name == ckpt.checkpoint_name(end) and ckpt.verify(latest(ten_copy)) is None
    rows = {r["step"]: r for r in train_rows(ten_copy)}
    assert [r["step"] for r in train_rows(ten_copy)] == list(range(1, end + 1))  # no gap, no step twice
    warmup = int(0.05 * end)
    assert [rows[s]["lr"] for s in range(start + 1, end + 1)] == pytest.approx(
        [5e-4 * plan.lr_factor(s - 1, warmup, end) for s in range(start + 1, end + 1)])
    state = ckpt.load_training_state(latest(ten_copy))
    assert (state["step"], state["batches_per_step"]) == (end, 2)
    assert state["epoch"] * 20 + state["batch"] == start + 2 * (end - start)  # every batch once: none skipped


def test_resume_with_max_steps_already_reached_changes_nothing(ten_copy, capsys):
    before = snapshot(ten_copy)
    assert call_main(["--resume", "--output-dir", ten_copy, "--max-steps", "5"]) == 2
    line = one_error_line(capsys)
    assert "already at step 10" in line and "--max-steps" in line
    assert snapshot(ten_copy) == before
    assert [r["step"] for r in metrics(ten_copy) if "val_loss" in r] == [5, 10]  # no validation row twice


@pytest.mark.parametrize("flag, value, why", [
    ("--seed", "7", "data order"),
    ("--scratch-vocab-size", "300", "tokenizer"),
    ("--train-file", "other.txt", "data plan"),
    ("--val-share", "0.3", "held out"),
])
def test_flags_fixed_for_a_run_are_refused_on_resume(flag, value, why, ten_copy, data_dir, capsys):
    if flag == "--train-file":
        value = ten_copy.parent / value
        value.write_text((data_dir / "train.txt").read_text())  # a real file; only its name differs
    before = snapshot(ten_copy)
    assert call_main(["--resume", "--output-dir", ten_copy, "--max-steps", "12", flag, value]) == 2
    line = one_error_line(capsys)
    assert f"{flag} cannot change on --resume" in line and why in line
    assert snapshot(ten_copy) == before


def test_typing_the_recorded_value_again_is_accepted(ten_copy, data_dir, tiny_model, monkeypatch):
    monkeypatch.chdir(data_dir)  # the training file typed relative to another folder, still the same file
    model = os.path.relpath(tiny_model, data_dir) + "/"  # and the model folder spelled another way: it was refused
    assert call_main(["--resume", "--output-dir", ten_copy, "--max-steps", "11", "--seed", "42",
                      "--train-file", "train.txt", "--scratch-vocab-size", "8000", "--model", model]) == 0
    assert ckpt.load_training_state(latest(ten_copy))["step"] == 11


def epoch_args(model, data, out, *extra):
    """One epoch (20 steps of the tiny data at --max-tokens 512), every step's examples logged."""
    return train_argv(model, data, out, "--epochs", "1", "--log-examples", "--eval-every", "100", "--save-every", "100",
                      *extra)


def test_resume_with_another_grad_accum_keeps_the_lr_at_each_point_of_the_data(tiny_model, data_dir, tmp_path,
                                                                                  monkeypatch):
    # A warmup of 10%: 2 steps of 1 batch, or 1 step of 2, so the same batches warm up either way.
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert call_main(epoch_args(tiny_model, data_dir, straight, "--warmup-ratio", "0.1")) == 0
    monkeypatch.setenv("FAULT", "term:mid_step@8")
    assert call_main(epoch_args(tiny_model, data_dir, out, "--warmup-ratio", "0.1")) == 143
    monkeypatch.delenv("FAULT")
    assert call_main(["--resume", "--output-dir", out, "--grad-accum", "2"]) == 0
    ref = {r["step"]: r for r in train_rows(straight)}
    assert sorted(ref) == list(range(1, 21))
    # Step numbers go on from 8, two batches a step; the schedule counts those 8 steps as 4 of two batches,
    # so each resumed step runs at the rate the straight run gave its first batch. The log keeps the 8 rows
    # written before the stop (they happened), then the resumed run's rows.
    rows = train_rows(out)
    assert [(r["step"], r["examples"], r["loss"]) for r in rows[:8]] == [
        (r["step"], r["examples"], r["loss"]) for r in train_rows(straight)[:8]]
    resumed = rows[8:]
    assert [r["step"] for r in resumed] == list(range(9, 15))
    for row in resumed:
        first, second = ref[2 * row["step"] - 9], ref[2 * row["step"] - 8]
        assert row["examples"] == first["examples"] + second["examples"]  # the same data, in order
        assert row["lr"] == pytest.approx(first["lr"], rel=1e-9)  # at the rate the straight run gave it
    end = ckpt.load_training_state(latest(out))
    assert (end["step"], end["epoch"], end["batch"]) == (14, 1, 0)  # the same end of data: one epoch


def test_resumes_with_another_step_size_never_skip_a_batch_or_go_back(tiny_model, data_dir, tmp_path, monkeypatch):
    """Stop at an odd step, resume with --grad-accum 2, stop, resume with 1 again: every example of the
    epoch exactly once, step numbers only go up, and each --resume takes the checkpoint saved last."""
    out = tmp_path / "out"
    monkeypatch.setenv("FAULT", "term:mid_step@9")
    assert call_main(epoch_args(tiny_model, data_dir, out)) == 143
    monkeypatch.setenv("FAULT", "term:mid_step@12")
    assert call_main(["--resume", "--output-dir", out, "--grad-accum", "2"]) == 143
    monkeypatch.delenv("FAULT")
    assert call_main(["--resume", "--output-dir", out, "--grad-accum", "1"]) == 0
    rows = train_rows(out)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))  # each step once, in order
    seen = [i for r in rows for i in r["examples"]]
    assert sorted(seen) == list(range(127))  # the tiny data's 127 pairs, each exactly once
    assert [len(r["examples"]) > 0 for r in rows].count(True) == len(rows)
    assert ckpt.load_training_state(latest(out))["epoch"] == 1


def test_resume_mid_epoch_needs_the_same_batch_plan(tiny_model, tmp_path, monkeypatch, capsys):
    from conftest import SAMPLE

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("".join(SAMPLE.joinpath("train.txt").read_text().splitlines(True)[:24]))
    (data / "validation.txt").write_text("".join(SAMPLE.joinpath("validation.txt").read_text().splitlines(True)[:6]))
    out = tmp_path / "out"
    monkeypatch.setenv("FAULT", "term:mid_step@5")
    assert call_main(epoch_args(tiny_model, data, out)) == 143
    monkeypatch.delenv("FAULT")
    capsys.readouterr()
    before = snapshot(out)
    for changed, named in ((["--max-tokens", "640"], "max_tokens"), (["--max-length", "48"], "max_length"),
                           (["--max-target-length", "16"], "max_target_length")):
        assert call_main(["--resume", "--output-dir", out, *changed]) == 2
        line = one_error_line(capsys)
        assert "checkpoint-00000005 stopped mid-epoch" in line and named in line
        assert snapshot(out) == before
    text = (data / "train.txt").read_text()
    (data / "train.txt").write_text(text + SAMPLE.joinpath("train.txt").read_text().splitlines(True)[30])
    assert call_main(["--resume", "--output-dir", out]) == 2
    assert "train_sha256" in one_error_line(capsys)
    assert snapshot(out) == before
    (data / "train.txt").write_text(text)

    assert call_main(["--resume", "--output-dir", out]) == 0
    seen = [i for r in train_rows(out) for i in r["examples"]]
    end = ckpt.load_training_state(latest(out))
    assert (end["epoch"], end["batch"]) == (1, 0)
    assert sorted(seen) == list(range(end["plan"]["pairs"]))  # each example exactly once in the epoch

    # At an epoch end nothing of the old plan is left to follow: another budget is fine.
    assert call_main(["--resume", "--output-dir", out, "--epochs", "2", "--max-tokens", "640"]) == 0
    end2 = ckpt.load_training_state(latest(out))
    assert (end2["epoch"], end2["batch"], end2["plan"]["max_tokens"]) == (2, 0, 640)
    second = train_rows(out)[end["step"]:]  # the rows the last resume wrote, after the first epoch's
    assert sorted(i for r in second for i in r["examples"]) == list(range(end["plan"]["pairs"]))
    assert len(second) < 20  # bigger batches: fewer steps than the first epoch's 20


def test_a_diverging_run_stops_at_the_first_bad_step_and_keeps_only_good_checkpoints(tiny_model, data_dir, tmp_path,
                                                                                       capsys):
    # --lr 1e4 really diverges on the tiny model within a few steps: the loss or its gradient turns nan.
    out = tmp_path / "out"
    assert call_main(train_argv(tiny_model, data_dir, out, "--max-steps", "20", "--lr", "1e4", "--save-every", "1",
                                "--eval-every", "2")) == 2
    line = one_error_line(capsys)
    assert "not finite" in line and "lower --lr" in line
    bad = int(line.split("step ")[1].split(":")[0])
    kept = ckpt.list_checkpoints(out)
    assert kept and all(ckpt.step_of(p) < bad for p in kept)  # nothing saved from the bad step on
    assert f"last good checkpoint ({kept[-1].name})" in line
    for path in kept:  # "good" means it: no nan or inf in any weight
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values()), path.name
    index = strict_json((out / "checkpoints.json").read_text())
    assert index["latest"] == kept[-1].name
    assert index["best"] is None or (math.isfinite(index["best_val_loss"]) and (out / index["best"]).is_dir())
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) <= bad


def test_relative_data_and_model_paths_are_recorded_absolute_and_resume_works_from_elsewhere(tiny_model, data_dir,
                                                                                                 tmp_path, monkeypatch):
    shutil.copytree(data_dir, tmp_path / "d")
    shutil.copytree(tiny_model, tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert call_main(["--model", "m", "--train-file", "d/train.txt", "--val-file", "d/validation.txt",
                      "--output-dir", "out", *TINY_FLAGS, "--max-steps", "2", "--save-every", "2"]) == 0
    config = strict_json((tmp_path / "out" / "checkpoint-00000002" / ckpt.RUN_CONFIG).read_text())
    assert config["train_file"] == str(tmp_path / "d" / "train.txt")
    assert config["val_file"] == str(tmp_path / "d" / "validation.txt")
    assert config["model"] == str(tmp_path / "m")
    assert config["tokenizer_vocab_size"] == 400  # the tokenizer's, not --scratch-vocab-size's 8000
    monkeypatch.chdir(tmp_path / "elsewhere")  # no d/ or m/ here: the model typed relative to this folder is the same
    assert call_main(["--resume", "--output-dir", tmp_path / "out", "--max-steps", "3", "--model", "../m"]) == 0
    assert ckpt.load_training_state(latest(tmp_path / "out"))["step"] == 3


def held_out_args(model, corpus, out, *extra):
    return ["--model", model, "--train-file", corpus, "--output-dir", out, *TINY_FLAGS, "--max-steps", "6",
            "--eval-every", "2", "--save-every", "2", *extra]


def test_without_a_validation_file_a_seeded_share_is_held_out_and_resume_reuses_it(tiny_model, tmp_path, capsys):
    from conftest import SAMPLE

    corpus = tmp_path / "x" / "dialogues_text.txt"  # no validation.txt beside it
    corpus.parent.mkdir()
    shutil.copy(SAMPLE / "train.txt", corpus)
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert call_main(held_out_args(tiny_model, corpus, straight, "--val-share", "0.2")) == 0
    said = capsys.readouterr().out
    assert "20% of its dialogues held out for validation (seed 42)" in said
    assert "valid: " in said and "(held-out dialogues): 24 dialogues" in said  # 20% of 120
    config = strict_json((latest(straight) / ckpt.RUN_CONFIG).read_text())
    assert config["val_share"] == 0.2 and config["val_file"] is None
    assert "validated on 20% of its dialogues held out" in png_title(straight / "loss.png")

    # The same run stopped after step 4 and resumed without the flag: same held-out dialogues, so
    # the same validation loss at step 6 (resume is bit-exact, so the weights are the same).
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoint-00000006")
    assert call_main(["--resume", "--output-dir", out]) == 0
    assert "(held-out dialogues): 24 dialogues" in capsys.readouterr().out
    val = {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    assert val == {r["step"]: r["val_loss"] for r in metrics(straight) if "val_loss" in r}

    # The default share holds out fewer dialogues, and so measures a different loss.
    assert call_main(held_out_args(tiny_model, corpus, tmp_path / "default")) == 0
    said = capsys.readouterr().out
    assert "5% of its dialogues held out" in said and "(held-out dialogues): 6 dialogues" in said
    assert [r["val_loss"] for r in metrics(tmp_path / "default") if "val_loss" in r] != list(val.values())


def test_bf16_on_cpu_trains_close_to_fp32_and_saves_fp32(tiny_model, data_dir, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert call_main(train_argv(tiny_model, data_dir, out, "--device", "cpu", "--precision", precision,
                                    "--max-steps", "8", "--log-examples")) == 0
        runs[precision] = train_rows(out)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert [r["examples"] for r in bf16] == [r["examples"] for r in fp32]  # the same batches
    assert all(math.isfinite(r["loss"]) for r in bf16)
    # bf16 keeps 8 bits of mantissa (relative rounding 2**-9, about 0.2%) in matmul inputs and outputs; over
    # a few layers and 8 small steps the loss moves by a few tenths of a percent. 1% is room for that and
    # far below what a wrong forward pass (a dropped mask, a wrong scale) does to a loss near ln(400) = 6.
    torch.testing.assert_close([r["loss"] for r in bf16], [r["loss"] for r in fp32], rtol=0.01, atol=0)
    assert [r["loss"] for r in bf16] != [r["loss"] for r in fp32]  # and bf16 really ran
    end = latest(tmp_path / "bf16")
    assert {t.dtype for t in load_file(end / "model.safetensors").values()} == {torch.float32}
    state = ckpt.load_training_state(end)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}
