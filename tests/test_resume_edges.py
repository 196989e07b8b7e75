"""Where a run starts, stops and resumes off the beaten path, in-process: another step size that leaves a
remainder, another validation set, a stop between log points, the files read at start, and the cost line."""

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import train_argv
from test_train import call_main, epoch_args, latest, metrics, train_rows

from t5dialog import checkpoint as ckpt
from t5dialog import estimate, models, plan


def test_resume_with_a_step_size_that_leaves_a_remainder_trains_to_the_end_of_the_epoch(tiny_model, data_dir, tmp_path,
                                                                                       monkeypatch):
    """Stopped after 4 of the epoch's 20 batches, resumed with --grad-accum 3: 16 batches left make 6 steps (the
    last takes one batch), so the run ends at step 10 with every example trained once and the rate at its end."""
    out = tmp_path / "out"
    monkeypatch.setenv("FAULT", "term:mid_step@4")
    assert call_main(epoch_args(tiny_model, data_dir, out)) == 143
    monkeypatch.delenv("FAULT")
    assert call_main(["--resume", "--output-dir", out, "--grad-accum", "3"]) == 0
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert sorted(i for r in rows for i in r["examples"]) == list(range(127))  # the tiny data's 127 pairs, once each
    end = ckpt.load_training_state(latest(out))
    assert (end["step"], end["epoch"], end["batch"]) == (10, 1, 0)
    # The schedule counts this run's 7 steps of 3 batches over the epoch; the last step ran at its last rate.
    args = SimpleNamespace(**ckpt.read_run_config(latest(out)))
    assert rows[-1]["lr"] == pytest.approx(plan.lr_at(6, 0, args, 7), rel=1e-9)
    assert call_main(["--resume", "--output-dir", out, "--grad-accum", "3"]) == 2  # the epoch is done


def unseen_script(out):
    """Dialogues in a script the tiny tokenizer never saw: every piece is <unk>, and a reply of nothing but <unk>
    is easy to predict, so its validation loss is far below DailyDialog's."""
    turn = " ".join(["\u4f60\u597d\u4e16\u754c"] * 6)
    out.write_text("".join(" __eou__ ".join([turn] * 4) + " __eou__\n" for _ in range(6)))
    return out


