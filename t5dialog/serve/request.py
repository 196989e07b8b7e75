"""What a POST /api/reply body may say, checked: the message, the history, stream, the decoding options.

Every problem is a `BadRequest` with the HTTP status and one line that names
the field and what it must be. The decoding options' ranges are the CLI's
own (`generation.generation_options`), reported in the API's field names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

from t5dialog.cli import UserError
from t5dialog.dialogues import EmptyPrompt, check_prompt
from t5dialog.files import first_line
from t5dialog.generation import generation_options

MAX_NEW_TOKENS, MAX_BEAMS = 1024, 8  # per request (or the server's own defaults, if higher): one request cannot hog the model
OPTION_TYPES = {"max_new_tokens": int, "num_beams": int, "do_sample": bool, "top_p": float, "top_k": int,
                "temperature": float, "no_repeat_ngram_size": int, "repetition_penalty": float, "seed": int}
FIELDS = ("message", "history", "stream", *OPTION_TYPES)
KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def limits(defaults: dict) -> dict:
    """The largest max_new_tokens and num_beams a request may ask for."""
    return {"max_new_tokens": max(MAX_NEW_TOKENS, defaults["max_new_tokens"]), "num_beams": max(MAX_BEAMS, defaults["num_beams"])}


class BadRequest(Exception):
    """A request the server will not answer: the HTTP status, one line, and the field at fault (for the OpenAI shape)."""

    def __init__(self, code: int, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclasses.dataclass
class Ask:
    """A request, checked: what to answer, after which turns, and how."""

    message: str
    history: list[str]
    options: dict  # every decoding option, the server's defaults filled in
    seed: int | None = None
    stream: bool = False
    stops: tuple[str, ...] = ()
    include_usage: bool = False  # OpenAI's stream_options


def parse_json(body: bytes):
    """The body as JSON, or BadRequest; NaN and Infinity, which JSON does not have, are refused."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest(400, "the body is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"malformed JSON: {first_line(e)}") from None


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(body: bytes, defaults: dict) -> Ask:
    """A POST /api/reply body, checked, or BadRequest saying what is wrong."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise BadRequest(400, 'the body must be a JSON object, e.g. {"message": "Hi"}')
    if unknown := sorted(set(data) - set(FIELDS)):
        raise BadRequest(400, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    data = {k: v for k, v in data.items() if v is not None}  # null means "not given"
    message, history, stream = data.get("message"), data.get("history", []), data.get("stream", False)
    if not isinstance(message, str):
        raise BadRequest(400, '"message" must be text, e.g. {"message": "Hi"}')
    try:
        check_prompt(message)  # before the request waits for the model
    except EmptyPrompt as e:
        raise BadRequest(400, f'"message": {e}') from None
    if not isinstance(history, list) or not all(isinstance(turn, str) for turn in history):
        raise BadRequest(400, '"history" must be a list of strings (the earlier turns, oldest first)')
    if not isinstance(stream, bool):
        raise BadRequest(400, '"stream" must be true or false')
    options, seed = decoding_options(data, defaults)
    return Ask(message, history, options, seed, stream)


def decoding_options(data: dict, defaults: dict, names: dict | None = None) -> tuple[dict, int | None]:
    """(options, seed) from the fields of ``data`` named as in OPTION_TYPES, or as ``names`` maps them."""
    names = names or {}
    options = dict(defaults)
    for option, kind in OPTION_TYPES.items():
        field = names.get(option, option)
        if field in data:
            value = data[field]
            if not fits(value, kind):
                raise BadRequest(400, f'"{field}" must be {KIND_WORDS[kind]}', field)
            options[option] = float(value) if kind is float else value
    seed = options.pop("seed", None)
    check_options(options, defaults, seed, names)
    return options, seed


def fits(value, kind) -> bool:
    """JSON's true is not the integer 1 here, and 2 is a fine float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int) or (kind is float and isinstance(value, float))


def check_options(options: dict, defaults: dict, seed, names: dict):
    """The CLI's range checks (generation_options), in the API's names; and the server's own ceilings."""
    def field(flag: str) -> str:
        option = flag.replace("-", "_")
        return names.get(option, option)

    try:
        generation_options(argparse.Namespace(**options, seed=seed))
    except UserError as e:
        flag = re.search(r"--([a-z-]+)", str(e))
        raise BadRequest(400, re.sub(r"--([a-z-]+)", lambda m: field(m.group(1)), str(e)),
                         field(flag.group(1)) if flag else None) from None
    for name, ceiling in limits(defaults).items():
        if options[name] > ceiling:
            raise BadRequest(400, f"{field(name)} {options[name]} is above this server's limit of {ceiling}", field(name))
