"""Fuzzing the readers: whatever bytes a data file holds and whatever text a
user types, the result is usable examples or a one-line DataError, never a
crash. Inputs mix random bytes and text with what breaks parsers: control and
line-separator characters, NUL, right-to-left text, emoji, lone surrogates,
the tokenizer's special tokens, very long tokens and lines of about 1 MB, and
every kind of stray ``__eou__``.

Derandomized (the same examples on every run) so that the suite's result does
not depend on luck; widen max_examples locally to search further.
"""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dataset import EOU, DailyDialogDataset, DataError, encode_history, read_dialogues

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TRICKY = [
    EOU, f" {EOU} ", f"{EOU}{EOU}", "__eou", "eou__", "__EOU__", "_\u200b_eou__",
    "\n", "\r\n", "\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e", "\t", " ", "\u3000",
    "\x07", "\x1b[31m", "\x7f", "\ufeff", "\u200b", "\u200d", "\ufffd", "\uffff",
    "\u202e", "\u202d", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",  # RTL override, Hebrew, Arabic
    "\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f1fa\U0001f1f8", "\U0010ffff",
    "e\u0301", "\ufb01", "\u2126", "\u00df",  # combining mark and NFKC-changing characters
    "<pad>", "</s>", "<unk>", "<extra_id_0>", "\u2581", "Hi .", "How are you ?",
]
BREAKING = ["\x00", "\ud800", "\udfff", "\udcff"]  # NUL and lone surrogates: the file cannot be text
LONG_UNITS = ["a", "x ", "\u00e9", "\U0001f600", EOU, f"w{EOU}", "\u2028", " "]


@st.composite
def long_runs(draw):
    """A very long token or line: one unit repeated up to about 1 MB."""
    unit = draw(st.sampled_from(LONG_UNITS))
    size = draw(st.sampled_from([100, 5_000, 1_100_000]))  # characters of text in all
    return unit * max(1, size // len(unit))


safe_pieces = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12), st.characters(exclude_characters="\x00").map(str))
pieces = st.one_of(safe_pieces, st.sampled_from(BREAKING))
# At most one long run per text or file: memory grows with the tokens of a whole file.
texts = st.builds(lambda a, run, b: "".join(a) + run + "".join(b),
                  st.lists(pieces, max_size=12), st.one_of(st.just(""), long_runs()), st.lists(pieces, max_size=12))
turns = st.lists(safe_pieces, min_size=1, max_size=4).map("".join)
line_ends = st.sampled_from(["\n", "\r\n", "\r", f" {EOU}\n", f"{EOU}\n", f" {EOU} \n", f" {EOU}\r\n", f" {EOU}\r", "\u2028\n"])


@st.composite
def dialogue_files(draw):
    """Mostly well-formed DailyDialog text with tricky characters inside turns; now and then a 1 MB turn."""
    lines = [draw(st.lists(turns, max_size=5)) for _ in range(draw(st.integers(1, 6)))]
    if draw(st.booleans()):
        line = draw(st.sampled_from(lines))
        line.insert(draw(st.integers(0, len(line))), draw(long_runs()))
    text = "".join(f" {EOU} ".join(line) + draw(line_ends) for line in lines)
    return draw(st.sampled_from(["", "\ufeff"])) + text


@st.composite
def encoded(draw, text):
    codec = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "utf-32", "latin-1"]))  # utf-16/32 write a BOM
    return draw(text).encode(codec, "replace" if codec == "latin-1" else "surrogatepass")


raw_files = st.one_of(
    dialogue_files().map(lambda text: text.encode("utf-8")),
    dialogue_files().map(lambda text: text.encode("utf-8")),
    encoded(dialogue_files()),
    encoded(texts),
    st.binary(max_size=2_000),
    st.lists(st.one_of(st.binary(max_size=6), st.sampled_from([EOU.encode(), b"\n", b"\r\n", b"\xff", b"\xc3", b"\x00",
                                                               b" ", b"\xe2\x80\xa8", b"\xed\xa0\x80"])),
             max_size=40).map(b"".join),
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "dialogues.txt"


def assert_valid_ids(ids, tokenizer, max_length):
    assert isinstance(ids, list) and 1 <= len(ids) <= max_length
    assert all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)
    assert ids[-1] == tokenizer.eos_token_id


@FUZZ
@given(raw=raw_files)
def test_any_file_gives_valid_examples_or_a_data_error(raw, fuzz_file, tokenizer):
    fuzz_file.write_bytes(raw)
    try:
        dialogues, skipped = read_dialogues(fuzz_file)
        ds = DailyDialogDataset(tokenizer, fuzz_file, max_length=48, max_target_length=16)
    except DataError as e:
        event("DataError: " + str(e).split(": ", 1)[1][:30])
        assert str(fuzz_file) in str(e) and len(str(e).splitlines()) == 1
        return
    event(f"examples from a file of {len(raw) // 100_000 * 100} kB or more")
    assert dialogues and all(len(turns) >= 2 for turns in dialogues)
    for turn in (t for turns in dialogues for t in turns):
        assert turn and turn == " ".join(turn.split()) and EOU not in turn
    assert skipped == sorted(set(skipped)) and all(n >= 1 for n in skipped)
    assert len(ds) == sum(len(turns) - 1 for turns in dialogues) == ds.stats.pairs
    for example in ds.examples:
        assert_valid_ids(example["input_ids"], tokenizer, 48)
        assert_valid_ids(example["labels"], tokenizer, 16)


@FUZZ
@given(history=st.lists(texts, min_size=1, max_size=6), max_length=st.integers(1, 96))
def test_any_history_gives_a_valid_model_input(history, max_length, tokenizer):
    if not any(t.split() for t in history):
        with pytest.raises(ValueError, match="empty prompt"):
            encode_history(tokenizer, history, max_length)
        return
    assert_valid_ids(encode_history(tokenizer, history, max_length), tokenizer, max_length)
