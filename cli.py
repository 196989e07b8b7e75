"""What every script shares at its edge: the user error, the flag parser, the device.

A `UserError` is a problem the user can fix (a bad flag, a missing file, a
damaged checkpoint); its message names the problem and the fix. Each
script's `main` goes through `run_script`, which prints it as one line and
returns exit code 2, so no user ever sees a traceback for their own mistake.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch


class UserError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints usage + message)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def fresh_line():
    """Errors start on a line of their own, not after a progress bar's text."""
    sys.stderr.write("\n" if getattr(sys.stderr, "isatty", lambda: False)() else "")


def run_script(prog: str, run, argv) -> int:
    """Call ``run(argv)``; user errors become one line and exit code 2.

    Ctrl-C ends with one line and 130, as shells expect; a reader that went
    away (``| head``) ends the program quietly, as Unix tools do.
    """
    try:
        return run(sys.argv[1:] if argv is None else [str(a) for a in argv])
    except UserError as e:
        fresh_line()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        fresh_line()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        quiet_broken_pipe()
        return 0


def quiet_broken_pipe():
    """Point stdout at /dev/null so Python's exit flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
