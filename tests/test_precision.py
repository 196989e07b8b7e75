"""Devices and precision, the same for every script: what --device and --precision accept, and what they do."""

import pytest
import torch
from conftest import assert_user_error, run_cli

import infer
from t5dialog import generation, models
from t5dialog.cli import UserError


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "mps:0"])
def test_devices_other_than_cpu_and_cuda_are_one_line_errors(device, tiny_model, capsys):
    assert infer.main(["--checkpoint", tiny_model, "--device", device, "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--device {device}" in err[0] and "cpu" in err[0], err


@pytest.mark.slow
def test_a_deprecated_device_name_is_still_one_line(tiny_model):
    assert_user_error(run_cli("infer.py", "--checkpoint", tiny_model, "--device", "mkldnn", "Hi"), "--device mkldnn")


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert models.resolve_precision("auto", cpu) == "fp32"  # bf16 on a CPU is slower, so never chosen for you
    assert models.resolve_precision("fp32", cpu) == "fp32"
    assert models.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match="overflow fp16.*use --precision bf16 or fp32"):
        models.resolve_precision("fp16", cpu)
    with pytest.raises(UserError, match="not a precision"):
        models.resolve_precision("fp8", cpu)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        native = torch.cuda.get_device_capability(gpu)[0] >= 8
        assert models.resolve_precision("auto", gpu) == ("bf16" if native else "fp32")


def test_autocast_runs_the_model_in_bf16_and_keeps_fp32_weights(tiny_model):
    model, _ = generation.load(tiny_model, torch.device("cpu"))
    x = torch.ones(2, 4)
    with models.autocast("cpu", "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with models.autocast(torch.device("cpu"), "fp32"):
        assert (x @ x.T).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_bf16_on_cpu_answers(tiny_model):
    result = run_cli("infer.py", "--checkpoint", tiny_model, "--device", "cpu", "--precision", "bf16", "How are you ?")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip()


@pytest.mark.parametrize("flag, words", [("fp16", ["fp16", "overflow", "bf16 or fp32"]), ("double", ["--precision double"])])
def test_unsupported_precisions_are_one_line_errors(flag, words, tiny_model, capsys):
    assert infer.main(["--checkpoint", tiny_model, "--precision", flag, "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for w in words:
        assert w in err[0], (w, err)
