"""Checkpoints that survive crashes.

A checkpoint is a folder ``checkpoint-<step>`` that Hugging Face loads as is
(``model.safetensors``, ``config.json``, ``generation_config.json``, the
tokenizer files) plus what resuming needs:

- ``training_state.pt``: optimizer, scheduler, step, epoch, position in the
  epoch, RNG states; plain tensors and numbers, loaded with
  ``torch.load(weights_only=True)`` so a tampered file cannot run code;
- ``run_config.json``: the flags of the run;
- ``manifest.json``: the sha256 of every other file, written last.

Crash safety comes from the order of operations: everything is written into a
temporary folder beside the final one and flushed to disk, then one
``rename`` commits it. Old checkpoints are deleted only after that, and the
best one never. ``checkpoints.json`` at the root names the latest and the
best, but resuming does not trust it: it takes the newest folder whose
manifest verifies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import warnings
from pathlib import Path

import torch

from cli import UserError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
INDEX = "checkpoints.json"
MANIFEST = "manifest.json"
STATE = "training_state.pt"
RUN_CONFIG = "run_config.json"
LOCK = "train.lock"


class CheckpointError(UserError):
    """A checkpoint we cannot write or use; the message says what to do.

    Its own type because a caller may go on to an older checkpoint instead.
    """


# ---------------------------------------------------------------- small helpers


def _fsync_path(path: Path):
    """Flush a file or a folder entry to disk (so a rename after it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data):
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def describe_os_error(e: BaseException, path=None) -> str:
    """'disk full while writing FILE' rather than torch's or safetensors' own words for it."""
    text = str(e)
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text
    name = getattr(e, "filename", None) or path
    if full:
        return f"disk full while writing {name or 'a file'}"
    reason = getattr(e, "strerror", None) or (text.strip().splitlines() or [type(e).__name__])[0][:160]
    return f"{name}: {reason}" if name else reason


def fault(stage: str, step: int):
    """Test hook: TRAIN_FAULT="[action:]stage@step,..." acts at that point.

    action: kill (SIGKILL, the default), term (SIGTERM), int (SIGINT) or
    enospc (a write that fails as on a full disk). Stages: mid_step,
    mid_save, before_commit, before_prune. Unset, this does nothing.
    """
    for item in filter(None, os.environ.get("TRAIN_FAULT", "").split(",")):
        where, _, at = item.partition("@")
        action, _, where = where.rpartition(":")
        if where == stage and int(at) == step:
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), {"": signal.SIGKILL, "kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action])


def make_writable_dir(path: Path):
    """Create ``path`` and prove a file can be written there (raises OSError)."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f"{TMP_PREFIX}write-test"
    probe.write_text("ok")
    probe.unlink()


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def list_checkpoints(output_dir) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of)


def remove_leftovers(output_dir) -> list[str]:
    """Delete temporary folders a crashed save or prune left behind."""
    removed = []
    for p in Path(output_dir).iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def read_index(output_dir) -> dict:
    try:
        return json.loads((Path(output_dir) / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def lock_output_dir(out: Path):
    """Make this process the only writer of ``out``; returns the open lock file (keep it open).

    ``flock`` is released by the kernel when the process dies, so a kill -9
    never leaves a stale lock behind.
    """
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


def sign_lock(lock):
    """Name the holder in the lock file, for the message a second train.py prints.

    Done once the run has passed every check, so a refused run changes no file.
    """
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()


def prepare_output_dir(out: Path, resume: bool, is_main: bool, log=print):
    """Check ``out`` suits a new run or a resume, lock it (rank 0), clear crash leftovers; returns the lock."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is an existing file; pass a folder path")
    if not is_main:
        return None
    try:
        make_writable_dir(out)
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror}); fix its permissions or pass another folder") from None
    lock = lock_output_dir(out)  # before looking at its contents: another run may be changing them
    has_run = bool(list_checkpoints(out)) or (out / INDEX).exists()
    if resume and not list_checkpoints(out):
        raise UserError(f"--resume: no checkpoint in {out}; run without --resume to start training, or pass the right --output-dir")
    if has_run and not resume:
        raise UserError(f"{out} already holds a training run; add --resume to continue it, or pass another --output-dir")
    removed = remove_leftovers(out)
    if removed:
        log(f"removed unfinished temporary files of an interrupted run: {', '.join(removed)}")
    return lock


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- saving


