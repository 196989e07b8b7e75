"""Parsing, pairing, truncation, batching: dataset.py on small hand-made files."""

import codecs
import collections
import json
import os
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import NO_REAL_DAILYDIALOG, REAL_DAILYDIALOG, SAMPLE
from transformers import AutoTokenizer

from dataset import (
    EOU,
    DailyDialogDataset,
    DataError,
    assemble_input,
    batch_cost,
    collate,
    dialogue_pairs,
    encode_history,
    padding_efficiency,
    read_dialogues,
    split_lines,
    token_budget_batches,
)

REAL_FILES = [pytest.param(folder, name, id=f"{label}/{name}")
              for label, folder in (("sample", SAMPLE), ("dailydialog", REAL_DAILYDIALOG))
              for name in ("train.txt", "validation.txt")]


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


def test_split_lines_splits_on_newline_crlf_and_a_lone_cr_only():
    assert split_lines("a\u2028b\r\nc\x85d\n\n e \n \n\n") == ["a\u2028b", "c\x85d", "", " e "]
    assert split_lines("a\rb\r\rc\r\nd\ne\r") == ["a", "b", "", "c", "d", "e"]


def test_old_mac_line_ends_are_lines(tmp_path):
    # A lone "\r" ended lines on classic Mac OS; read as one line, 60 dialogues became one.
    raw = "A . __eou__ B . __eou__\ralone . __eou__\r\rC\u2028c . __eou__ D . __eou__\r"
    dialogues, skipped = read_dialogues(write(tmp_path, raw.encode("utf-8"), mode="wb"))
    assert dialogues == [["A .", "B ."], ["C c .", "D ."]]
    assert skipped == [2]


def test_a_bad_byte_is_reported_on_its_line_whatever_the_line_ends(tmp_path):
    path = write(tmp_path, b"A . __eou__ B . __eou__\r" * 3 + b"bad \xff __eou__ x __eou__\r", mode="wb")
    with pytest.raises(DataError, match="line 4 is not valid UTF-8"):
        read_dialogues(path)


