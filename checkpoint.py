"""Checkpoints that survive crashes.

A checkpoint is a folder ``checkpoint-<step>`` that Hugging Face loads as is
(``model.safetensors``, ``config.json``, ``generation_config.json``, the
tokenizer files) plus what resuming needs:

- ``training_state.pt``: train.py's state dict (step, epoch, batch of the
  epoch, best loss) with the optimizer, RNG states and what the batch plan
  depends on; plain tensors and numbers, loaded with
  ``torch.load(weights_only=True)`` so a tampered file cannot run code;
- ``run_config.json``: the flags of the run;
- ``README.md``: a model card (license of the training data, base model,
  metrics so far, the input format and a five-line example), so the folder
  can be shared and used elsewhere with plain transformers;
- ``manifest.json``: the sha256 of every other file, written last.

``generation_config.json`` holds infer.py's decoding defaults
(``models.GENERATION_DEFAULTS``), so ``model.generate`` anywhere answers
as infer.py does instead of stopping at the library's 20 tokens.

Crash safety comes from the order of operations: everything is written into a
temporary folder beside the final one and flushed to disk, then one
``rename`` commits it. Old checkpoints are deleted only after that, and the
best one never. ``checkpoints.json`` at the root names the latest and the
best, but resuming does not trust it: it takes the newest folder whose
manifest verifies.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import math
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
import yaml

import corpus
import models
import runlog
from cli import UserError
from dataset import SEPARATOR

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
INDEX = "checkpoints.json"
MANIFEST = "manifest.json"
STATE = "training_state.pt"
RUN_CONFIG = "run_config.json"
LOCK = "train.lock"
CARD = "README.md"
GENERATION_CONFIG = "generation_config.json"



class CheckpointError(UserError):
    """A checkpoint we cannot write or use; the message says what to do.

    Its own type so code that saves or loads checkpoints (and its tests) can
    tell a checkpoint problem from a bad flag; scripts print it like any UserError.
    """


# ---------------------------------------------------------------- small helpers


def _fsync_path(path: Path):
    """Flush a file or a folder entry to disk (so a rename after it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_json(data, **kwargs) -> str:
    """Strict JSON: a non-finite number is written as null, never as a bare NaN other parsers reject."""
    return json.dumps(runlog.strict(data), allow_nan=False, indent=2, **kwargs)


def write_json_atomic(path: Path, data):
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(to_json(data))
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

    action: kill (SIGKILL, the default), term (SIGTERM), int (SIGINT), stop
    (SIGSTOP: the process freezes there, holding what it holds, until killed
    or continued) or enospc (a write that fails as on a full disk). Stages: mid_step,
    mid_save, before_commit, before_prune. Unset, this does nothing.
    """
    for item in filter(None, os.environ.get("TRAIN_FAULT", "").split(",")):
        where, _, at = item.partition("@")
        action, _, where = where.rpartition(":")
        if where == stage and int(at) == step:
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            signals = {"": signal.SIGKILL, "kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT,
                       "stop": signal.SIGSTOP}
            os.kill(os.getpid(), signals[action])


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


def prepare_output_dir(out: Path, resume: bool, is_main: bool, log=print, lock=None):
    """Check ``out`` suits a new run or a resume, lock it (rank 0), clear crash leftovers; returns the lock."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is an existing file; pass a folder path")
    if not is_main:
        return None
    try:
        make_writable_dir(out)
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror}); "
                        "fix its permissions or pass another folder") from None
    lock = lock or lock_output_dir(out)  # before looking at its contents: another run may be changing them
    has_run = bool(list_checkpoints(out)) or (out / INDEX).exists()
    if resume and not list_checkpoints(out):
        raise UserError(f"--resume: no checkpoint in {out}; run without --resume to start training, "
                        "or pass the right --output-dir")
    if has_run and not resume:
        raise UserError(f"{out} already holds a training run; add --resume to continue it, or pass another --output-dir")
    removed = remove_leftovers(out)
    if removed:
        log(f"removed unfinished temporary files of an interrupted run: {', '.join(removed)}")
    return lock




# ---------------------------------------------------------------- what travels with the weights


def generation_config(model):
    """The model's generation config with infer.py's decoding defaults and the model's special token ids."""

    config = copy.deepcopy(model.generation_config)
    options = dict(models.GENERATION_DEFAULTS)
    if not options["do_sample"]:  # sampling knobs in a greedy config make transformers warn at every generate
        for knob in ("top_p", "top_k", "temperature"):
            options.pop(knob)
            setattr(config, knob, None)
    config.update(**options)
    config._from_model_config = False  # set by hand now: older transformers would rebuild a derived one from config.json
    for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(config, name, None) is None:
            setattr(config, name, getattr(model.config, name, None))
    return config


