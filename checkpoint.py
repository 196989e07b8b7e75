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

import hashlib
import json
import os
import pickle
import re
import shutil
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


def make_writable_dir(path: Path):
    """Create ``path`` and prove a file can be written there (raises OSError)."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f"{TMP_PREFIX}write-test"
    probe.write_text("ok")
    probe.unlink()


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


# ---------------------------------------------------------------- saving


def save_checkpoint(output_dir, step: int, model, tokenizer, training_state: dict, run_config: dict, hooks=None) -> Path:
    """Write and commit ``checkpoint-<step>``; return its path.

    ``hooks`` (tests only) maps a stage name to a callable run at that point,
    so tests can kill or fail the save at a chosen moment.
    """
    hooks = hooks or {}
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step:08d}"
    tmp = output_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
        tokenizer.save_pretrained(tmp)
        hooks.get("mid_save", lambda: None)()
        torch.save(training_state, tmp / STATE)
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, sort_keys=True))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: _sha256(p) for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            _fsync_path(p)
        _fsync_path(tmp)
        hooks.get("before_commit", lambda: None)()
        if final.exists():  # an unverifiable leftover of a crashed run: replace it
            stale = output_dir / f"{TRASH_PREFIX}{final.name}-{os.getpid()}"
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)  # the commit
        _fsync_path(output_dir)
    except Exception as e:  # a full disk surfaces as OSError, RuntimeError (torch) or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {output_dir}: {reason}; "
            "the previous checkpoint is intact: free space or fix permissions, then rerun with --resume"
        ) from None
    return final


def update_index_and_prune(output_dir, latest: Path, best: Path | None, best_loss, keep: int, hooks=None) -> list[str]:
    """Record latest/best in checkpoints.json, then delete old checkpoints.

    Keeps the newest ``keep`` checkpoints and the best; deletion goes through
    a rename to a trash name so a kill mid-delete never leaves a folder that
    looks like a checkpoint.
    """
    hooks = hooks or {}
    output_dir = Path(output_dir)
    try:
        write_json_atomic(
            output_dir / INDEX,
            {"latest": latest.name, "best": best.name if best else None, "best_val_loss": best_loss},
        )
    except OSError as e:
        raise CheckpointError(f"{latest.name} is saved, but {INDEX} could not be written ({e.strerror}); "
                              "free space or fix permissions, then rerun with --resume") from None
    hooks.get("before_prune", lambda: None)()
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
