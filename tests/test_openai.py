"""The OpenAI-style chat API (/v1/chat/completions, /v1/models), called with the official `openai` client."""

import json

import openai
import pytest
from serving import CPU, request, serving

from dataset import encode_history
from t5dialog.generation import generate_response
from t5dialog.models import GENERATION_DEFAULTS

MAX_LENGTH = 64
DEFAULTS = {**GENERATION_DEFAULTS, "max_new_tokens": 8}
CONVERSATION = [{"role": "user", "content": "Hello there ."}, {"role": "assistant", "content": "Hi , can I help you ?"},
                {"role": "user", "content": "What time is it ?"}]
HISTORY = [m["content"] for m in CONVERSATION]


@pytest.fixture(scope="module")
def server(tiny_model, loaded):
    with serving(loaded, tiny_model, DEFAULTS, MAX_LENGTH) as listener:
        yield listener


@pytest.fixture(scope="module")
def client(server):
    # trust_env=False: a proxy the user exported must not take a connection to 127.0.0.1
    return openai.OpenAI(base_url=f"{server.url}v1", api_key="unused", max_retries=0,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def expected(loaded, turns, **options):
    model, tokenizer = loaded
    return generate_response(turns[-1], model, tokenizer, CPU, history=turns[:-1], max_length=MAX_LENGTH,
                             **{**DEFAULTS, **options})


def api_reply(server, turns, **fields) -> str:
    status, _, body = request(server, "POST", "/api/reply", {"message": turns[-1], "history": turns[:-1], **fields})
    assert status == 200, body
    return json.loads(body)["reply"]


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_sync_and_streaming_calls_give_what_api_reply_gives(client, server, loaded):
    answer = client.chat.completions.create(model="anything", messages=CONVERSATION, max_tokens=12)
    text, chunks = streamed(client.chat.completions.create(model="anything", messages=CONVERSATION, max_tokens=12,
                                                           stream=True))
    want = api_reply(server, HISTORY, max_new_tokens=12)
    assert answer.choices[0].message.content == text == want == expected(loaded, HISTORY, max_new_tokens=12)
    assert answer.choices[0].message.role == "assistant" and answer.model == server.engine.checkpoint.name
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"


def test_usage_counts_the_tokens_read_and_written(client, loaded):
    _, tokenizer = loaded
    answer = client.chat.completions.create(model="t5", messages=CONVERSATION, max_completion_tokens=7)
    prompt = len(encode_history(tokenizer, HISTORY, MAX_LENGTH))
    assert answer.usage.prompt_tokens == prompt and answer.usage.completion_tokens == 7  # the tiny model never ends early
    assert answer.usage.total_tokens == prompt + 7 and answer.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="t5", messages=CONVERSATION, max_tokens=7, stream=True,
                                            stream_options={"include_usage": True})
    _, chunks = streamed(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_a_system_message_is_the_first_turn(client, loaded):
    messages = [{"role": "system", "content": "We are at a restaurant ."}, *CONVERSATION]
    answer = client.chat.completions.create(model="t5", messages=messages)
    assert answer.choices[0].message.content == expected(loaded, ["We are at a restaurant .", *HISTORY])


def test_a_stop_string_ends_the_reply_before_it(client, loaded):
    whole = expected(loaded, HISTORY, max_new_tokens=20)
    stop = whole.split()[2]  # a word inside the reply
    want = whole[:whole.index(stop)].rstrip()
    answer = client.chat.completions.create(model="t5", messages=CONVERSATION, max_tokens=20, stop=[stop])
    text, chunks = streamed(client.chat.completions.create(model="t5", messages=CONVERSATION, max_tokens=20, stop=stop,
                                                           stream=True))
    assert answer.choices[0].message.content == text == want
    assert answer.choices[0].finish_reason == "stop" == chunks[-1].choices[0].finish_reason


def test_a_stop_string_in_beam_search_is_a_stop(client, loaded):
    whole = expected(loaded, HISTORY, max_new_tokens=20, num_beams=2)
    stop = whole.split()[1]
    answer = client.chat.completions.create(model="t5", messages=CONVERSATION, max_tokens=20, stop=stop,
                                            extra_body={"num_beams": 2})
    assert answer.choices[0].message.content == whole[:whole.index(stop)].rstrip()
    assert answer.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible_and_temperature_0_is_greedy(client, loaded):
    fields = dict(model="t5", messages=CONVERSATION, temperature=1.5, seed=7, max_tokens=10)
    first = client.chat.completions.create(**fields).choices[0].message.content
    assert first == client.chat.completions.create(**fields).choices[0].message.content
    assert first == streamed(client.chat.completions.create(**fields, stream=True))[0]
    greedy = client.chat.completions.create(model="t5", messages=CONVERSATION, temperature=0, max_tokens=10)
    assert greedy.choices[0].message.content == expected(loaded, HISTORY, max_new_tokens=10)


def test_this_servers_own_options_come_as_extra_body(client, loaded):
    answer = client.chat.completions.create(model="t5", messages=CONVERSATION, max_tokens=10,
                                            extra_body={"num_beams": 3, "repetition_penalty": 1.3})
    want = expected(loaded, HISTORY, max_new_tokens=10, num_beams=3, repetition_penalty=1.3)
    assert answer.choices[0].message.content == want


def test_models_names_the_loaded_checkpoint(client, server):
    name = server.engine.checkpoint.name
    assert [m.id for m in client.models.list()] == [name] and client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


REFUSED = [
    (dict(n=2), "n"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(logprobs=True), "logprobs"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(temperature=3), "temperature"),
    (dict(temperature=1, extra_body={"repetition_penalty": 1e39}), "repetition_penalty"),
    (dict(temperature=1, extra_body={"top_k": -1}), "top_k"),  # its own name: one range check, one option per error
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
]


@pytest.mark.parametrize("fields, param", REFUSED)
def test_what_would_change_the_meaning_is_a_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="t5", messages=CONVERSATION, **fields)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize("messages, words", [
    ([], "messages"),
    ([{"role": "assistant", "content": "Hi"}], "the last message must be the user's"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user", "content": "   "}], "the last message"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "text"),
])
def test_bad_messages_are_a_400_saying_why(client, messages, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="t5", messages=messages)
    assert words in caught.value.body["message"]


def test_harmless_fields_are_accepted_and_text_parts_are_text(client, loaded):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What time "}, {"type": "text", "text": "is it ?"}]}]
    answer = client.chat.completions.create(model="whatever", messages=messages, user="u1", metadata={"k": "v"},
                                            response_format={"type": "text"}, n=1, store=False)
    assert answer.choices[0].message.content == expected(loaded, ["What time is it ?"])


def test_errors_outside_the_chat_are_in_openais_shape(server):
    status, _, body = request(server, "GET", "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = request(server, "POST", "/v1/chat/completions", b"{")
    assert status == 400 and "malformed JSON" in json.loads(body)["error"]["message"]
