"""The DailyDialog text format: reading files, (history -> response) pairs, the model input.

The DailyDialog text format is one dialogue per line, every turn followed by
``__eou__`` ("end of utterance"):

    Hi , how are you ? __eou__ Fine , thanks . And you ? __eou__ Not bad . __eou__

Every turn after the first becomes a training target. Its model input is the
turns before it (both speakers), oldest first, most recent last, joined by
`` __eou__ `` and ended by ``</s>``::

    input : "Hi , how are you ? __eou__ Fine , thanks . And you ?</s>"
    target: "Not bad .</s>"

When the history does not fit ``max_length`` tokens, whole turns are dropped
from the left (oldest first); if the newest turn alone is too long, its
beginning is cut so that its end (the part nearest the reply) is kept.
`encode_history` builds that input, and both training and ``infer.py`` call
it, so the model sees the same format in both.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from t5dialog.cli import UserError

EOU = "__eou__"
SEPARATOR = f" {EOU} "  # between turns in the model input; the format above
_BOMS = [("utf-32", b"\xff\xfe\x00\x00"), ("utf-32", b"\x00\x00\xfe\xff"),  # byte order marks, UTF-32 first (its LE
         ("utf-16", b"\xff\xfe"), ("utf-16", b"\xfe\xff")]  # mark starts with UTF-16 LE's); Windows' "Unicode" is UTF-16


class EmptyPrompt(UserError, ValueError):
    """A message to answer that holds no text. A ValueError too: what `encode_history` refuses."""


class DataError(UserError):
    """A data file we cannot use; the message names the file and the fix.

    Its own type because `DailyDialogDataset` users may want to tell bad data
    from other mistakes; scripts print it like any `UserError`.
    """


# ---------------------------------------------------------------- parsing


def split_lines(text: str) -> list[str]:
    """The lines of a DailyDialog file: split on "\\n", CRLF and a lone "\\r" only.

    `str.splitlines` also splits on U+2028, U+0085, form feeds and other
    separators that can occur inside a turn; that would cut a dialogue in
    two, mis-count the corpus' label lines and drop text. Trailing blank
    lines are dropped so that counts match the label files.
    """
    lines = re.split("\r\n|\r|\n", text)  # Python's universal newlines: a lone "\r" ends lines on old Macs
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _export_format(text: str, lines: list[str]) -> str | None:
    """JSON or CSV around DailyDialog text, whose '"}' or '",3' would become turns (most of 100 lines), or None."""
    def parses(t):
        try:
            return t.lstrip()[:1] in ("{", "[") and json.loads(t) is not None
        except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
            return False
    def quoted(line):  # a field opened by a quote before the first __eou__ and closed right after the last
        tail = line.rpartition(EOU)[2].strip()  # in DailyDialog text (quotes, commas and all) it is empty
        return tail[:1] == '"' and tail[1:].lstrip()[:1] in ("", ",", ";", "\t") and \
            re.search('(?:^|[,;\t])\\s*"', line.partition(EOU)[0]) is not None
    sample = [line for line in lines[:1000] if EOU in line][:100]
    tests = (("JSON lines", parses), ("CSV", quoted))
    return "JSON" if parses(text) else next((n for n, test in tests if sum(map(test, sample)) * 2 > len(sample)), None)


@dataclass(frozen=True)
class DialogueFile:
    """A DailyDialog file read once: its dialogues, the lines skipped, and the sha256 of the very bytes parsed.

    Read once and passed on, so a file replaced while a run starts cannot
    give the run two versions (one tokenized, another hashed or split).
    """

    path: Path
    dialogues: list[list[str]] = field(repr=False)
    skipped: list[int] = field(repr=False)
    sha256: str


def read_dialogues(path) -> tuple[list[list[str]], list[int]]:
    """Read a DailyDialog file into dialogues (lists of turns).

    Returns ``(dialogues, skipped)`` where ``skipped`` holds the 1-based
    numbers of non-blank lines that had fewer than two turns (no pair to
    learn from). Tolerates a BOM, UTF-16/32 with a BOM, CRLF or lone CR line ends, runs of spaces,
    blank lines and a missing final ``__eou__``; any whitespace inside a turn becomes one space.
    """
    file = dialogue_file(path)
    return file.dialogues, file.skipped


def dialogue_file(source) -> DialogueFile:
    """``source`` as a `DialogueFile`: read (see `read_dialogues`) unless it already is one."""
    if isinstance(source, DialogueFile):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path (see --help for the defaults)")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a DailyDialog text file; pass the .txt file")
    if not path.is_file():  # a FIFO would block until a writer comes, and a pipe is empty the second time it is read
        raise DataError(f"{path}: not a regular file (a pipe or a device); save the dialogues to a file and pass that")
    try:
        raw = path.read_bytes()
    except OSError as e:  # unreadable (permissions, I/O error): the user can fix it, no traceback
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); check that it is a readable file") from None
    encoding = next((e for e, bom in _BOMS if raw.startswith(bom)), "utf-8-sig")  # -sig: drops a UTF-8 BOM
    if b"\x00" in raw[:4096] and encoding == "utf-8-sig":  # UTF-8 text never holds NUL bytes
        raise DataError(f"{path}: looks like a binary file, not DailyDialog text; pass the .txt file")
    if not raw.strip():
        raise DataError(f"{path}: file is empty; give a DailyDialog file (one dialogue per line, turns ended by {EOU})")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = len(split_lines(raw[: e.start].decode(encoding, "replace") + "x"))  # + "x": count the error's line
        raise DataError(f"{path}: line {line} is not valid {encoding.upper().removesuffix('-SIG')}; re-save as UTF-8") from None
    if EOU not in text:
        raise DataError(f"{path}: no '{EOU}' anywhere, so this is not DailyDialog format "
                        f"(one dialogue per line, every turn followed by '{EOU}')")
    lines = split_lines(text)
    if export := _export_format(text, lines):
        raise DataError(f"{path}: looks like {export}, not DailyDialog text: export one dialogue per line as plain text, "
                        f"every turn followed by ' {EOU}' (no quotes, braces or other columns)")
    dialogues, skipped = [], []
    for number, line in enumerate(lines, start=1):
        turns = [t for t in (" ".join(t.split()) for t in line.split(EOU)) if t]
        if not turns:
            continue  # blank line
        if len(turns) < 2:
            skipped.append(number)
            continue
        dialogues.append(turns)
    if not dialogues:
        raise DataError(f"{path}: no dialogue with two or more turns; nothing to learn from")
    return DialogueFile(path, dialogues, skipped, hashlib.sha256(raw).hexdigest())


def holdout(num_dialogues: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) dialogue indices: a seeded share of whole dialogues held out.

    Whole dialogues, so no validation reply was seen in training as context.
    """
    k = min(max(1, round(share * num_dialogues)), num_dialogues - 1)
    held = set(random.Random(seed).sample(range(num_dialogues), k))
    return [i for i in range(num_dialogues) if i not in held], sorted(held)


