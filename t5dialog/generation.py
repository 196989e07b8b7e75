"""Decoding, shared by infer.py and eval.py: loading a checkpoint, the decoding flags, `generate`.

Every input is built by `dataset.encode_history`, the function training used,
so the model sees conversations in the format it learned.
"""

from __future__ import annotations

import argparse
import math
import threading
from pathlib import Path

import torch

from t5dialog import checkpoint as ckpt
from t5dialog import models
from t5dialog.batching import collate
from t5dialog.cli import UserError, finite_float
from t5dialog.dialogues import encode_history
from t5dialog.models import GENERATION_DEFAULTS

DEFAULT_DIR = "checkpoints"
# The model's scores are divided by --temperature (and by --repetition-penalty). Far below MIN_DIVISOR they overflow
# float32 to inf; past float32's largest number (3.4e38) the divisor is inf itself, and the -inf score of a token
# --no-repeat-ngram-size bans becomes NaN. Either way sampling fails on NaN probabilities. Nobody needs values
# beyond these: 0.001 is greedy in all but name, and 1000 makes every token about equally likely.
MIN_DIVISOR, MAX_DIVISOR = 1e-3, 1e3
# Each decoding option's range: (lowest, highest, how an error says it). More than 1000 beams is a slip, not a search:
# it asks for more memory than a machine has, and the kernel kills the process. Seeds are those the API has always
# taken (torch.manual_seed fails past 2**64).
RANGES = {
    "max_new_tokens": (1, math.inf, "at least 1"),
    "num_beams": (1, 1000, "from 1 to 1000"),
    "top_p": (math.ulp(0.0), 1, "in (0, 1]"),  # the smallest float above 0: a top-p of 0 keeps no token
    "top_k": (0, math.inf, "0 (no limit) or more"),
    "temperature": (MIN_DIVISOR, MAX_DIVISOR, f"from {MIN_DIVISOR:g} to {MAX_DIVISOR:g}"),
    "no_repeat_ngram_size": (0, math.inf, "0 (off) or more"),
    "repetition_penalty": (MIN_DIVISOR, MAX_DIVISOR, f"from {MIN_DIVISOR:g} to {MAX_DIVISOR:g}"),
    "seed": (0, 2**63 - 1, "in [0, 2**63)"),
}

# ---------------------------------------------------------------- loading


def load(path: Path, device, verified: bool = False):
    """Model (safetensors only, no remote code) and tokenizer of a checkpoint.

    ``verified``: `checkpoint.choose_checkpoint` already checked it (hashing a large model twice is wasted seconds).
    """
    from transformers.utils import logging as hf_logging

    problem = None if verified else ckpt.problem_of(path)
    if problem:
        ckpt.raise_damaged(path, problem)
    hf_logging.set_verbosity_error()  # loading reports go to our one-line errors instead
    hf_logging.disable_progress_bar()  # stderr stays quiet: a reply, or one line of error
    model, tokenizer = models.load_checkpoint(path)
    return model.to(device).eval(), tokenizer


def find_and_load(checkpoint, device, warn, output_dir=DEFAULT_DIR):
    """(path, model, tokenizer) of --checkpoint, else of the best or latest good checkpoint in ``output_dir``.

    Readers take no lock, so a running train.py may commit or prune
    checkpoints while one is chosen, verified and loaded here; when the
    folder's checkpoints changed meanwhile, a failure means "choose again", not "damaged".
    """
    folder = checkpoint or output_dir
    while True:
        before = ckpt.list_checkpoints(folder)
        try:
            path = ckpt.choose_checkpoint(checkpoint, output_dir, warn=warn)
            return (path, *load(path, device, verified=True))
        except UserError:
            if ckpt.list_checkpoints(folder) == before:  # nothing moved: the problem is real
                raise


def max_input_length(path: Path) -> int:
    """The input length the model was trained with (512 when unknown)."""
    return int(ckpt.read_run_config(path).get("max_length", 512))


# ---------------------------------------------------------------- generation


def add_generation_args(parser: argparse.ArgumentParser):
    """Decoding flags shared by infer.py and eval.py."""
    d = GENERATION_DEFAULTS
    a = parser.add_argument

    def ranged(name: str, text: str) -> str:  # the help text, and the range generation_options holds it to
        return f"{text}; {RANGES[name][2]}"

    a("--max-new-tokens", type=int, default=d["max_new_tokens"], help=ranged("max_new_tokens", "longest response, in tokens"))
    a("--num-beams", type=int, default=d["num_beams"], help=ranged("num_beams", "beam search width (1 = greedy or sampling)"))
    a("--do-sample", action="store_true", help="sample instead of picking the most likely token")
    a("--top-p", type=finite_float, default=d["top_p"],
      help=ranged("top_p", "nucleus sampling: keep the smallest token set with this probability"))
    a("--top-k", type=int, default=d["top_k"], help=ranged("top_k", "sampling: keep the k most likely tokens"))
    a("--temperature", type=finite_float, default=d["temperature"],
      help=ranged("temperature", "sampling temperature (lower = safer)"))
    a("--no-repeat-ngram-size", type=int, default=d["no_repeat_ngram_size"],
      help=ranged("no_repeat_ngram_size", "never repeat an n-gram of this size"))
    a("--repetition-penalty", type=finite_float, default=d["repetition_penalty"],
      help=ranged("repetition_penalty", "penalty for tokens already generated (1 = off)"))
    a("--seed", type=int, default=0, help=ranged("seed", "random seed for --do-sample"))


