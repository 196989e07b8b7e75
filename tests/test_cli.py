"""The one edge every script ends through (cli.run_script): what the user can act on is one line and an exit code."""

import argparse
import errno

import pytest
import torch

from t5dialog.cli import UserError, check_positive, finite_float, float_flag, run_script


def ends_with(capsys, run, **kwargs):
    code = run_script("tool.py", run, [], **kwargs)
    return code, capsys.readouterr().err.strip().splitlines()


def raising(error):
    def run(argv):
        raise error
    return run


def test_a_user_error_is_one_line_and_2(capsys):
    assert ends_with(capsys, raising(UserError("--x is wrong; use --y"))) == (2, ["tool.py: error: --x is wrong; use --y"])


def test_a_full_disk_is_one_line_naming_the_file_and_what_to_do(capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/out/metrics.jsonl")
    code, err = ends_with(capsys, raising(full), rerun="rerun with --resume")
    assert code == 2 and len(err) == 1
    assert "disk full while writing /out/metrics.jsonl" in err[0] and err[0].endswith("then rerun with --resume")


def test_a_wrapped_full_disk_is_still_named(capsys):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise OSError("writing the plot failed") from inner
    except OSError as outer:
        wrapped = outer
    code, err = ends_with(capsys, raising(wrapped))
    assert code == 2 and len(err) == 1 and "disk full" in err[0]


def test_out_of_gpu_memory_is_one_line_with_this_scripts_advice(capsys):
    code, err = ends_with(capsys, raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
                          out_of_memory="lower --batch-size")
    assert (code, err) == (2, ["tool.py: error: out of GPU memory; lower --batch-size"])


def test_ctrl_c_is_one_line_and_130(capsys):
    assert ends_with(capsys, raising(KeyboardInterrupt())) == (130, ["tool.py: interrupted"])


def test_a_bug_is_not_hidden(capsys):
    """Only what the user can act on becomes a line: a programming error keeps its traceback."""
    with pytest.raises(RuntimeError, match="a bug"):
        run_script("tool.py", raising(RuntimeError("a bug")), [])
    with pytest.raises(ZeroDivisionError):
        run_script("tool.py", lambda argv: 1 / 0, [])


def test_check_positive_names_the_flag_and_lets_unset_ones_pass():
    class Args:
        batch_size, max_steps, lr = 4, None, 0.0

    check_positive(Args, "batch_size", "max_steps")
    with pytest.raises(UserError, match=r"^--lr must be positive, got 0.0$"):
        check_positive(Args, "batch_size", "lr")


def test_float_flags_refuse_nan_and_inf_where_inf_means_nothing():
    assert finite_float("1e-4") == 1e-4 and float_flag("inf") == float("inf")  # --max-grad-norm inf: no clipping
    for text in ("nan", "inf", "-inf", "1e999", "fast"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}' is not a"):
            finite_float(text)
    for text in ("nan", "NaN", "fast"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}' is not a number"):
            float_flag(text)
