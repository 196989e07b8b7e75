"""eval.py: batched generation, teacher-forced perplexity, the CLI and train.py --eval-generate."""

import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE, assert_user_error, run_cli, script_env, train_argv

import eval as evaluation
import infer
from dataset import DailyDialogDataset, dialogue_pairs, read_dialogues
from t5dialog import checkpoint as ckpt
from t5dialog import metrics as m
from t5dialog.metrics import perplexity
from t5dialog.validation import target_nll

CPU = torch.device("cpu")
SAMPLE_KEYS = {"context", "reference", "response"}
REPORT_KEYS = {"checkpoint", "data", "data_sha256", "num_pairs", "decoding", "metrics"}
METRIC_KEYS = {"perplexity", "bleu1", "bleu2", "bleu4_corpus", "distinct1", "distinct2", "f1", "avg_len", "top10_share",
               "ref_distinct1", "ref_distinct2", "ref_avg_len"}


def read_samples(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("options", [dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=2)], ids=["greedy", "beam"])
def test_batched_generation_equals_one_call_per_pair(loaded, data_dir, options):
    model, tokenizer = loaded
    pairs = dialogue_pairs(read_dialogues(data_dir / "validation.txt")[0])
    histories = [history for history, _ in pairs[:9]]
    histories.append(["short ?"])
    histories.append(["a much longer first turn than the others , with many words in it ."] * 12)  # cut to max_length
    lengths = {len(infer.encode_history(tokenizer, h, 64)) for h in histories}
    assert len(lengths) >= 4  # batches really hold inputs of different lengths, hence padding

    batched = evaluation.generate_all(histories, model, tokenizer, CPU, max_length=64, batch_size=4, progress=False,
                                      **options)
    one_by_one = [infer.generate_response(h[-1], model, tokenizer, CPU, history=h[:-1], max_length=64, **options)
                  for h in histories]
    assert batched == one_by_one  # same text, same (original) order
    assert all(batched)


# ---------------------------------------------------------------- perplexity


def test_perplexity_is_the_models_own_loss(loaded, data_dir):
    model, tokenizer = loaded
    ds = DailyDialogDataset(tokenizer, data_dir / "validation.txt", max_length=64, max_target_length=24)
    example = ds.examples[3]
    nll, tokens = target_nll(model, [example], tokenizer.pad_token_id, [[0]], CPU)
    assert tokens == len(example["labels"])  # every target token, </s> included
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
    assert perplexity(nll, tokens) == pytest.approx(math.exp(loss.item()), rel=1e-5)

    # In padded batches, padding counts for nothing: the sums of single examples.
    examples = ds.examples[:10]
    singles = [target_nll(model, [e], tokenizer.pad_token_id, [[0]], CPU) for e in examples]
    nll, tokens = target_nll(model, examples, tokenizer.pad_token_id, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], CPU)
    assert tokens == sum(t for _, t in singles) == sum(len(e["labels"]) for e in examples)
    assert nll == pytest.approx(sum(n for n, _ in singles), rel=1e-5)


