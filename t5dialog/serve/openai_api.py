"""The OpenAI-style chat API: what a POST /v1/chat/completions body may say, and the shapes of its answers.

The conversation is the `messages` list: every user and assistant message is
a turn of the dialogue history, oldest first, and a system (or developer)
message is a turn too, where it stands: a T5 dialogue model has no separate
instructions, it reads the conversation so far. The last message must be the
user's: it is the one answered.

Decoding: without `temperature` or `top_p` a request gets the server's
defaults (greedy, as `python infer.py` answers); `temperature` 0 is greedy,
and a `temperature` above 0 or a `top_p` samples. `max_tokens` (or
`max_completion_tokens`), `seed` and `stop` mean what they mean in OpenAI's
API; this server's own decoding options (`top_k`, `num_beams`,
`no_repeat_ngram_size`, `repetition_penalty`) are accepted too, as the
client's `extra_body`. A field that would change the answer's meaning and
that this server does not do (`n` > 1, tools, logprobs, a JSON
response_format, penalties, logit_bias) is a 400 naming it, never ignored.
"""

from __future__ import annotations

import time
import uuid

from t5dialog.dialogues import EmptyPrompt, check_prompt
from t5dialog.serve.request import Ask, BadRequest, decoding_options, fits, parse_json

ROLES = {"system", "developer", "user", "assistant"}
HARMLESS = {"model", "user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key"}
OURS = {"top_k", "num_beams", "no_repeat_ngram_size", "repetition_penalty"}
KNOWN = {"messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
         "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format",
         "frequency_penalty", "presence_penalty", "logit_bias"} | HARMLESS | OURS
MAX_STOPS = 4


def parse_chat(body: bytes, defaults: dict) -> Ask:
    """A /v1/chat/completions body, checked, or BadRequest naming the field at fault."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise BadRequest(400, 'the body must be a JSON object with "messages"')
    if unknown := sorted(set(data) - KNOWN):
        raise BadRequest(400, f"unrecognized field(s): {', '.join(unknown)}", unknown[0])
    data = {k: v for k, v in data.items() if v is not None}  # null means "not given"
    refuse_unsupported(data)
    history = turns(data.get("messages"))
    message = history.pop()
    options, seed = decoding_options(sampling_fields(data, defaults), defaults, {"max_new_tokens": "max_tokens"})
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, '"stream" must be true or false', "stream")
    usage = data.get("stream_options", {})
    if not isinstance(usage, dict) or not isinstance(usage.get("include_usage", False), bool):
        raise BadRequest(400, '"stream_options" must be an object such as {"include_usage": true}', "stream_options")
    return Ask(message, history, options, seed, stream, stops(data.get("stop")), usage.get("include_usage", False))


def refuse_unsupported(data: dict):
    def refuse(field, what):
        raise BadRequest(400, f"{field}: {what} is not supported by this server", field)

    if data.get("n", 1) != 1:
        refuse("n", "more than one choice")
    for field in ("tools", "functions", "logit_bias"):
        if data.get(field):
            refuse(field, field.replace("_", " "))
    for field in ("tool_choice", "function_call"):
        if data.get(field, "none") != "none":
            refuse(field, "calling tools")
    if data.get("logprobs") or data.get("top_logprobs"):
        refuse("logprobs", "returning log probabilities")
    form = data.get("response_format", {"type": "text"})
    if not (isinstance(form, dict) and form.get("type") == "text"):
        refuse("response_format", "a response format other than text")
    for field in ("frequency_penalty", "presence_penalty"):
        if data.get(field, 0) != 0:
            refuse(field, f"a nonzero {field.replace('_', ' ')} (repetition_penalty is this server's own)")


def turns(messages) -> list[str]:
    """The dialogue history the messages make, the last (the user's) included."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, '"messages" must be a non-empty list such as [{"role": "user", "content": "Hi"}]', "messages")
    history = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(400, f"messages[{i}]: the role must be one of {', '.join(sorted(ROLES))}", "messages")
        history.append(content_text(message.get("content"), i))
    if messages[-1]["role"] != "user":
        raise BadRequest(400, "the last message must be the user's: it is the one answered", "messages")
    try:
        check_prompt(history[-1])
    except EmptyPrompt as e:
        raise BadRequest(400, f"the last message: {e}", "messages") from None
    return history


def content_text(content, i: int) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(400, f"messages[{i}].content must be text (a string or text parts)", "messages")


def sampling_fields(data: dict, defaults: dict) -> dict:
    """The request's fields in this server's option names: OpenAI's temperature 0 is greedy, sampling otherwise."""
    fields = {name: data[name] for name in OURS | {"top_p", "seed"} if name in data}
    if "max_completion_tokens" in data or "max_tokens" in data:
        fields["max_tokens"] = data.get("max_completion_tokens", data.get("max_tokens"))
    temperature = data.get("temperature")
    if temperature is not None and not (fits(temperature, float) and 0 <= temperature <= 2):
        raise BadRequest(400, '"temperature" must be a number from 0 to 2', "temperature")
    if temperature == 0:
        fields["do_sample"] = False
    elif temperature is not None or "top_p" in data:
        fields["do_sample"] = True
        fields["temperature"] = defaults["temperature"] if temperature is None else temperature
    return fields


def stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    value = [value] if isinstance(value, str) else value
    if not (isinstance(value, list) and len(value) <= MAX_STOPS and all(isinstance(s, str) and s for s in value)):
        raise BadRequest(400, f'"stop" must be a string or a list of up to {MAX_STOPS} non-empty strings', "stop")
    return tuple(value)


# ---------------------------------------------------------------- answers


def error_body(code: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if code < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Completion:
    """The id, time and model every object of one answer shares."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_entry(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "t5-dailydialog"}


def model_list(entry: dict) -> dict:
    return {"object": "list", "data": [entry]}
