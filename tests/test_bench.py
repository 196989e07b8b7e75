"""The GPU benchmark runs end to end (its --quick mode, on the CPU) and says what it needs."""

import json

import pytest
from conftest import SAMPLE, assert_user_error, run_cli

pytestmark = pytest.mark.slow


def test_bench_gpu_quick_trains_one_epoch_through_train_py_and_reports_it(tmp_path):
    report = tmp_path / "bench.json"
    result = run_cli("bench/bench_gpu.py", "--quick", "--data-dir", SAMPLE, "--arms", "fp32", "--json", report)
    assert result.returncode == 0, result.stderr[-3000:]
    arm = json.loads(report.read_text())["fp32"]
    assert arm["real_tokens"] == arm["plan_real_tokens"] > 0  # the loop trained every planned token once
    assert arm["seconds"] > 0 and arm["tokens_per_s"] > 0 and 0 < arm["padding_efficiency"] <= 1
    assert arm["val_loss"] == pytest.approx(arm["logged_val_loss"], rel=1e-4)  # the saved model is the trained one
    assert "| fp32 " in result.stdout


def test_bench_without_data_is_one_line(tmp_path):
    assert_user_error(run_cli("bench/bench_gpu.py", "--quick", "--data-dir", tmp_path), "--data-dir")
