"""The CUDA path: bf16 autocast, TF32, fused AdamW, sdpa, prefetched batches. Skipped without a GPU."""

import functools
import json
import math

import pytest
import torch
from conftest import TINY_FLAGS, run_cli, train_argv
from safetensors.torch import load_file

from t5dialog import checkpoint as ckpt
from t5dialog import models

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


argv = functools.partial(train_argv, flags=[*TINY_FLAGS, "--max-steps", "8", "--device", "cuda"])


def test_auto_precision_on_a_gpu_trains_in_bf16_and_saves_fp32(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    # models.bf16_supported, not torch.cuda.is_bf16_supported (which counts slow emulation as support)
    expected = "bf16 autocast" if models.bf16_supported(torch.device("cuda")) else "no bf16"
    assert expected in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(isinstance(x, float) and math.isfinite(x) for x in losses)  # metrics write NaN as null
    weights = load_file(ckpt.list_checkpoints(out)[-1] / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_gpu_resume_continues_the_same_data_order(tiny_model, data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("train.py", *argv(tiny_model, data_dir, straight, "--log-examples")).returncode == 0
    first = run_cli("train.py", *argv(tiny_model, data_dir, resumed, "--log-examples"), env={"FAULT": "term:mid_step@5"})
    assert first.returncode == 143, first.stderr[-2000:]
    assert run_cli("train.py", *argv(tiny_model, data_dir, resumed, "--log-examples", "--resume")).returncode == 0

    def examples(out):
        return [r["examples"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "examples" in r]

    assert examples(resumed) == examples(straight)


def test_fp16_is_refused_on_a_gpu_too(tiny_model, data_dir, tmp_path):
    result = run_cli("train.py", *argv(tiny_model, data_dir, tmp_path / "out", "--precision", "fp16"))
    assert result.returncode == 2 and "bf16" in result.stderr