def training_data(train_file) -> dict:
    """What the model was trained on: card metadata and one line of prose.

    The DailyDialog corpus is recognised by the record data/download.py
    leaves beside it; anything else a user gave has a license we cannot know.
    """
    dailydialog = {"license": "cc-by-nc-sa-4.0", "datasets": ["roskoN/dailydialog"], "tags": ["dailydialog"],
                   "text": "DailyDialog (Li et al., IJCNLP 2017), fetched from the Hugging Face dataset roskoN/dailydialog. "
                           "Its license, CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike), carries over to this "
                           "model."}
    if not train_file:
        return {"license": "other", "license_name": "unknown", "text": "Unknown: the run did not record its training file."}
    path = Path(train_file).resolve()
    if path.parent == corpus.SAMPLE_DATA:
        return {"license": "other", "license_name": "project-demo-sample",
                "text": "the demo sample shipped with the code (data/sample): short dialogues written for the project, "
                        "free to use with its code. A demo, enough to see the pipeline work; not a useful chat model."}
    try:
        info = json.loads((path.parent / corpus.MANIFEST).read_text())  # written beside a verified corpus
    except (OSError, ValueError):
        info = {}
    if isinstance(info, dict) and "roskoN/dailydialog" in str(info.get("source", "")):
        return dailydialog
    return {"license": "other", "license_name": "unknown",
            "text": f"`{train_file}` (given with --train-file); its license is unknown here: check it before sharing this model."}


def base_model(name) -> tuple[str | None, str]:
    """(hub id for the card's base_model or None, how the weights began in words)."""
    if not name:
        return None, "a seq2seq model trained"
    if name == "scratch":
        return None, "a small T5 trained from scratch (random initialisation, tokenizer trained on the training text)"
    if not Path(name).exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return name, f"[{name}](https://huggingface.co/{name}) fine-tuned"
    return None, f"a model from the local folder `{Path(name).name}` fine-tuned"