@pytest.mark.parametrize("codec, bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                        ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE)])
def test_utf16_and_utf32_with_a_bom_are_read(tmp_path, codec, bom):
    # Windows' Notepad saves "Unicode" as UTF-16 with a BOM; its NUL bytes once made it "a binary file".
    text = "Hi \u00e9t\u00e9 \U0001f600 . __eou__ Hello . __eou__\r\nalone . __eou__\r\nA . __eou__ B . __eou__\r\n" * 400
    dialogues, skipped = read_dialogues(write(tmp_path, bom + text.encode(codec), mode="wb"))
    assert dialogues == read_dialogues(write(tmp_path, text.encode("utf-8"), name="u8.txt", mode="wb"))[0]
    assert len(dialogues) == 800 and dialogues[0] == ["Hi \u00e9t\u00e9 \U0001f600 .", "Hello ."]
    assert skipped[:2] == [2, 5]


def test_broken_utf16_names_its_encoding_and_line(tmp_path):
    good = "A . __eou__ B . __eou__\n".encode("utf-16-le") * 2
    raw = codecs.BOM_UTF16_LE + good + b"\x00\xdc" + "x __eou__".encode("utf-16-le")  # a lone low surrogate
    with pytest.raises(DataError, match="line 3 is not valid UTF-16; re-save as UTF-8"):
        read_dialogues(write(tmp_path, raw, mode="wb"))


def export_lines(kind, dialogues):
    if kind == "JSON lines":
        return "".join(json.dumps({"id": i, "dialog": d}) + "\n" for i, d in enumerate(dialogues))
    if kind == "JSON":
        return json.dumps([{"dialog": d} for d in dialogues], indent=2)
    if kind == "CSV":
        return "id,dialog,emotion\n" + "".join(f'{i},"{d}",{i % 7}\n' for i, d in enumerate(dialogues))
    return "".join(f'"{d}"\n' for d in dialogues)  # one quoted column, no header


@pytest.mark.parametrize("kind, name", [("JSON lines", "JSON lines"), ("JSON", "JSON"), ("CSV", "CSV"),
                                        ("quoted", "CSV")])
def test_json_and_csv_exports_of_dailydialog_text_are_refused(tmp_path, kind, name):
    # Read as DailyDialog, each line's closing '"}' or '",3' became a reply to learn.
    dialogues = [f'Hi , "you" {i} . {EOU} Hello , {{friend}} . {EOU}' for i in range(30)]
    path = write(tmp_path, export_lines(kind, dialogues))
    with pytest.raises(DataError) as e:
        read_dialogues(path)
    message = str(e.value)
    assert message.startswith(f"{path}: looks like {name}, not DailyDialog text") and "one dialogue per line" in message
    assert len(message.splitlines()) == 1


def test_dailydialog_text_with_quotes_commas_and_braces_is_not_an_export(tmp_path):
    lines = ['{ laughs } Hi , " you " . __eou__ He said , " fine , " . __eou__',
             '" Yard sale " , she said . __eou__ It \u2019 s $ 5,900 . __eou__ ... " Okay " , " sure " __eou__',
             '[ 1 ] , [ 2 ] __eou__ {"a": 1} __eou__',
             'No final marker __eou__ " Nice , " he said']
    dialogues, _ = read_dialogues(write(tmp_path, "\n".join(lines) + "\n"))
    assert len(dialogues) == 4


@pytest.mark.parametrize("folder, name", REAL_FILES)
def test_real_dailydialog_files_are_read_in_full(folder, name):
    if folder is None:
        pytest.skip(NO_REAL_DAILYDIALOG)
    path = folder / name
    dialogues, skipped = read_dialogues(path)
    assert len(dialogues) + len(skipped) == len(path.read_text(encoding="utf-8").split("\n")) - 1


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
    assert list(pairs) == [(["a"], "b"), (["a", "b"], "c"), (["x"], "y")]
    assert len(pairs) == 3 and pairs[-1] == (["x"], "y") and pairs[1:] == [(["a", "b"], "c"), (["x"], "y")]


def long_dialogue(tmp_path, turns):
    return write(tmp_path, " __eou__ ".join(f"turn {i} says hi" for i in range(turns)) + " __eou__\n", name=f"long{turns}.txt")


def test_a_long_dialogue_takes_memory_in_proportion_to_its_examples(tokenizer, tmp_path):
    # Copying each turn's history made memory and time grow with the square of a dialogue's
    # length: 21.7 GB for one line of 73,000 turns. Each input holds at most max_length ids, so
    # the dataset needs a fixed number of bytes per (example, token); 83 here, 830 before.
    path = long_dialogue(tmp_path, 3000)
    tracemalloc.start()
    try:
        ds = DailyDialogDataset(tokenizer, path, max_length=16, max_target_length=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds) == 2999
    assert peak < 200 * len(ds) * 16


def test_pairs_of_a_long_dialogue_keep_the_turns_an_input_can_hold(tokenizer, tmp_path):
    ds = DailyDialogDataset(tokenizer, long_dialogue(tmp_path, 60), max_length=16, max_target_length=8)
    turns = read_dialogues(ds.path)[0][0]
    assert len(ds.pairs) == len(ds) == 59
    assert ds.pairs[2] == (turns[:3], turns[3])  # pair k answers turn k + 1
    assert ds.pairs[58] == (turns[59 - 16 : 59], turns[59])  # never more turns than max_length tokens can hold
    for k, (history, _) in enumerate(ds.pairs):  # so the model input is the same as from the whole history
        whole = encode_history(tokenizer, turns[: k + 1], 16)
        assert encode_history(tokenizer, history, 16) == whole == ds.examples[k]["input_ids"]


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
    assert ds.examples[1]["input_ids"] == encode_history(tokenizer, ["Hi .", "Hello , how are you ?"])
    # Targets are cut to max_target_length and end with </s>.
    full = tokenizer("Great , thanks a lot .", add_special_tokens=False)["input_ids"]
    assert ds.examples[1]["labels"] == full[:3] + [tokenizer.eos_token_id]
    s = ds.stats
    assert (s.dialogues, s.pairs, s.skipped_lines, s.truncated_targets) == (1, 2, [2], 2)
    assert "1 skipped lines" in s.summary() and "p50/p90/p99/max" in s.summary()


def test_dataset_counts_truncated_inputs(tokenizer, tmp_path):
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    line = " __eou__ ".join(f"turn {w} has several words" for w in words) + " __eou__\n"
    ds = DailyDialogDataset(tokenizer, write(tmp_path, line), max_length=24)
    assert max(len(e["input_ids"]) for e in ds.examples) <= 24
    assert ds.stats.truncated_inputs > 0
    last = tokenizer.decode(ds.examples[-1]["input_ids"], skip_special_tokens=True)
    assert last.endswith("turn eleven has several words")  # the newest turn survives


# ---------------------------------------------------------------- batching


def test_collate_pads_inputs_and_masks_labels_with_minus_100():
    batch = collate([{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [8, 1], "labels": [9, 9, 9, 1]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [8, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [9, 9, 9, 1]]


def test_the_seed_snippet_batches_with_torchs_dataloader(tokenizer, tmp_path, monkeypatch):
    # The seed's own usage: unpadded lists stopped the default collate ("each element in list of
    # batch should be of equal size"). Items are padded tensors now, built when asked for.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "".join(f"Hi {i} . __eou__ Hello , how are you ? __eou__ Fine {'very ' * i}. __eou__\n" for i in range(5)),
          name="dialogues_text.txt")
    from torch.utils.data import DataLoader

    ds = DailyDialogDataset(tokenizer, "dialogues_text.txt", max_length=512)
    loader = DataLoader(ds, batch_size=2, shuffle=True)
    rows = []
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(batch["labels"]), 512)
        assert batch["labels"].shape[1] == 128
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            n, m = int(mask.sum()), int((labels != -100).sum())
            assert mask[:n].all() and not mask[n:].any() and (ids[n:] == tokenizer.pad_token_id).all()
            assert (labels[:m] != -100).all() and (labels[m:] == -100).all()
            rows.append((ids[:n].tolist(), labels[:m].tolist()))
    assert len(rows) == len(ds) == 10 and len(next(iter(loader))["labels"]) == 2
    assert sorted(rows) == sorted((e["input_ids"], e["labels"]) for e in ds.examples)


def test_collate_refuses_padded_items(tokenizer, tmp_path):
    # Padded rows all look full: collate would attend to every pad. The suite batches ds.examples.
    ds = DailyDialogDataset(tokenizer, write(tmp_path, "Hi . __eou__ Hello . __eou__\n"), max_length=32)
    with pytest.raises(TypeError, match=r"ds.examples\[i\]"):
        collate([ds[0]], ds.pad_id)
    assert torch.equal(collate(ds.examples, ds.pad_id, 32, 128)["labels"], ds[0]["labels"][None])


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
