"""Shared fixtures: a tiny T5 and tokenizer built here, small data, CLI runner.

Nothing is downloaded: the tokenizer is trained on the project's own sample
dialogues and the model is a randomly initialised T5 a few thousand
parameters big, so every test runs offline on a CPU in seconds.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARED = ROOT.parent / "shared" / "dailydialog"

# Small enough that an optimizer step takes milliseconds.
TINY_CONFIG = dict(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2, dropout_rate=0.1)
# Flags that keep train.py runs on the tiny model short.
TINY_FLAGS = ["--max-length", "64", "--max-target-length", "24", "--max-tokens", "512", "--log-every", "1",
              "--eval-every", "4", "--save-every", "4"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The first dialogues of the project's sample, as train.txt/validation.txt."""
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text("".join(SAMPLE.joinpath("train.txt").read_text().splitlines(True)[:24]))
    (d / "validation.txt").write_text("".join(SAMPLE.joinpath("validation.txt").read_text().splitlines(True)[:6]))
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder holding a random-init tiny T5 and a tokenizer trained on sample text."""
    import models

    d = tmp_path_factory.mktemp("tiny-t5")
    model, tokenizer = models.build_scratch(SAMPLE / "train.txt", vocab_size=400, seed=0, **TINY_CONFIG)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def run_cli(*args, env=None, input=None, timeout=300) -> subprocess.CompletedProcess:
    """Run a project script as a user would: `python script.py args` in the project root."""
    # One thread: tiny models gain nothing from more, and on a busy 2-core
    # machine spinning OpenMP threads slow every step down a hundredfold.
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=full_env, input=input,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(result, *words):
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
