"""What every script shares at its edge: the user error, the flags, the device, and how a failure ends.

A `UserError` is a problem the user can fix (a bad flag, a missing file, a
damaged checkpoint); its message names the problem and the fix. Each
script's `main` goes through `run_script`, which turns it, a full disk, CUDA
running out of memory, a lost torchrun rank and Ctrl-C into one line and the
exit code shells expect, so no user ever sees a traceback for those.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

from t5dialog.files import describe_os_error, first_line


class UserError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""


# ---------------------------------------------------------------- flags


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints usage + message)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    """A float flag's type: nan and inf are refused when parsed, in one line.

    A range check such as ``value > 0`` lets inf through and answers nan
    either way; past the parser nan reaches the optimizer or the sampler and
    fails far from its cause (a nan weight decay reads as "lower --lr").
    """
    value = float_flag(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def float_flag(text: str) -> float:
    """A float flag's type where inf means "no limit" (--max-grad-norm): only nan is refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def add_device_arg(parser):
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def add_precision_arg(parser):
    parser.add_argument("--precision", default="auto", metavar="{auto,fp32,tf32,bf16}",
                        help="auto (bf16 on a CUDA GPU that supports it, else fp32), fp32, tf32 (fp32 with TF32 matmuls, "
                             "CUDA) or bf16 (autocast; weights stay fp32). fp16 is refused: T5's activations overflow it")


def add_checkpoint_arg(parser, default_dir: str):
    parser.add_argument("--checkpoint", default=None,
                        help=f"checkpoint folder, or an output dir; without it, the best, else the latest in {default_dir}/ "
                             "(a damaged one is skipped for the next good one)")


def check_positive(args, *names):
    """The one way a flag that must be above zero is refused: '--name must be positive, got V'."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def pick_device(flag: str) -> torch.device:
    """--device: auto (CUDA when present), cpu, cuda or cuda:N."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on deprecated names (mkldnn) would make the error two lines
            device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {flag}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: not built or tested here
        raise UserError(f"--device {flag}: only cpu and cuda are supported; use --device cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {flag}: no CUDA device here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA device(s); pick another index")
    return device


# ---------------------------------------------------------------- how a script ends


def fresh_line():
    """Errors start on a line of their own, not after a progress bar's text."""
    sys.stderr.write("\n" if getattr(sys.stderr, "isatty", lambda: False)() else "")


def warn(prog: str, message: str):
    print(f"{prog}: {message}", file=sys.stderr)


def lost_contact(e: RuntimeError) -> str | None:
    """One line for a collective that failed because another torchrun rank died; None for other errors."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not (isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "Connection"))):
        return None
    reason = first_line(e).split(". ")[0]  # its first sentence: a collective's errors go on at length
    return (f"rank {dist.get_rank()}: lost contact with the other processes ({reason}); another rank probably "
            "failed first: see its message (torchrun names it under 'Root Cause')")


def run_script(prog: str, run, argv, rerun: str = "rerun", out_of_memory: str = "lower --batch-size") -> int:
    """Call ``run(argv)``; what the user can act on becomes one line and an exit code.

    A user error, a full disk or CUDA out of memory: 2. Ctrl-C: one line and
    130, as shells expect. A lost torchrun rank: 1 (the rank that failed first
    reports the cause). A reader that went away (``| head``): a quiet 0, as Unix
    tools do. ``rerun`` and ``out_of_memory`` say what to do next in this script.
    """
    try:
        return run(sys.argv[1:] if argv is None else [str(a) for a in argv])
    except UserError as e:
        return error_line(prog, str(e), 2)
    except KeyboardInterrupt:
        fresh_line()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        quiet_broken_pipe()
        return 0
    except OSError as e:  # e.g. the disk filled up while writing a log or a plot
        return error_line(prog, f"{describe_os_error(e)}; free space or fix permissions, then {rerun}", 2)
    except torch.OutOfMemoryError:
        return error_line(prog, f"out of GPU memory; {out_of_memory}", 2)
    except RuntimeError as e:
        message = lost_contact(e)
        if message is None:
            raise
        return error_line(prog, message, 1)


def error_line(prog: str, message: str, code: int) -> int:
    fresh_line()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def quiet_broken_pipe():
    """Point stdout at /dev/null so Python's exit flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
