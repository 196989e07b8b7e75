"""What a checkpoint folder tells whoever loads it elsewhere: model card, decoding defaults, strict JSON."""

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import SAMPLE, script_env
from huggingface_hub import ModelCard

import dataset
from t5dialog import checkpoint as ckpt
from t5dialog import corpus_download, generation, modelcard


def strict_json(path):
    """Parse as strict JSON readers do: a bare NaN or Infinity is an error."""
    def refuse(token):
        raise ValueError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def card_metadata(text: str) -> dict:
    return ModelCard(text).data.to_dict()  # raises on a malformed YAML header


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoModelForSeq2SeqLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def corpus_dir(tmp_path):
    """A folder laid out as data/download.py leaves the DailyDialog corpus (the text is the project's sample)."""
    d = tmp_path / "dailydialog"
    d.mkdir()
    (d / "train.txt").write_text(SAMPLE.joinpath("train.txt").read_text())
    (d / corpus_download.MANIFEST).write_text(json.dumps({"source": "roskoN/dailydialog@main", "license": "CC BY-NC-SA 4.0"}))
    return d


# ---------------------------------------------------------------- the card's metadata


def test_card_for_scratch_on_the_project_sample():
    meta = card_metadata(modelcard.model_card({"model": "scratch", "train_file": str(SAMPLE / "train.txt")}, None, 7))
    assert meta["license"] == "other" and meta["license_name"] == "project-demo-sample"
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["pipeline_tag"] == "text2text-generation" and meta["library_name"] == "transformers"


def test_card_for_a_named_model_on_the_corpus(corpus_dir):
    meta = card_metadata(modelcard.model_card({"model": "t5-small", "train_file": str(corpus_dir / "train.txt")}, None, 7))
    assert meta["license"] == "cc-by-nc-sa-4.0" and "license_name" not in meta
    assert meta["base_model"] == "t5-small"
    assert meta["datasets"] == ["roskoN/dailydialog"] and "dailydialog" in meta["tags"]


def test_card_for_a_user_file_says_the_license_is_unknown(corpus_dir, tmp_path):
    (corpus_dir / corpus_download.MANIFEST).unlink()  # the same text, but nothing says where it came from
    text = modelcard.model_card({"model": "google/flan-t5-small", "train_file": str(corpus_dir / "train.txt")}, None, 7)
    meta = card_metadata(text)
    assert meta["license"] == "other" and meta["license_name"] == "unknown"
    assert meta["base_model"] == "google/flan-t5-small" and "datasets" not in meta
    assert "license is unknown" in text


def test_card_for_a_local_model_folder_has_no_base_model(tmp_path, monkeypatch):
    (tmp_path / "my-t5").mkdir()
    monkeypatch.chdir(tmp_path)  # "my-t5" could be a hub id too; the folder here is what was loaded
    for given in ("my-t5", str(tmp_path / "my-t5")):
        text = modelcard.model_card({"model": given, "train_file": str(SAMPLE / "train.txt")}, None, 7)
        assert "base_model" not in card_metadata(text)  # a local path is not a hub id
        assert "`my-t5`" in text and str(tmp_path) not in text


def test_card_metrics_show_losses_and_non_finite_as_n_a():
    text = modelcard.model_card({}, {"step": 30, "val_loss": float("nan"), "best_val_loss": 3.1, "best_step": 20}, 30)
    card_metadata(text)
    assert "| validation loss (this checkpoint) | n/a |" in text
    assert f"| best validation loss (step 20) | 3.1000 (perplexity {math.exp(3.1):.2f}) |" in text
    assert "nan" not in text.lower()


def test_the_card_input_format_is_the_training_format(tiny):
    """The card's example joins turns itself; it must give exactly what training fed the model."""
    _, tokenizer = tiny
    turns = ["Hi , how are you ?", "Fine , thanks . And you ?", "Not bad ."]
    text = modelcard.model_card({}, None, 1)
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    joiner = re.search(r'tokenizer\("(.*?)"\.join', example).group(1)
    assert tokenizer(joiner.join(turns))["input_ids"] == dataset.encode_history(tokenizer, turns)


