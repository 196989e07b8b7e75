"""Checkpoints that survive crashes: write, verify, index and prune, choose, load.

A checkpoint is a folder ``checkpoint-<step>`` that Hugging Face loads as is
(``model.safetensors``, ``config.json``, ``generation_config.json``, the
tokenizer files, a ``README.md`` model card: see modelcard.py) plus what
resuming needs:

- ``training_state.pt``: train.py's state dict (step, epoch, batch of the
  epoch, best loss) with the optimizer, RNG states and what the batch plan
  depends on; plain tensors and numbers, loaded with
  ``torch.load(weights_only=True)`` so a tampered file cannot run code;
- ``run_config.json``: the flags of the run and its tokenizer's real vocabulary size;
- ``manifest.json``: the sha256 of every other file, written last.

Crash safety comes from the order of operations: everything is written into a
temporary folder beside the final one and flushed to disk, then one
``rename`` commits it. Old checkpoints are deleted only after that, and the
best one never. ``checkpoints.json`` at the root names the latest and the
best, but resuming does not trust it: it takes the newest folder whose
manifest verifies. Readers (infer.py, eval.py) need no lock: they choose a
committed folder, and when a running train.py prunes it under them they move
on to the next good one.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from t5dialog.cli import UserError
from t5dialog.faults import fault
from t5dialog.files import describe_os_error, fsync_path, new_file_mode, read_json, sha256, to_json, write_json_atomic

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
IN_FLIGHT = (TMP_PREFIX + PREFIX, TRASH_PREFIX + PREFIX)  # a running train.py's saves and prunes
INDEX = "checkpoints.json"
MANIFEST = "manifest.json"
STATE = "training_state.pt"
RUN_CONFIG = "run_config.json"


class CheckpointError(UserError):
    """A checkpoint we cannot write or use; the message says what to do.

    Its own type so code that saves or loads checkpoints (and its tests) can
    tell a checkpoint problem from a bad flag; scripts print it like any UserError.
    """


# ---------------------------------------------------------------- names


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_committed_name(name: str) -> bool:
    """``checkpoint-<digits>``: what a commit's rename produces (never a temporary or trash folder)."""
    return name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def list_checkpoints(output_dir) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and is_committed_name(p.name)), key=step_of)


def remove_leftovers(output_dir) -> list[str]:
    """Delete temporary folders a crashed save or prune left behind."""
    removed = []
    for p in Path(output_dir).iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------- saving