def generation_options(args) -> dict:
    """The decoding flags as keyword arguments for `generate`; checks their ranges (RANGES), --seed's too when given."""
    options = {k: getattr(args, k) for k in GENERATION_DEFAULTS}
    for name in ("top_p", "temperature", "repetition_penalty"):  # argparse and JSON (1e400) both let nan and inf through
        if not math.isfinite(options[name]):
            raise UserError(f"--{name.replace('_', '-')} {options[name]}: not a finite number; give one like the default, "
                            f"{GENERATION_DEFAULTS[name]}")
    for name, (lowest, highest, words) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not lowest <= value <= highest:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be {words}")
    return options


def generate_tokens(inputs: list[list[int]], model, tokenizer, device, **options) -> torch.Tensor:
    """`generate` on a batch of encoded inputs, each padded to the batch's longest: the output ids, one row each.

    The checkpoint's generation_config.json decides what ``options`` leaves out.
    """
    options = {k: v for k, v in options.items() if k not in models.unused_settings(options)}
    batch = models.to_device(collate([{"input_ids": ids} for ids in inputs], tokenizer.pad_token_id), device)
    with torch.no_grad():
        return model.generate(**batch, **options)


def decode(tokenizer, rows: torch.Tensor) -> list[str]:
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def generate_ids(inputs: list[list[int]], model, tokenizer, device, **options) -> list[str]:
    """The replies to a batch of encoded inputs (`generate_tokens`, decoded)."""
    return decode(tokenizer, generate_tokens(inputs, model, tokenizer, device, **options))


def generate_response(text, model, tokenizer, device, history=None, max_length=512, **options) -> str:
    """The model's reply to ``text`` after the earlier turns in ``history`` (`EmptyPrompt` when none holds text)."""
    ids = encode_history(tokenizer, list(history or []) + [text], max_length)
    return generate_ids([ids], model, tokenizer, device, **options)[0]


# ---------------------------------------------------------------- streaming


def stop_when(should_stop):
    """A stopping criterion for `generate`: every row ends at the next step once ``should_stop()`` is true."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


def stream_response(text, model, tokenizer, device, history=None, max_length=512, stop=None, **options):
    """Yield the reply `generate_response` gives, in pieces, as the model writes it.

    The pieces join to exactly that reply: the same `generate_ids` call runs
    in a worker thread with transformers' `TextIteratorStreamer`, and the
    reply's strip() is applied on the fly (leading whitespace dropped,
    trailing whitespace held back until more text follows it). Beam search
    cannot stream (the best beam is known only at the end): it comes as one piece.

    Closing the generator (a reader that left, Ctrl-C) stops the worker at
    its next token and waits for it, so the model is free when this returns;
    ``stop`` (a callable) can end it early too, checked once per token.
    """
    from transformers import TextIteratorStreamer

    ids = encode_history(tokenizer, list(history or []) + [text], max_length)
    cancelled = threading.Event()
    streamer = None
    if options.get("num_beams", model.generation_config.num_beams or 1) == 1:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    criteria = stop_when(lambda: cancelled.is_set() or (stop is not None and stop()))
    worker = _Worker([ids], model, tokenizer, device, dict(options, streamer=streamer, stopping_criteria=criteria))
    worker.start()
    pieces = ReplyPieces()
    try:
        for text in streamer if streamer is not None else ():
            if piece := pieces.add(text):
                yield piece
        worker.join()
        worker.raise_error()
        if not cancelled.is_set() and (rest := pieces.finish(worker.reply)):
            yield rest  # beam search's whole reply, or what was held back
    finally:
        cancelled.set()
        worker.join()


class ReplyPieces:
    """A streamer's text as pieces that join to the reply `generate_ids` gives, cut before the first ``stops`` string.

    The reply is strip()ped: leading whitespace is dropped, and trailing
    whitespace is held back until more text follows it. Text that may be the
    start of a stop string is held back until it is known not to be.
    """

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.received = self.sent = ""
        self.stopped = False  # a stop string came: the rest is not part of the reply

    def add(self, text: str) -> str:
        """The next piece to send ("" for none yet) after the streamer gave ``text``."""
        if self.stopped:
            return ""
        self.received += text
        visible = self.received.lstrip()
        cut = self.cut(visible)
        if cut is not None:
            self.stopped = True
            return self._send(visible[:cut].rstrip())
        ready = visible.rstrip()
        return self._send(ready[:len(ready) - self._maybe_stop(ready)].rstrip())

    def finish(self, reply: str) -> str:
        """What is left to send of ``reply``, the whole reply `generate_ids` gave."""
        return self._send(self.final(reply))

    def final(self, reply: str) -> str:
        cut = self.cut(reply)
        return reply if cut is None else reply[:cut].rstrip()

    def cut(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _maybe_stop(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _send(self, ready: str) -> str:
        if not ready.startswith(self.sent):  # the tokenizer changed earlier text: what was sent stays
            return ""
        piece, self.sent = ready[len(self.sent):], ready
        return piece


class _Worker(threading.Thread):
    """`generate_ids` in a thread, under the caller's autocast; keeps the reply or the error.

    Autocast is per thread: without carrying it over, ``--precision bf16``
    would silently generate in fp32 here.
    """

    def __init__(self, inputs, model, tokenizer, device, options):
        super().__init__(daemon=True)  # a Ctrl-C'd program must not wait for it at exit
        self.args = (inputs, model, tokenizer, device)
        self.options = options
        kind = torch.device(device).type
        self.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.reply, self.error = "", None

    def run(self):
        kind, enabled, dtype = self.autocast
        try:
            with torch.autocast(kind, dtype=dtype, enabled=enabled):
                self.reply = generate_ids(*self.args, **self.options)[0]
        except BaseException as e:  # handed to the reader's thread, which reports it
            self.error = e
            streamer = self.options.get("streamer")
            if streamer is not None:
                streamer.end()  # the reader would otherwise wait for text forever

    def raise_error(self):
        if self.error is not None:
            raise self.error