class Pairs(Sequence):
    """``(history, reply)`` of every turn after the first, made when asked for: a list would copy a dialogue's
    earlier turns once per turn (21 GB for 73,000 turns). ``max_turns``: keep that many turns before the reply."""

    def __init__(self, dialogues: list[list[str]], max_turns: int | None = None):
        self.dialogues, self.max_turns = dialogues, max_turns
        self.index = [(d, i) for d, turns in enumerate(dialogues) for i in range(1, len(turns))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        d, i = self.index[k]
        return self.dialogues[d][max(0, i - (self.max_turns or i)) : i], self.dialogues[d][i]


dialogue_pairs = Pairs  # every turn after the first as a target, with all turns before it


# ---------------------------------------------------------------- model input


def separator_ids(tokenizer) -> list[int]:
    return tokenizer(SEPARATOR.strip(), add_special_tokens=False)["input_ids"]


def assemble_input(turn_ids: list[list[int]], sep_ids: list[int], eos_id: int, max_length: int, end: int | None = None):
    """Join tokenized turns with the separator, keeping the newest that fit.

    Returns ``(input_ids, truncated)``. Oldest turns go first; the newest turn is never dropped, only cut
    from its start when it alone is too long. ``end``: use ``turn_ids[:end]``, not copied (quadratic).
    """
    end = len(turn_ids) if end is None else end
    budget = max_length - 1  # room for </s>
    kept: list[list[int]] = []
    used = 0
    for j in range(end - 1, -1, -1):
        cost = len(turn_ids[j]) + (len(sep_ids) if kept else 0)
        if used + cost > budget:
            break
        kept.append(turn_ids[j])
        used += cost
    truncated = len(kept) < end
    if not kept:  # the newest turn alone is too long: keep its end
        kept = [turn_ids[end - 1][len(turn_ids[end - 1]) - budget :]] if budget > 0 else [[]]
        truncated = True
    out: list[int] = []
    for ids in reversed(kept):
        if out:
            out.extend(sep_ids)
        out.extend(ids)
    out.append(eos_id)
    return out, truncated


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def as_text(text: str) -> str:
    """Text the tokenizer takes: bytes that were not UTF-8 become U+FFFD.

    Python hands undecodable bytes of the command line and of a terminal in
    the C locale over as lone surrogates, which the tokenizer refuses with a TypeError.
    """
    return _LONE_SURROGATE.sub("\ufffd", text)


def check_prompt(text) -> str:
    """``text``, refused (`EmptyPrompt`) when it holds nothing but whitespace: the one check of an empty message."""
    if not text.split():
        raise EmptyPrompt('empty prompt: give some text to answer, e.g. "How are you?"')
    return text


def encode_history(tokenizer, history: list[str], max_length: int = 512) -> list[int]:
    """Token ids of the model input for a conversation so far (newest last).

    The one function that defines the input format; `DailyDialogDataset`
    does the same in batches. Very long text is cut on characters first so
    that a 100,000-character prompt does not cost a long tokenization.
    """
    check_prompt(" ".join(history))  # some turn must hold text; empty ones are dropped
    char_cap = max_length * 16  # far more characters than max_length tokens need
    turns = [as_text(" ".join(t.split())[-char_cap:]) for t in history]
    turns = [t for t in turns if t]
    turn_ids = tokenizer(turns, add_special_tokens=False)["input_ids"]
    ids, _ = assemble_input(turn_ids, separator_ids(tokenizer), tokenizer.eos_token_id, max_length)
    return ids


def encode_target(ids: list[int], eos_id: int, max_target_length: int) -> list[int]:
    """Target ids cut to ``max_target_length`` tokens, always ending in </s>."""
    return ids[: max_target_length - 1] + [eos_id]