def save_checkpoint(output_dir, step: int, model, tokenizer, training_state: dict, run_config: dict,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write and commit ``checkpoint-<step>``; return its path.

    ``extra_files``: {name: text} written beside the weights and covered by
    the manifest (the model card of modelcard.py).
    """
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
        for name, text in {RUN_CONFIG: to_json(run_config, sort_keys=True), **(extra_files or {})}.items():
            writing = tmp / name
            (tmp / name).write_text(text)
        writing = tmp / MANIFEST
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: sha256(p) for p in files}}
        (tmp / MANIFEST).write_text(to_json(manifest))
        mode = new_file_mode()
        for p in tmp.iterdir():
            if p.is_file():  # safetensors writes model.safetensors 0600: others sharing the machine could not load it
                p.chmod(mode)
            fsync_path(p)
        fsync_path(tmp)
        fault("before_commit", step)
        if final.exists():  # an unverifiable leftover of a crashed run: replace it
            stale = output_dir / f"{TRASH_PREFIX}{final.name}-{os.getpid()}"
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)  # the commit
        fsync_path(output_dir)
    except Exception as e:  # a full disk surfaces as OSError, RuntimeError (torch) or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {output_dir}: {describe_os_error(e, writing)}; "
            "the previous checkpoint is intact: free space or fix permissions, then rerun with --resume"
        ) from None
    return final


# ---------------------------------------------------------------- the index and pruning


def read_index(output_dir) -> dict:
    """checkpoints.json ({} when missing or damaged): a hint for readers, never trusted by resume."""
    return read_json(Path(output_dir) / INDEX)


def update_index_and_prune(output_dir, latest: Path, best: Path | None, best_loss, keep: int) -> list[str]:
    """Record latest/best in checkpoints.json, then delete old checkpoints.

    Keeps the newest ``keep`` checkpoints and the best; deletion goes through
    a rename to a trash name so a kill mid-delete never leaves a folder that
    looks like a checkpoint. A non-finite best loss (a diverged run) means
    no best: nothing is kept or recommended for it.
    """
    output_dir = Path(output_dir)
    if best_loss is not None and not math.isfinite(best_loss):
        best, best_loss = None, None
    try:
        write_json_atomic(output_dir / INDEX,
                          {"latest": latest.name, "best": best.name if best else None, "best_val_loss": best_loss})
    except OSError as e:
        raise CheckpointError(f"{latest.name} is saved, but {INDEX} could not be written ({describe_os_error(e)}); "
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


# ---------------------------------------------------------------- verifying and finding


def verify(path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    path = Path(path)
    files = read_json(path / MANIFEST).get("files")
    if not isinstance(files, dict):
        return f"{path.name}: missing or unreadable {MANIFEST}"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{path.name}: {name} is missing"
        if sha256(path / name) != digest:
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


def problem_of(path: Path) -> str | None:
    """None when ``path`` holds a complete model, else what is wrong with it (a few words)."""
    if path.name.startswith(IN_FLIGHT):
        return "a folder train.py is writing or deleting, not a checkpoint"
    if not (path / "config.json").is_file():
        return "config.json is missing"
    if not (path / "model.safetensors").is_file() and not any(path.glob("model-*.safetensors")):
        return "model.safetensors is missing"
    if (path / MANIFEST).exists():  # train.py wrote it: every file must match its hash
        problem = verify(path)
        return problem and problem.removeprefix(f"{path.name}: ")
    return None  # a save_pretrained folder: nothing recorded to check against


def looks_like_checkpoint(path: Path) -> bool:
    """A model folder (to load or refuse) rather than an output dir (to pick from)."""
    return ((path / "config.json").exists() or (path / MANIFEST).exists() or path.name.startswith(IN_FLIGHT)
            or is_committed_name(path.name))


def candidates(output_dir: Path) -> list[Path]:
    """Checkpoints of an output dir in the order to try them: best, latest, then newest first.

    Only committed ``checkpoint-<step>`` folders count: the index is a hint
    (it may be stale or edited), and a running train.py's ``.tmp-*`` and
    ``.trash-*`` folders are half written or half deleted.
    """
    committed = list_checkpoints(output_dir)
    by_name = {p.name: p for p in committed}
    index = read_index(output_dir)
    named = [by_name[n] for n in (index.get("best"), index.get("latest")) if isinstance(n, str) and n in by_name]
    return list(dict.fromkeys(named + committed[::-1]))


def raise_damaged(path: Path, problem: str):
    raise CheckpointError(f"checkpoint {path}: {problem}; pass another checkpoint with --checkpoint, or retrain")


def choose_checkpoint(checkpoint=None, output_dir="checkpoints", warn=None) -> Path:
    """--checkpoint DIR (a checkpoint, or an output dir), else the best, else the latest good one.

    A damaged checkpoint named directly is an error; in an output dir it is
    skipped for the next good one (as resuming does) and ``warn`` gets one
    line saying which and why.
    """
    path = Path(checkpoint or output_dir)
    if not path.is_dir():
        if checkpoint:
            what = "a file, not a folder" if path.exists() else "no such folder"  # e.g. the model.safetensors inside
            raise UserError(f"--checkpoint {path}: {what}; "
                            "pass a checkpoint folder such as checkpoints/checkpoint-00001000")
        raise UserError(f"no checkpoint found in {path}/; train one with `python train.py` or pass --checkpoint DIR")
    if looks_like_checkpoint(path):
        problem = problem_of(path)
        if problem:
            raise_damaged(path, problem)
        return path
    skipped = []
    for candidate in candidates(path):
        problem = problem_of(candidate)
        if problem is None:
            if skipped and warn:
                warn(f"warning: skipped {'; '.join(skipped)}; using {candidate.name}")
            return candidate
        skipped.append(f"{candidate.name}: {problem}")
    if skipped:
        raise UserError(f"no usable checkpoint in {path} ({'; '.join(skipped)}); pass a good one with --checkpoint, or retrain")
    raise UserError(f"{path} holds no model (no config.json and no checkpoint-* folder); "
                    "pass a checkpoint folder with --checkpoint, or train one with `python train.py`")


# ---------------------------------------------------------------- loading


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
    return read_json(Path(path) / RUN_CONFIG)


# ---------------------------------------------------------------- random state


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's GPU only: a resume may run on a machine with fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
