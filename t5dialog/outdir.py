"""The output dir of a training run: one writer at a time, a new run never overwrites an old one,
and a run that is refused creates or changes nothing there.

Rank 0 holds an ``flock`` on ``train.lock`` for the whole run. The kernel
releases it when the process dies, so a kill -9 never leaves a stale lock;
readers (infer.py, eval.py) need none. `open_run_dir` checks the folder
before anything is loaded; `lock_output_dir` creates and locks it only once
every check has passed; `write_lock_holder` names the holder for the message
a second run prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from t5dialog.checkpoint import INDEX, list_checkpoints, looks_like_checkpoint, newest_valid, remove_leftovers
from t5dialog.cli import UserError
from t5dialog.files import make_writable_dir

LOCK = "train.lock"


def open_run_dir(flag: str, resume: bool, is_main: bool):
    """(the folder, its lock or None, the checkpoint to resume from or None, warnings about damaged checkpoints).

    Creates nothing. Rank 0 locks a folder that already has a lock file
    before reading it: another run may be pruning it right now.
    """
    if not flag.strip():
        raise UserError("--output-dir is empty; name a folder, e.g. --output-dir checkpoints")
    out = Path(flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is an existing file; pass a folder path")
    if out.is_symlink() and not out.exists():  # mkdir would fail with "File exists", read as a permission problem
        raise UserError(f"--output-dir {out} is a symlink to {os.readlink(out)}, which does not exist; "
                        "create that folder or pass another --output-dir")
    if out.is_dir() and looks_like_checkpoint(out):
        raise UserError(f"--output-dir {out} is a checkpoint, not an output dir; pass the folder that holds it "
                        f"({out.resolve().parent})")
    check_writable(out)
    lock = lock_file(out) if is_main and (out / LOCK).exists() else None
    if not resume:
        if is_main:
            refuse_old_run(out)
        return out, lock, None, []
    if not list_checkpoints(out):
        raise UserError(f"--resume: no checkpoint in {out}; run without --resume to start training, "
                        "or pass the right --output-dir")
    damaged: list[str] = []
    resume_from = newest_valid(out, warn=damaged.append)
    if resume_from is None:
        raise UserError(f"--resume: no checkpoint in {out} verifies (all damaged); start a new run with another --output-dir")
    return out, lock, resume_from, damaged


def lock_output_dir(out: Path, resume: bool, lock, log=print):
    """Rank 0, once nothing is left to refuse: create and lock ``out``, clear crash leftovers; returns the lock."""
    try:
        make_writable_dir(out)
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror}); "
                        "fix its permissions or pass another folder") from None
    if lock is None:
        lock = lock_file(out)
        if not resume:
            refuse_old_run(out)  # a run that started in the meantime
    removed = remove_leftovers(out)
    if removed:
        log(f"removed unfinished temporary files of an interrupted run: {', '.join(removed)}")
    return lock


def write_lock_holder(lock):
    """Name the holder in the lock file, for the message a second train.py prints."""
    if lock is not None:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()


def lock_file(out: Path):
    """Make this process the only writer of ``out``; returns the open lock file (keep it open)."""
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out} is in use by a running train.py ({holder}); wait for it to finish or stop it, "
                        "or pass another --output-dir") from None
    return f


def refuse_old_run(out: Path):
    if list_checkpoints(out) or (out / INDEX).exists():
        raise UserError(f"{out} already holds a training run; add --resume to continue it, or pass another --output-dir")


def check_writable(out: Path):
    """Fail before minutes of loading, not after: the folder (or the one it would be made in) takes files."""
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):  # root passes; `lock_output_dir` then finds out
        raise UserError(f"--output-dir {out} is not writable (no permission to write in {existing}); "
                        "fix its permissions or pass another folder")
