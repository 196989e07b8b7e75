"""The project's scripts as real processes, started in milliseconds instead of seconds.

A test about the process itself (kill -9 at a fault stage, a signal, the lock
held by a frozen run) needs a real one: its own pid, exit status, signal
handlers and file descriptors. But a new interpreter spends about 5 s of a
busy 2-core machine importing torch and transformers. So a forkserver
(`multiprocessing`'s own) imports train, infer and eval once, and each run is
forked from it: a real process that starts where `python train.py` would be
after its imports.

What such a child cannot show, and `run_fresh` (a new interpreter) must:
anything read at import time (the Hugging Face variables and proxies that
huggingface_hub reads into its constants), standard input, and a first import
itself (warnings printed once per process).
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train.py", "infer.py", "eval.py"}
# What every script run in a test gets: offline; one thread, since tiny models gain nothing from more and on a busy
# 2-core machine spinning OpenMP threads slow every step down a hundredfold; output as it is printed.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Read at import time, so a forked child would silently keep the server's values: such runs need run_fresh.
IMPORT_TIME = ("HF_", "TRANSFORMERS_", "HUGGINGFACE_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
               "http_proxy", "https_proxy", "all_proxy", "no_proxy", "OMP_", "TORCH", "PYTHON")

_context = multiprocessing.get_context("forkserver")
# matplotlib too: train.py imports it to draw loss.png at its end, 0.55 s a run when each child imports it anew.
_context.set_forkserver_preload(["train", "infer", "eval", "matplotlib.pyplot"])


def script_env(env: dict | None = None, buffered: bool = False) -> dict:
    """The environment of a script run by a test: the user's, offline, one thread, plus ``env``.

    ``buffered``: as in a user's shell, stdout to a pipe is block-buffered (Python's exit-time flush writes it).
    """
    full = {**os.environ, **BASE_ENV, **(env or {})}
    if buffered:
        full.pop("PYTHONUNBUFFERED")
    return full


def run_fresh(*args, env=None, input=None, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python args...` in a new interpreter, as a user would type it."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=script_env(env), input=input,
                          capture_output=True, text=True, timeout=timeout)


_server_env: dict | None = None  # the environment the forkserver started with, which every forked child inherits


def _ensure_server():
    """Start the forkserver with the tests' base environment, once per test process."""
    global _server_env
    if _server_env is None:
        _server_env = script_env()
        saved = dict(os.environ)
        os.environ.update(BASE_ENV)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)


def read_at_import(env: dict) -> list[str]:
    """The variables of ``env`` read at import time whose value differs from the forkserver's: a forked child would
    not see them."""
    _ensure_server()
    names = {k for k in {**env, **_server_env} if k.startswith(IMPORT_TIME)}
    return sorted(k for k in names if env.get(k) != _server_env.get(k))


def _child(script: str, argv: list[str], env: dict, cwd: str, out: str, err: str):
    """In the forked process: the script's environment, folder and output files, then its main()."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [script, *argv]
    sys.exit(importlib.import_module(script.removesuffix(".py")).main(argv))


class Started:
    """A forked script run: .pid, .wait(timeout) -> CompletedProcess."""

    def __init__(self, script, argv, env, cwd):
        self.args = [script, *argv]
        self._folder = Path(tempfile.mkdtemp(prefix="launcher-"))
        out, err = self._folder / "stdout", self._folder / "stderr"
        self._process = _context.Process(target=_child, args=(script, argv, env, str(cwd), str(out), str(err)))
        self._process.start()
        self.pid = self._process.pid

    def output_so_far(self, name: str = "stderr") -> str:
        """What the run has written to ``name`` (stdout or stderr) until now ("" before the child opened it)."""
        path = self._folder / name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, timeout=300) -> subprocess.CompletedProcess:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            shutil.rmtree(self._folder, ignore_errors=True)
            raise subprocess.TimeoutExpired(self.args, timeout)
        out, err = ((self._folder / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        shutil.rmtree(self._folder, ignore_errors=True)
        return subprocess.CompletedProcess(self.args, self._process.exitcode, out, err)


def start(script: str, *args, env=None, cwd=ROOT) -> Started:
    """Start ``script`` (train.py, infer.py or eval.py) forked from the preloaded server, in the environment
    `script_env(env)`; refused when that changes a variable read at import time."""
    if script not in SCRIPTS:
        raise ValueError(f"{script}: only {sorted(SCRIPTS)} are preloaded; use run_fresh")
    full = script_env(env)
    if late := read_at_import(full):
        raise ValueError(f"{late} are read at import time, which a forked child has done already; use run_fresh")
    return Started(script, [str(a) for a in args], full, cwd)


def run_cli(*args, env=None, input=None, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
    """``python args...`` as a real process: forked from the preloaded server when it can be the same as a new
    interpreter (a preloaded script, no standard input, no import-time variable changed), else a new interpreter."""
    script = str(args[0]) if args else ""
    if script in SCRIPTS and input is None and not read_at_import(script_env(env)):
        return start(script, *args[1:], env=env, cwd=cwd).wait(timeout)
    return run_fresh(*args, env=env, input=input, timeout=timeout, cwd=cwd)