# ---------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_eval_writes_report_and_samples_in_file_order(tiny_model, data_dir, tmp_path):
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_model, checkpoint)
    data = data_dir / "validation.txt"
    result = run_cli("eval.py", "--checkpoint", checkpoint, "--data", data, "--max-examples", "7", "--batch-size", "3",
                     "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "eval" / "model"  # the default --out: beside the checkpoint, never inside it
    assert not (checkpoint / "eval").exists()

    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert METRIC_KEYS <= set(report["metrics"])
    assert report["checkpoint"] == str(checkpoint) and report["data"] == str(data)
    assert report["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert report["num_pairs"] == report["metrics"]["num_pairs"] == 7
    assert report["decoding"]["max_new_tokens"] == 10 and report["decoding"]["no_repeat_ngram_size"] == 3
    assert report["metrics"]["perplexity"] > 1

    samples = read_samples(out)
    pairs = dialogue_pairs(read_dialogues(data)[0])[:7]
    assert [set(s) for s in samples] == [SAMPLE_KEYS] * 7
    assert [(s["context"], s["reference"]) for s in samples] == [(h, r) for h, r in pairs]
    assert all(isinstance(s["response"], str) and s["response"] for s in samples)

    for words in ("perplexity", "bleu1", "distinct2", "top10_share", "report.json"):
        assert words in result.stdout, words
    assert "generating" in result.stderr and "7/7" in result.stderr  # the progress bar
    assert "Traceback" not in result.stderr


def call_main(argv):
    try:
        return evaluation.main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits itself
        return e.code


def test_the_report_shows_three_samples_and_says_when_the_replies_collapsed(tiny_model, tmp_path, capsys):
    # The untrained tiny model answers every input alike: 24 replies, one or two texts.
    argv = ["--checkpoint", tiny_model, "--data", SAMPLE / "validation.txt", "--max-examples", "24", "--max-new-tokens", "3",
            "--out", tmp_path]
    assert call_main(argv) == 0
    out = capsys.readouterr().out
    samples = read_samples(tmp_path)
    for s in (samples[0], samples[12], samples[23]):  # spread over the pairs: the first, the middle and the last
        for label, text in (("input", s["context"][-1]), ("reference", s["reference"]), ("reply", s["response"])):
            assert f"  {label:<10} {text}\n" in out, (label, text)
    assert out.count("  reply ") == 3
    collapse = [line for line in out.splitlines() if "collapse" in line]
    replies = [s["response"] for s in samples]
    assert len(set(replies)) <= 2  # what the line below must call a collapse
    assert collapse == [m.collapse_line(replies)] and collapse[0].startswith("collapse: all 24 replies are ")


@pytest.mark.parametrize("flags, words", [
    (["--max-examples", "0"], ["--max-examples", "positive"]),
    (["--max-examples", "-3"], ["--max-examples"]),
    (["--max-examples", "two"], ["--max-examples", "invalid int"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--do-sample", "--temperature", "1e39"], ["--temperature 1e+39: must be from 0.001 to 1000"]),
    (["--num-beams", "wide"], ["--num-beams", "invalid int"]),
    (["--bogus"], ["unrecognized", "--bogus"]),
    (["--device", "mps"], ["--device mps", "cpu"]),
    (["--device", "xpu"], ["--device xpu", "cpu"]),
    (["--device", "meta"], ["--device meta", "cpu"]),
    (["--precision", "fp16"], ["--precision fp16", "overflow", "bf16 or fp32"]),
    (["--precision", "int8"], ["--precision int8", "auto, fp32, tf32 or bf16"]),
])
def test_bad_flags_are_one_line_errors(flags, words, tiny_model, data_dir, tmp_path, capsys):
    code = call_main(["--checkpoint", tiny_model, "--data", data_dir / "validation.txt", "--out", tmp_path / "out", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_errors(tiny_model, data_dir, tmp_path, capsys):
    prose = tmp_path / "prose.txt"
    prose.write_text("Just a normal text file.\nNothing dialogue about it.\n")
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    cases = [
        (["--checkpoint", tmp_path / "nope", "--data", data_dir / "validation.txt"], ["--checkpoint", "no such folder"]),
        (["--checkpoint", tmp_path, "--data", data_dir / "validation.txt"], ["no model"]),
        (["--checkpoint", tiny_model, "--data", prose], ["prose.txt", "not DailyDialog"]),
        (["--checkpoint", tiny_model, "--data", tmp_path / "missing.txt"], ["missing.txt", "not found"]),
        (["--checkpoint", tiny_model, "--data", data_dir / "validation.txt", "--out", a_file], ["--out", "existing file"]),
        (["--checkpoint", tiny_model], ["--data", "required"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", tiny_model, "--data", data_dir / "validation.txt", "--device", "cuda"], ["no CUDA"]))
    for argv, words in cases:
        assert call_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err, (w, err)
    assert a_file.read_text() == "keep me"
    assert not (tiny_model / "eval").exists() and not (tiny_model.parent / "eval" / tiny_model.name).exists()


@pytest.mark.slow
def test_errors_from_the_command_line(tiny_model, tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("Just a normal text file.\n")
    assert_user_error(run_cli("eval.py", "--checkpoint", tiny_model, "--data", prose), "not DailyDialog")
    assert_user_error(run_cli("eval.py", "--checkpoint", tiny_model, "--data", prose, "--max-examples", "0"), "--max-examples")


# ---------------------------------------------------------------- while train.py runs


@pytest.fixture
def training_run(loaded, tmp_path):
    """An output dir as a running train.py leaves it: checkpoints 4 and 8, the latest 8, no best yet."""
    model, tokenizer = loaded
    out = tmp_path / "ckpts"
    out.mkdir()
    for step in (4, 8):
        latest = ckpt.save_checkpoint(out, step, model, tokenizer, {"step": step}, {"max_length": 64, "max_target_length": 24})
    ckpt.update_index_and_prune(out, latest, None, None, keep=2)
    return out


@pytest.fixture
def training_goes_on(training_run, loaded, monkeypatch):
    """While eval.py generates, train.py saves checkpoint 12 and prunes the older ones (--keep 1)."""
    model, tokenizer = loaded
    real = evaluation.generate_all

    def generate_then_train(*args, **kwargs):
        responses = real(*args, **kwargs)
        newest = ckpt.save_checkpoint(training_run, 12, model, tokenizer, {"step": 12}, {"max_length": 64})
        ckpt.update_index_and_prune(training_run, newest, None, None, keep=1)
        return responses

    monkeypatch.setattr(evaluation, "generate_all", generate_then_train)
    return training_run


def eval_argv(checkpoint, data_dir, *extra):
    return ["--checkpoint", checkpoint, "--data", data_dir / "validation.txt", "--max-examples", "4", "--max-new-tokens", "4",
            *extra]


def test_the_default_out_survives_training_pruning_the_checkpoint(training_goes_on, data_dir, capsys):
    assert call_main(eval_argv(training_goes_on, data_dir)) == 0, capsys.readouterr().err
    assert not (training_goes_on / "checkpoint-00000008").exists()  # pruned while eval.py ran
    out = training_goes_on / "eval" / "checkpoint-00000008"
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] == str(training_goes_on / "checkpoint-00000008") and len(read_samples(out)) == 4
    assert ckpt.list_checkpoints(training_goes_on) == [training_goes_on / "checkpoint-00000012"]  # eval/ is no checkpoint


def test_the_metrics_table_is_printed_when_writing_fails(training_goes_on, data_dir, capsys):
    inside = training_goes_on / "checkpoint-00000008" / "eval"  # --out inside a checkpoint that training then deletes
    assert call_main(eval_argv(training_goes_on, data_dir, "--out", inside)) == 2
    out, err = capsys.readouterr()
    for words in ("perplexity", "bleu1", "distinct2"):
        assert words in out, words
    errors = [line for line in err.splitlines() if line.strip() and "generating" not in line]  # not the progress bar
    assert len(errors) == 1 and errors[0].startswith("eval.py: error: --out") and "metrics are printed above" in errors[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------- precision


def test_bf16_perplexity_is_finite_and_close_to_fp32(tiny_model, data_dir, tmp_path, capsys):
    perplexities = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert call_main(eval_argv(tiny_model, data_dir, "--precision", precision, "--device", "cpu", "--out", out)) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["precision"] == precision
        perplexities[precision] = report["metrics"]["perplexity"]
    fp32, bf16 = perplexities["fp32"], perplexities["bf16"]
    assert bf16 is not None and math.isfinite(bf16)
    assert bf16 != fp32  # the model really ran in bf16...
    assert bf16 == pytest.approx(fp32, rel=0.02)  # ...and bf16 keeps fp32's range: no overflow, a small rounding error


# ---------------------------------------------------------------- Ctrl-C and a reader that goes away



@pytest.mark.slow
def test_eval_ends_quietly_when_the_reader_leaves(tiny_model, data_dir, tmp_path):
    # `python eval.py ... | head -1`: the reader takes the first line and closes the pipe.
    p = subprocess.Popen([sys.executable, "eval.py", *map(str, eval_argv(tiny_model, data_dir, "--out", tmp_path / "out"))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=script_env(buffered=True))
    assert p.stdout.readline().startswith(b"evaluating")
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=300)
    text = err.decode(errors="replace")
    assert p.returncode == 0, text[-2000:]
    assert "Traceback" not in text and "Exception ignored" not in text and "BrokenPipe" not in text, text
    assert (tmp_path / "out" / "report.json").exists()  # written before the table that found no reader


@pytest.mark.slow
def test_ctrl_c_while_generating_is_one_line_and_130(tiny_model, tmp_path):
    p = subprocess.Popen([sys.executable, "eval.py", "--checkpoint", str(tiny_model), "--data", str(SAMPLE / "validation.txt"),
                          "--out", str(tmp_path / "out"), "--batch-size", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=script_env(buffered=True))
    assert p.stdout.readline().startswith(b"evaluating")  # the model is loaded; 151 pairs to generate follow
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130
    lines = [line for line in err.decode().replace("\r", "\n").splitlines() if line.strip() and "generating" not in line]
    assert lines == ["eval.py: interrupted"], err.decode()[-2000:]
    assert not (tmp_path / "out" / "report.json").exists()


# ---------------------------------------------------------------- train.py --eval-generate


@pytest.mark.slow
def test_train_eval_generate_writes_the_report_in_the_output_dir(tiny_model, data_dir, tmp_path):
    out = tmp_path / "ckpts"
    result = run_cli("train.py", *train_argv(tiny_model, data_dir, out, "--max-steps", "2", "--eval-generate", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generation eval failed" not in result.stdout
    index = json.loads((out / "checkpoints.json").read_text())
    checkpoint = out / (index["best"] or index["latest"])
    report_dir = out / "eval" / checkpoint.name  # beside the checkpoints: pruning never deletes it
    report = json.loads((report_dir / "report.json").read_text())
    assert report["num_pairs"] == 3 and report["checkpoint"] == str(checkpoint)
    assert report["data"] == str(data_dir / "validation.txt")
    assert report["max_length"] == 64 and report["max_target_length"] == 24  # the run's own lengths
    assert len(read_samples(report_dir)) == 3
    assert "perplexity" in result.stdout