def _number(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _loss_row(label: str, loss) -> str:
    if not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        return f"| {label} | n/a |"
    ppl = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past about 709
    return f"| {label} | {loss:.4f} (perplexity {_number(ppl, 2)}) |"


def metrics_table(metrics: dict | None, step: int) -> str:
    metrics = dict(metrics or {})
    rows = ["| metric | value |", "|---|---|", f"| optimizer steps | {metrics.pop('step', step)} |"]
    rows.append(_loss_row("validation loss (this checkpoint)", metrics.pop("val_loss", None)))
    best, best_step = metrics.pop("best_val_loss", None), metrics.pop("best_step", None)
    rows.append(_loss_row("best validation loss" + (f" (step {best_step})" if best_step is not None else ""), best))
    rows += [f"| {name} | {_number(value)} |" for name, value in metrics.items()]
    return "\n".join(rows)


def decoding_summary() -> str:
    d = models.GENERATION_DEFAULTS
    how = "sampling" if d["do_sample"] else "greedy" if d["num_beams"] == 1 else f"beam search ({d['num_beams']} beams)"
    repeats = f", no repeated {d['no_repeat_ngram_size']}-grams" if d["no_repeat_ngram_size"] else ""
    return f"up to {d['max_new_tokens']} new tokens, {how}{repeats}"


def model_card(run_config: dict, metrics: dict | None, step: int) -> str:
    """README.md of a checkpoint: Hugging Face metadata, the input format, a runnable example, metrics so far."""
    data = training_data(run_config.get("train_file"))
    base, origin = base_model(run_config.get("model"))
    header = {"license": data["license"]}
    if "license_name" in data:
        header["license_name"] = data["license_name"]
    if base:
        header["base_model"] = base
    if "datasets" in data:
        header["datasets"] = data["datasets"]
    header |= {"tags": ["t5", "dialogue", *data.get("tags", [])], "library_name": "transformers",
               "pipeline_tag": "text2text-generation"}
    name = f"{PREFIX}{step:08d}"
    example = [
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        f'path = "{name}"  # this folder',
        "tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path)",
        f'reply = model.generate(**tokenizer("{SEPARATOR}".join(["Hi , how are you ?", "Fine , thanks . And you ?"]), '
        'return_tensors="pt"))',
        "print(tokenizer.decode(reply[0], skip_special_tokens=True))",
    ]
    flags = ", ".join(f"{k} {run_config[k]}" for k in ("lr", "epochs", "max_steps", "max_length", "max_target_length", "seed")
                      if run_config.get(k) is not None)
    data_text = data["text"] + (" The base model's own license applies too." if base else "")
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# {name}

A dialogue model: given a conversation so far, it writes the next turn. The weights are {origin}
for {step} optimizer steps.

Training data: {data_text}

## Input

The conversation so far, oldest turn first and newest last, turns joined by `{SEPARATOR}`, then `</s>`
(the tokenizer adds it): `Hi , how are you ?{SEPARATOR}Fine , thanks . And you ?</s>`. Punctuation stands apart
as in DailyDialog. Training inputs held at most {run_config.get("max_length", 512)} tokens: drop the oldest turns
of longer conversations. `generation_config.json` holds the decoding defaults ({decoding_summary()}),
so a plain `generate` answers as the project's infer.py does.

## Use

Run from the folder that holds this one, or set `path` to this folder's full path:

```python
{chr(10).join(example)}
```

## Metrics

{metrics_table(metrics, step)}

Training flags: {flags or "not recorded"} (all of them in `{RUN_CONFIG}`).
"""


# ---------------------------------------------------------------- resuming a run's flags

# Fixed for the life of a run: typing another value with --resume is refused.
FIXED_ON_RESUME = {"model": "the weights and tokenizer come from it", "seed": "it decides data order and dropout noise",
                   "train_file": "the data plan is built from it", "val_share": "it decides which dialogues are held out",
                   "scratch_vocab_size": "the tokenizer is already trained"}
NOT_RECORDED = {"resume", "output_dir", "no_download"}  # about this invocation, not the run


def merge_resumed_flags(args, typed: set[str], recorded: dict, checkpoint: Path) -> set[str]:
    """Flags not typed now come from the run being resumed; typed ones must be changeable.

    Returns the flags whose typed value differs from the recorded one (typing
    the run's own value again changes nothing).
    """
    changed = {k for k in typed if k not in recorded or _as_recorded(getattr(args, k), k) != recorded[k]}
    for key, value in recorded.items():
        if key in NOT_RECORDED or not hasattr(args, key):
            continue
        if key not in typed:
            setattr(args, key, value)
        elif key in FIXED_ON_RESUME and value is not None and _as_recorded(getattr(args, key), key) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} cannot change on --resume ({FIXED_ON_RESUME[key]}): {checkpoint.name} was trained with "
                            f"{flag} {value}; drop the flag, or start a new run with another --output-dir")
    if "epochs" in changed and "max_steps" not in typed:
        args.max_steps = None  # --epochs typed now: the run's length is counted in epochs again
    return changed


def _as_recorded(value, key):
    return corpus.absolute(value) if key in ("train_file", "val_file") else value


# ---------------------------------------------------------------- saving


def save_checkpoint(output_dir, step: int, model, tokenizer, training_state: dict, run_config: dict,
                    metrics: dict | None = None) -> Path:
    """Write and commit ``checkpoint-<step>``; return its path.

    ``metrics`` (e.g. ``{"step": 30, "val_loss": 3.2, "best_val_loss": 3.1}``)
    go into the model card.
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
        writing = tmp / GENERATION_CONFIG
        # Written without save_pretrained's strict check, which would refuse to save a base model's
        # leftover beam settings (say early_stopping) that transformers only warns about at generate.
        generation_config(model).to_json_file(tmp / GENERATION_CONFIG, use_diff=True)
        writing = tmp / "tokenizer files"
        tokenizer.save_pretrained(tmp)
        fault("mid_save", step)
        writing = tmp / STATE
        torch.save(training_state, tmp / STATE)
        writing = tmp / RUN_CONFIG
        (tmp / RUN_CONFIG).write_text(to_json(run_config, sort_keys=True))
        writing = tmp / CARD
        (tmp / CARD).write_text(model_card(run_config, metrics, step))
        writing = tmp / MANIFEST
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: sha256(p) for p in files}}
        (tmp / MANIFEST).write_text(to_json(manifest))
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
    looks like a checkpoint. A non-finite best loss (a diverged run) means
    no best: nothing is kept or recommended for it.
    """
    output_dir = Path(output_dir)
    if best_loss is not None and not math.isfinite(best_loss):
        best, best_loss = None, None
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


# ---------------------------------------------------------------- random state


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's GPU only: a resume may run on a machine with fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by an older version: one state per GPU of that machine
        here = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[here] if here < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


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