# ---------------------------------------------------------------- what save_checkpoint writes


def test_save_writes_card_and_decoding_defaults_covered_by_the_manifest(tiny, tmp_path):
    from transformers import GenerationConfig

    model, tokenizer = tiny
    run_config = {"model": "scratch", "train_file": str(SAMPLE / "train.txt"), "lr": float("nan"), "max_length": 64}
    metrics = {"step": 30, "val_loss": 3.2, "best_val_loss": float("inf")}
    path = ckpt.save_checkpoint(tmp_path, 30, model, tokenizer, {"step": 30}, run_config,
                                modelcard.files_for(run_config, metrics, 30))
    assert ckpt.verify(path) is None
    covered = strict_json(path / ckpt.MANIFEST)["files"]
    assert {modelcard.CARD, "generation_config.json", ckpt.RUN_CONFIG} <= set(covered)
    assert strict_json(path / ckpt.RUN_CONFIG)["lr"] is None

    raw = strict_json(path / "generation_config.json")
    assert not {"top_p", "top_k", "temperature"} & set(raw)  # greedy: no sampling knobs to warn about
    config = GenerationConfig.from_pretrained(path)
    d = generation.GENERATION_DEFAULTS
    assert (config.max_new_tokens, config.num_beams, config.no_repeat_ngram_size) == (
        d["max_new_tokens"], d["num_beams"], d["no_repeat_ngram_size"])
    assert bool(config.do_sample) == d["do_sample"]
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.decoder_start_token_id)

    card = (path / modelcard.CARD).read_text()
    assert card_metadata(card)["license_name"] == "project-demo-sample"
    assert "| validation loss (this checkpoint) | 3.2000" in card and "| best validation loss | n/a |" in card
    assert 'path = "checkpoint-00000030"' in card


# Plain transformers in an isolated interpreter (-I: no project folder on sys.path).
RUN_CARD_EXAMPLE = r"""
import json, os, re, sys
from pathlib import Path
folder, elsewhere = Path(sys.argv[1]), sys.argv[2]
code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
assert len(code.strip().splitlines()) == 5, code
os.chdir(folder.parent)  # as written, from the folder that holds the checkpoint
as_written = {}
exec(code, as_written)
os.chdir(elsewhere)  # the one edit the card asks for: the folder's full path
edited, count = re.subn(r'^path = "[^"]*"', f"path = {str(folder)!r}", code, flags=re.M)
assert count == 1, code
with_path = {}
exec(edited, with_path)
project = sorted({"checkpoint", "generation", "dataset", "models", "cli", "train", "infer"} & set(sys.modules))
print(json.dumps({"new_tokens": [len(g["reply"][0]) - 1 for g in (as_written, with_path)], "project": project}))
"""


@pytest.mark.slow
def test_card_example_runs_with_plain_transformers_and_uses_the_defaults(tiny, tmp_path):
    model, tokenizer = tiny
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    run_config = {"model": "scratch"}
    path = ckpt.save_checkpoint(out, 30, model, tokenizer, {"step": 30}, run_config,
                                modelcard.files_for(run_config, {"step": 30}, 30))
    env = {k: v for k, v in script_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", RUN_CARD_EXAMPLE, str(path), str(elsewhere)], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *replies, summary = result.stdout.strip().splitlines()
    report = json.loads(summary)
    assert report["project"] == []
    assert len(replies) == 2 and all(r.strip() for r in replies)
    # A random tiny model does not stop early: it writes exactly the configured
    # maximum (the library's own default would stop at 20).
    assert report["new_tokens"] == [generation.GENERATION_DEFAULTS["max_new_tokens"]] * 2


