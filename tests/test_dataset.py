"""Parsing, pairing, truncation, batching: dataset.py on small hand-made files."""

import collections
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dataset import (EOU, DailyDialogDataset, DataError, assemble_input, batch_cost, collate, dialogue_pairs,
                     encode_history, padding_efficiency, read_dialogues, split_lines, token_budget_batches)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def write(tmp_path, content, name="d.txt", mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# ---------------------------------------------------------------- parsing


def test_parses_turns_and_tolerates_messy_formatting(tmp_path):
    raw = ("\ufeffHi  there . __eou__ Hello   , friend . __eou__\r\n"
           "\r\n"
           "How are you ? __eou__ Fine . __eou__ Good to hear\r\n")  # no final __eou__
    dialogues, skipped = read_dialogues(write(tmp_path, raw.encode("utf-8"), mode="wb"))
    assert dialogues == [["Hi there .", "Hello , friend ."], ["How are you ?", "Fine .", "Good to hear"]]
    assert skipped == []


def test_single_turn_lines_are_skipped_and_counted(tmp_path):
    dialogues, skipped = read_dialogues(write(tmp_path, "A . __eou__ B . __eou__\nalone . __eou__\nC . __eou__ D . __eou__\n"))
    assert len(dialogues) == 2
    assert skipped == [2]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e"])
def test_line_separators_inside_a_turn_stay_in_that_turn(tmp_path, separator):
    # str.splitlines() breaks lines at these; a DailyDialog line ends at "\n" only.
    raw = f"Hi{separator}there . __eou__ Hello . __eou__\nalone . __eou__\nA . __eou__ B . __eou__\n"
    dialogues, skipped = read_dialogues(write(tmp_path, raw.encode("utf-8"), mode="wb"))
    assert dialogues == [["Hi there .", "Hello ."], ["A .", "B ."]]
    assert skipped == [2]  # line numbers count "\n" lines only


def test_split_lines_splits_on_newline_and_crlf_only():
    assert split_lines("a\u2028b\r\nc\x85d\n\n e \n \n\n") == ["a\u2028b", "c\x85d", "", " e "]


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (b"   \n\n", ["empty"]),
    (b"just some text\nwith no markers\n", ["no '__eou__'", "not DailyDialog"]),
    (b"\x00\x01\x02\x89PNG\x00" * 50, ["binary"]),
    (b"Hi . __eou__ Yo . __eou__\n" * 3 + b"bad \xff\xfe bytes __eou__ x __eou__\n", ["line 4", "UTF-8"]),
])
def test_unusable_files_are_errors_that_name_the_file(tmp_path, content, words):
    path = write(tmp_path, content, mode="wb")
    with pytest.raises(DataError) as e:
        read_dialogues(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_a_file_that_cannot_be_read_is_an_error():
    # /proc/self/mem exists but reading it from offset 0 fails (EIO), as a damaged disk or a
    # permission problem would (root ignores permissions, so they cannot stand in for it here).
    with pytest.raises(DataError, match="cannot be read"):
        read_dialogues("/proc/self/mem")


def test_a_pipe_or_a_device_is_refused_without_reading_it(tmp_path):
    """The file is read several times (check, dataset, hash): a FIFO hung the first read, a pipe is empty the next."""
    fifo = tmp_path / "dialogues.fifo"
    os.mkfifo(fifo)
    for path in (Path("/dev/null"), fifo):  # /dev/null first: without the check the FIFO would hang this test
        with pytest.raises(DataError, match="not a regular file"):
            read_dialogues(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dialogues(tmp_path / "nope.txt")


def test_every_turn_after_the_first_is_a_target_with_all_earlier_turns():
    pairs = dialogue_pairs([["a", "b", "c"], ["x", "y"]])
    assert pairs == [(["a"], "b"), (["a", "b"], "c"), (["x"], "y")]


# ---------------------------------------------------------------- model input


def test_assemble_drops_oldest_turns_first_and_keeps_the_newest():
    turns = [[10, 11, 12], [20, 21], [30, 31, 32]]
    sep, eos = [5], 1
    full, cut = assemble_input(turns, sep, eos, max_length=100)
    assert full == [10, 11, 12, 5, 20, 21, 5, 30, 31, 32, 1] and not cut
    # Room for the two newest turns only: the oldest goes, in whole.
    two, cut = assemble_input(turns, sep, eos, max_length=7)
    assert two == [20, 21, 5, 30, 31, 32, 1] and cut
    # The newest turn alone is too long: keep its end, never drop it.
    tail, cut = assemble_input(turns, sep, eos, max_length=3)
    assert tail == [31, 32, 1] and cut


def test_encode_history_uses_the_documented_format(tokenizer):
    ids = encode_history(tokenizer, ["Hi there .", "Hello ."], max_length=512)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"Hi there . {EOU} Hello ."


def test_encode_history_cuts_a_huge_prompt_from_the_left(tokenizer):
    text = "old words " * 10_000 + "the newest question ?"  # 100,000+ characters
    ids = encode_history(tokenizer, [text], max_length=64)
    assert len(ids) == 64
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("the newest question ?")


def test_encode_history_refuses_an_empty_prompt(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        encode_history(tokenizer, ["   "])


def test_dataset_examples_match_encode_history_and_stats(tokenizer, tmp_path):
    path = write(tmp_path, "Hi . __eou__ Hello , how are you ? __eou__ Great , thanks a lot . __eou__\nsolo __eou__\n")
    ds = DailyDialogDataset(tokenizer, path, max_length=512, max_target_length=4)
    assert len(ds) == 2
    # Training input is exactly what inference builds for the same history.
    assert ds[1]["input_ids"] == encode_history(tokenizer, ["Hi .", "Hello , how are you ?"])
    # Targets are cut to max_target_length and end with </s>.
    full = tokenizer("Great , thanks a lot .", add_special_tokens=False)["input_ids"]
    assert ds[1]["labels"] == full[:3] + [tokenizer.eos_token_id]
    s = ds.stats
    assert (s.dialogues, s.pairs, s.skipped_lines, s.truncated_targets) == (1, 2, [2], 2)
    assert "1 skipped lines" in s.summary() and "p50/p90/p99/max" in s.summary()


def test_dataset_counts_truncated_inputs(tokenizer, tmp_path):
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    line = " __eou__ ".join(f"turn {w} has several words" for w in words) + " __eou__\n"
    ds = DailyDialogDataset(tokenizer, write(tmp_path, line), max_length=24)
    assert max(len(e["input_ids"]) for e in ds.examples) <= 24
    assert ds.stats.truncated_inputs > 0
    last = tokenizer.decode(ds[len(ds) - 1]["input_ids"], skip_special_tokens=True)
    assert last.endswith("turn eleven has several words")  # the newest turn survives


# ---------------------------------------------------------------- batching


def test_collate_pads_inputs_and_masks_labels_with_minus_100():
    batch = collate([{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [8, 1], "labels": [9, 9, 9, 1]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [8, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [9, 9, 9, 1]]


def random_lengths(n=500, seed=1):
    import random

    r = random.Random(seed)
    return [r.randint(3, 300) for _ in range(n)], [r.randint(2, 60) for _ in range(n)]


def test_bucketed_batches_cover_each_example_once_within_the_budget():
    src, tgt = random_lengths()
    for epoch in range(3):
        batches = token_budget_batches(src, tgt, max_tokens=2048, seed=7, epoch=epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(src)))  # exactly once
        assert all(batch_cost(src, tgt, b) <= 2048 for b in batches)


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    src, tgt = random_lengths()
    a = token_budget_batches(src, tgt, 2048, seed=3, epoch=1)
    assert a == token_budget_batches(src, tgt, 2048, seed=3, epoch=1)
    assert a != token_budget_batches(src, tgt, 2048, seed=3, epoch=2)
    assert a != token_budget_batches(src, tgt, 2048, seed=4, epoch=1)


def test_bucketing_pads_far_less_than_random_batches():
    src, tgt = random_lengths()
    bucketed = token_budget_batches(src, tgt, 2048, seed=0, epoch=0)
    sizes = [len(b) for b in bucketed]
    import random

    order = list(range(len(src)))
    random.Random(0).shuffle(order)
    shuffled, k = [], 0
    for n in sizes:  # same batch sizes, random membership
        shuffled.append(order[k : k + n])
        k += n
    assert padding_efficiency(src, tgt, bucketed) > padding_efficiency(src, tgt, shuffled) + 0.2


def test_an_oversized_example_still_gets_its_own_batch():
    batches = token_budget_batches([10, 900, 12], [5, 50, 5], max_tokens=100, seed=0, epoch=0)
    assert collections.Counter(i for b in batches for i in b) == {0: 1, 1: 1, 2: 1}