def test_a_validation_set_changed_on_resume_starts_the_best_afresh_and_says_so(tiny_model, data_dir, tmp_path, capsys):
    out, easy = tmp_path / "out", unseen_script(tmp_path / "easy.txt")
    flags = ["--eval-every", "16", "--save-every", "16", "--val-file", easy, "--lr", "0.003"]  # 16 steps learn fast
    assert call_main(train_argv(tiny_model, data_dir, out, "--max-steps", "16", *flags)) == 0
    assert json.loads((out / ckpt.INDEX).read_text())["best"] == "checkpoint-00000016"
    capsys.readouterr()
    assert call_main(["--resume", "--output-dir", out, "--max-steps", "17", "--val-file", data_dir / "validation.txt"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "validation set differs" in line]
    assert len(said) == 1 and "checkpoint-00000016" in said[0] and "starts afresh" in said[0], said
    index = json.loads((out / ckpt.INDEX).read_text())
    val = {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    assert val[17] > val[16] + 0.5  # DailyDialog is far harder: the old best would have won the comparison
    assert index["best"] == "checkpoint-00000017" and index["best_val_loss"] == pytest.approx(val[17])
    # The same set again: nothing said, the best goes on.
    assert call_main(["--resume", "--output-dir", out, "--max-steps", "18"]) == 0
    assert "validation set differs" not in capsys.readouterr().out


def test_a_stop_between_log_points_writes_the_steps_since_the_last_row(tiny_model, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("FAULT", "term:mid_step@7")
    assert call_main(train_argv(tiny_model, data_dir, out, "--max-steps", "10", "--log-every", "5")) == 143
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [5, 7]
    assert rows[1]["real_tokens"] > 0 and rows[1]["loss"] > 0  # steps 6 and 7, measured
    monkeypatch.delenv("FAULT")
    assert call_main(["--resume", "--output-dir", out]) == 0
    assert [r["step"] for r in train_rows(out)] == [5, 7, 10]


_recording: list | None = None  # the paths opened while a test holds this list


def _record_open(event, args):
    if event == "open" and _recording is not None and isinstance(args[0], (str, os.PathLike)):
        _recording.append(os.fspath(args[0]))


@pytest.fixture
def opened():
    """The paths opened while the test runs: Python's audit events see every open, os.open's too."""
    global _recording
    if not getattr(opened, "hooked", False):
        sys.addaudithook(_record_open)  # a hook cannot be removed: it records only while a test holds the list
        opened.hooked = True
    _recording = []
    yield _recording
    _recording = None


def test_a_run_reads_its_data_files_once(data_dir, tmp_path, opened):
    """Read once: the bytes hashed are the bytes parsed, even if the file is replaced while the run starts.
    --model scratch: its tokenizer is trained on the same read."""
    train, val = tmp_path / "train.txt", tmp_path / "validation.txt"
    shutil.copy(data_dir / "train.txt", train)
    shutil.copy(data_dir / "validation.txt", val)
    opened.clear()  # the copies above opened them
    assert call_main(["--model", "scratch", "--scratch-vocab-size", "300", "--train-file", train, "--val-file", val,
                      "--output-dir", tmp_path / "out", "--max-steps", "1", "--max-length", "64"]) == 0
    assert opened.count(str(train)) == 1 and opened.count(str(val)) == 1, [p for p in opened if p.endswith(".txt")]


def test_the_banner_says_what_the_run_will_cost_before_the_first_step(tiny_model, data_dir, tmp_path, capsys):
    assert call_main(train_argv(tiny_model, data_dir, tmp_path / "out", "--max-steps", "6")) == 0
    out = capsys.readouterr().out.splitlines()
    cost = [line for line in out if line.startswith("cost: ")]
    assert len(cost) == 1 and cost[0].startswith("cost: 6 steps, about ") and "on cpu" in cost[0], cost
    first_step = next(i for i, line in enumerate(out) if line.startswith("step "))
    assert out.index(cost[0]) < first_step


def test_a_long_cpu_run_of_a_pretrained_model_names_the_short_run():
    hours = estimate.cost_lines(39_000, 0.8, torch.device("cpu"), "t5-small", fresh=True)
    assert hours[0].startswith("cost: 39,000 steps, about 8 h 40 min on cpu")
    assert len(hours) == 2 and "--max-steps 200" in hours[1] and "about 3 min" in hours[1]
    assert len(estimate.cost_lines(39_000, 0.8, torch.device("cpu"), "scratch", fresh=True)) == 1  # a small model
    assert len(estimate.cost_lines(300, 0.8, torch.device("cpu"), "t5-small", fresh=True)) == 1  # minutes, not hours
    assert len(estimate.cost_lines(39_000, 0.8, torch.device("cpu"), "t5-small", fresh=False)) == 1  # a resume


def test_the_warm_up_leaves_the_random_state_and_the_gradients_as_they_were(tiny_model, data_dir):
    from dataset import DailyDialogDataset, collate

    model, tokenizer = models.load_checkpoint(tiny_model)[:2]
    model.train()
    ds = DailyDialogDataset(tokenizer, data_dir / "train.txt", max_length=64, max_target_length=24)
    batches = [collate(ds.examples[:4], ds.pad_id), collate(ds.examples[4:8], ds.pad_id)]
    torch.manual_seed(3)
    before = torch.get_rng_state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert estimate.seconds_per_step(model, batches, torch.device("cpu"), "fp32") > 0
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_resume_of_a_finished_epoch_run_names_no_epoch_past_its_last(tiny_model, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert call_main(train_argv(tiny_model, data_dir, out, "--epochs", "1", "--eval-every", "100")) == 0
    capsys.readouterr()
    assert call_main(["--resume", "--output-dir", out]) == 2
    said = capsys.readouterr()
    assert "nothing to resume" in said.err and "epoch 2" not in said.out + said.err, said