def save_checkpoint(output_dir, step: int, model, tokenizer, training_state: dict, run_config: dict, metrics=None) -> Path:
    """Write and commit ``checkpoint-<step>``; return its path."""
    output_dir = Path(output_dir)
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    writing = tmp  # named in the error if a write fails
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        writing = tmp / "model.safetensors"
        model.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
        writing = tmp / "tokenizer files"
        tokenizer.save_pretrained(tmp)
        fault("mid_save", step)
        writing = tmp / STATE
        torch.save(training_state, tmp / STATE)
        writing = tmp / RUN_CONFIG
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, sort_keys=True))
        writing = tmp / MANIFEST
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: _sha256(p) for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            _fsync_path(p)
        _fsync_path(tmp)
        fault("before_commit", step)
        if final.exists():  # an unverifiable leftover of a crashed run: replace it
            stale = output_dir / f"{TRASH_PREFIX}{final.name}-{os.getpid()}"
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)  # the commit
        _fsync_path(output_dir)
    except Exception as e:  # a full disk surfaces as OSError, RuntimeError (torch) or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {output_dir}: {describe_os_error(e, writing)}; "
            "the previous checkpoint is intact: free space or fix permissions, then rerun with --resume"
        ) from None
    return final


def update_index_and_prune(output_dir, latest: Path, best: Path | None, best_loss, keep: int) -> list[str]:
    """Record latest/best in checkpoints.json, then delete old checkpoints.

    Keeps the newest ``keep`` checkpoints and the best; deletion goes through
    a rename to a trash name so a kill mid-delete never leaves a folder that
    looks like a checkpoint.
    """
    output_dir = Path(output_dir)
    try:
        write_json_atomic(
            output_dir / INDEX,
            {"latest": latest.name, "best": best.name if best else None, "best_val_loss": best_loss},
        )
    except OSError as e:
        raise CheckpointError(f"{latest.name} is saved, but {INDEX} could not be written ({e.strerror}); "
                              "free space or fix permissions, then rerun with --resume") from None
    fault("before_prune", step_of(latest))
    keep_names = {p.name for p in list_checkpoints(output_dir)[-max(keep, 1) :]} | {latest.name}
    if best is not None:
        keep_names.add(best.name)
    removed = []
    for p in list_checkpoints(output_dir):
        if p.name not in keep_names:
            trash = output_dir / f"{TRASH_PREFIX}{p.name}"
            p.rename(trash)
            shutil.rmtree(trash)
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------- loading


def verify(path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path.name}: missing or unreadable {MANIFEST}"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{path.name}: {name} is missing"
        if _sha256(path / name) != digest:
            return f"{path.name}: {name} does not match its recorded hash (damaged or truncated)"
    return None


def newest_valid(output_dir, warn=print) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"warning: skipping damaged checkpoint {problem}")
    return None


def load_training_state(path) -> dict:
    """The training state, refusing anything but plain tensors and numbers."""
    file = Path(path) / STATE
    try:
        # weights_only=True is explicit on purpose, with no fallback: a pickle
        # that asks to run code is refused instead of executed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes would break our one-line errors
            return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the function the pickle wanted to call
        why = f"it asks to run {found.group(1)}" if found else "it is damaged or not plain tensors"
        raise CheckpointError(
            f"{file}: refused to load the training state ({why}); it was not written by this tool: "
            "start a new run with another --output-dir"
        ) from None


def read_run_config(path) -> dict:
    try:
        return json.loads((Path(path) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
