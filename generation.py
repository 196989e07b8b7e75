"""Decoding, shared by infer.py and eval.py: finding and loading a checkpoint, the flags, `generate`.

Every input is built by `dataset.encode_history`, the function training used,
so the model sees conversations in the format it learned.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import checkpoint as ckpt
import models
from cli import UserError
from models import GENERATION_DEFAULTS

DEFAULT_DIR = "checkpoints"

# ---------------------------------------------------------------- loading


IN_FLIGHT = (ckpt.TMP_PREFIX + ckpt.PREFIX, ckpt.TRASH_PREFIX + ckpt.PREFIX)  # a running train.py's saves and prunes


def checkpoint_problem(path: Path) -> str | None:
    """None when ``path`` holds a complete model, else what is wrong with it (a few words)."""
    if path.name.startswith(IN_FLIGHT):
        return "a folder train.py is writing or deleting, not a checkpoint"
    if not (path / "config.json").is_file():
        return "config.json is missing"
    if not (path / "model.safetensors").is_file() and not any(path.glob("model-*.safetensors")):
        return "model.safetensors is missing"
    if (path / ckpt.MANIFEST).exists():  # train.py wrote it: every file must match its hash
        problem = ckpt.verify(path)
        return problem and problem.removeprefix(f"{path.name}: ")
    return None  # a save_pretrained folder: nothing recorded to check against


def refuse(path: Path, problem: str):
    raise UserError(f"checkpoint {path}: {problem}; pass another checkpoint with --checkpoint, or retrain")


def looks_like_checkpoint(path: Path) -> bool:
    """A model folder (to load or refuse) rather than an output dir (to pick from)."""
    name = path.name
    return ((path / "config.json").exists() or (path / ckpt.MANIFEST).exists() or name.startswith(IN_FLIGHT)
            or (name.startswith(ckpt.PREFIX) and name[len(ckpt.PREFIX):].isdigit()))


def candidates(output_dir: Path) -> list[Path]:
    """Checkpoints of an output dir in the order to try them: best, latest, then newest first.

    Only committed ``checkpoint-<step>`` folders count: the index is a hint
    (it may be stale or edited), and a running train.py's ``.tmp-*`` and
    ``.trash-*`` folders are half written or half deleted.
    """
    committed = ckpt.list_checkpoints(output_dir)
    by_name = {p.name: p for p in committed}
    index = ckpt.read_index(output_dir)
    named = [by_name[n] for n in (index.get("best"), index.get("latest")) if isinstance(n, str) and n in by_name]
    return list(dict.fromkeys(named + committed[::-1]))


def find_checkpoint(checkpoint=None, output_dir=DEFAULT_DIR, warn=None) -> Path:
    """--checkpoint DIR (a checkpoint, or an output dir), else the best, else the latest good one.

    A damaged checkpoint named directly is an error; in an output dir it is
    skipped for the next good one (as resuming does) and ``warn`` gets one
    line saying which and why.
    """
    path = Path(checkpoint or output_dir)
    if not path.is_dir():
        if checkpoint:
            raise UserError(f"--checkpoint {path}: no such folder; "
                            "pass a checkpoint folder such as checkpoints/checkpoint-00001000")
        raise UserError(f"no checkpoint found in {path}/; train one with `python train.py` or pass --checkpoint DIR")
    if looks_like_checkpoint(path):
        problem = checkpoint_problem(path)
        if problem:
            refuse(path, problem)
        return path
    skipped = []
    for candidate in candidates(path):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if skipped and warn:
                warn(f"warning: skipped {'; '.join(skipped)}; using {candidate.name}")
            return candidate
        skipped.append(f"{candidate.name}: {problem}")
    if skipped:
        raise UserError(f"no usable checkpoint in {path} ({'; '.join(skipped)}); pass a good one with --checkpoint, or retrain")
    raise UserError(f"{path} holds no model (no config.json and no checkpoint-* folder); "
                     "pass a checkpoint folder with --checkpoint, or train one with `python train.py`")


def load(path: Path, device, verified: bool = False):
    """Model (safetensors only, no remote code) and tokenizer of a checkpoint.

    ``verified``: `find_checkpoint` already checked it (hashing a large model twice is wasted seconds).
    """
    from transformers.utils import logging as hf_logging

    problem = None if verified else checkpoint_problem(path)
    if problem:
        refuse(path, problem)
    hf_logging.set_verbosity_error()  # loading reports go to our one-line errors instead
    hf_logging.disable_progress_bar()  # stderr stays quiet: a reply, or one line of error
    model, tokenizer = models.load_checkpoint(path)
    return model.to(device).eval(), tokenizer


def max_input_length(path: Path) -> int:
    """The input length the model was trained with (512 when unknown)."""
    return int(ckpt.read_run_config(path).get("max_length", 512))


# ---------------------------------------------------------------- generation


def add_generation_args(parser: argparse.ArgumentParser):
    """Decoding flags shared by infer.py and eval.py."""
    d = GENERATION_DEFAULTS
    a = parser.add_argument
    a("--max-new-tokens", type=int, default=d["max_new_tokens"], help="longest response, in tokens")
    a("--num-beams", type=int, default=d["num_beams"], help="beam search width (1 = greedy or sampling)")
    a("--do-sample", action="store_true", help="sample instead of picking the most likely token")
    a("--top-p", type=float, default=d["top_p"], help="nucleus sampling: keep the smallest token set with this probability")
    a("--top-k", type=int, default=d["top_k"], help="sampling: keep the k most likely tokens")
    a("--temperature", type=float, default=d["temperature"], help="sampling temperature (lower = safer)")
    a("--no-repeat-ngram-size", type=int, default=d["no_repeat_ngram_size"], help="never repeat an n-gram of this size (0 = off)")
    a("--repetition-penalty", type=float, default=d["repetition_penalty"], help="penalty for tokens already generated (1 = off)")
    a("--seed", type=int, default=0, help="random seed for --do-sample")


def generation_options(args) -> dict:
    """The decoding flags as keyword arguments for `generate`; checks their ranges."""
    options = {k: getattr(args, k) for k in GENERATION_DEFAULTS}
    if options["max_new_tokens"] < 1 or options["num_beams"] < 1:
        raise UserError("--max-new-tokens and --num-beams must be at least 1")
    if not 0 < options["top_p"] <= 1 or options["temperature"] <= 0 or options["top_k"] < 0:
        raise UserError("--top-p must be in (0, 1], --temperature above 0 and --top-k not negative")
    if options["no_repeat_ngram_size"] < 0 or options["repetition_penalty"] <= 0:
        raise UserError("--no-repeat-ngram-size cannot be negative and --repetition-penalty must be above 0")
    return options


def generate_ids(inputs: list[list[int]], model, tokenizer, device, **options) -> list[str]:
    """Decode a batch of encoded inputs, each padded to the batch's longest."""
    options = {**GENERATION_DEFAULTS, **options}
    if not options["do_sample"]:  # sampling knobs would only trigger library warnings
        for k in ("top_p", "top_k", "temperature"):
            options.pop(k)
    longest = max(len(ids) for ids in inputs)
    input_ids = torch.full((len(inputs), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(inputs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **options)
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


