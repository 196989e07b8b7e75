"""eval.py: batched generation, teacher-forced perplexity, the CLI and train.py --eval-generate."""

import hashlib
import json
import math
import shutil

import pytest
import torch
from conftest import assert_user_error, run_cli
from test_train import train_args

import eval as evaluation
import infer
from dataset import DailyDialogDataset, dialogue_pairs, read_dialogues
from metrics import perplexity

CPU = torch.device("cpu")
SAMPLE_KEYS = {"context", "reference", "response"}
REPORT_KEYS = {"checkpoint", "data", "data_sha256", "num_pairs", "decoding", "metrics"}
METRIC_KEYS = {"perplexity", "bleu1", "bleu2", "bleu4_corpus", "distinct1", "distinct2", "f1", "avg_len", "top10_share",
               "ref_distinct1", "ref_distinct2", "ref_avg_len"}


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return infer.load(tiny_model, CPU)


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
    example = ds[3]
    nll, tokens = evaluation.target_nll(model, [example], tokenizer.pad_token_id, CPU)
    assert tokens == len(example["labels"])  # every target token, </s> included
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
    assert perplexity(nll, tokens) == pytest.approx(math.exp(loss.item()), rel=1e-5)

    # In padded batches, padding counts for nothing: the sums of single examples.
    examples = [ds[i] for i in range(10)]
    singles = [evaluation.target_nll(model, [e], tokenizer.pad_token_id, CPU) for e in examples]
    nll, tokens = evaluation.target_nll(model, examples, tokenizer.pad_token_id, CPU, batch_size=4)
    assert tokens == sum(t for _, t in singles) == sum(len(e["labels"]) for e in examples)
    assert nll == pytest.approx(sum(n for n, _ in singles), rel=1e-5)


# ---------------------------------------------------------------- the CLI


def test_eval_writes_report_and_samples_in_file_order(tiny_model, data_dir, tmp_path):
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_model, checkpoint)
    data = data_dir / "validation.txt"
    result = run_cli("eval.py", "--checkpoint", checkpoint, "--data", data, "--max-examples", "7", "--batch-size", "3",
                     "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    out = checkpoint / "eval"  # the default --out

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


@pytest.mark.parametrize("flags, words", [
    (["--max-examples", "0"], ["--max-examples", "positive"]),
    (["--max-examples", "-3"], ["--max-examples"]),
    (["--max-examples", "two"], ["--max-examples", "invalid int"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--num-beams", "wide"], ["--num-beams", "invalid int"]),
    (["--bogus"], ["unrecognized", "--bogus"]),
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
    assert not (tiny_model / "eval").exists()


def test_errors_from_the_command_line(tiny_model, tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("Just a normal text file.\n")
    assert_user_error(run_cli("eval.py", "--checkpoint", tiny_model, "--data", prose), "not DailyDialog")
    assert_user_error(run_cli("eval.py", "--checkpoint", tiny_model, "--data", prose, "--max-examples", "0"), "--max-examples")


# ---------------------------------------------------------------- train.py --eval-generate


def test_train_eval_generate_writes_the_report_in_the_output_dir(tiny_model, data_dir, tmp_path):
    out = tmp_path / "ckpts"
    result = run_cli(*train_args(tiny_model, data_dir, out, "--max-steps", "2", "--eval-generate", "3"))
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
