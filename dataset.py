"""DailyDialogDataset: a DailyDialog file as tokenized (history -> response) examples.

The text format (one dialogue per line, every turn followed by ``__eou__``)
and the model input built from it (`encode_history`) live in
`t5dialog.dialogues`; batching by token budget in `t5dialog.batching`. Their
names are re-exported here, so ``from dataset import encode_history, collate``
works as it always did::

    input : "Hi , how are you ? __eou__ Fine , thanks . And you ?</s>"
    target: "Not bad .</s>"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from t5dialog.batching import batch_cost, collate, collated_steps, padding_efficiency, token_budget_batches
from t5dialog.dialogues import (
    EOU,
    SEPARATOR,
    DataError,
    DialogueFile,
    Pairs,
    as_text,
    assemble_input,
    dialogue_file,
    dialogue_pairs,
    encode_history,
    encode_target,
    holdout,
    read_dialogues,
    separator_ids,
    split_lines,
)

__all__ = ["DailyDialogDataset", "DatasetStats", "load_datasets", "EOU", "SEPARATOR", "DataError", "DialogueFile", "Pairs",
           "as_text", "assemble_input", "dialogue_file", "dialogue_pairs", "encode_history", "encode_target", "holdout",
           "read_dialogues", "split_lines", "batch_cost", "collate", "collated_steps", "padding_efficiency",
           "token_budget_batches"]

@dataclass
class DatasetStats:
    dialogues: int
    pairs: int
    skipped_lines: list[int]
    truncated_inputs: int
    truncated_targets: int
    input_lengths: list[int] = field(repr=False)
    target_lengths: list[int] = field(repr=False)

    def summary(self) -> str:
        def pct(values):
            s = sorted(values)
            return "/".join(str(s[min(len(s) - 1, int(q * len(s)))]) for q in (0.5, 0.9, 0.99)) + f"/{s[-1]}"

        skipped = f"{len(self.skipped_lines)} skipped lines"
        if self.skipped_lines:
            skipped += " (e.g. line " + ", ".join(map(str, self.skipped_lines[:5])) + ": fewer than 2 turns)"
        return (f"{self.dialogues:,} dialogues, {self.pairs:,} pairs, {skipped}, "
                f"{self.truncated_inputs} truncated inputs, {self.truncated_targets} truncated targets; "
                f"tokens p50/p90/p99/max: input {pct(self.input_lengths)}, target {pct(self.target_lengths)}")


class DailyDialogDataset(torch.utils.data.Dataset):
    """(history -> response) pairs of a DailyDialog file, tokenized once.

    ``ds.examples[i]``: unpadded ``{"input_ids", "labels"}`` lists for `collate`; ``ds[i]``: tensors padded to max_length
    / max_target_length, with attention_mask, for torch's DataLoader (made when asked, never stored); ``ds.pairs[i]``: text.
    """

    def __init__(self, tokenizer, path, max_length: int = 512, max_target_length: int = 128, dialogue_ids=None):
        """``path``: a DailyDialog file, or the `DialogueFile` already read from it (a run reads each file once).
        ``dialogue_ids``: use only these dialogues of the file (by index), e.g. a held-out share."""
        source = dialogue_file(path)
        self.path = source.path
        self.max_length, self.max_target_length = max_length, max_target_length
        dialogues, skipped = source.dialogues, source.skipped
        if dialogue_ids is not None:
            dialogues = [dialogues[i] for i in dialogue_ids]
        self.sha256 = source.sha256  # of the bytes parsed: what a resumed run checks it still has
        self.pairs = Pairs(dialogues, max_turns=max_length)  # more turns never fit: each costs a separator

        # Tokenize each distinct turn once, in one batched call of the fast
        # tokenizer; pairs then only assemble lists of ids.
        turns = [t for d in dialogues for t in d]
        turn_ids = tokenizer(turns, add_special_tokens=False)["input_ids"]
        sep_ids, eos = separator_ids(tokenizer), tokenizer.eos_token_id
        self.examples = []
        truncated_inputs = truncated_targets = 0
        start = 0
        for d in dialogues:
            ids = turn_ids[start : start + len(d)]
            start += len(d)
            for i in range(1, len(d)):
                input_ids, cut = assemble_input(ids, sep_ids, eos, max_length, end=i)
                labels = encode_target(ids[i], eos, max_target_length)
                truncated_inputs += cut
                truncated_targets += len(ids[i]) + 1 > max_target_length
                self.examples.append({"input_ids": input_ids, "labels": labels})
        self.pad_id = tokenizer.pad_token_id  # for collate
        self.stats = DatasetStats(dialogues=len(dialogues), pairs=len(self.examples), skipped_lines=skipped,
                                  truncated_inputs=truncated_inputs, truncated_targets=truncated_targets,
                                  input_lengths=[len(e["input_ids"]) for e in self.examples],
                                  target_lengths=[len(e["labels"]) for e in self.examples])

    @property
    def src_lengths(self) -> list[int]:
        return self.stats.input_lengths

    @property
    def tgt_lengths(self) -> list[int]:
        return self.stats.target_lengths

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return {k: v[0] for k, v in collate([self.examples[i]], self.pad_id, self.max_length, self.max_target_length).items()}


def load_datasets(args, tokenizer, train=None, val=None):
    """Training and validation sets; without a validation file, a seeded share of whole dialogues is held out.

    ``train``/``val``: the `DialogueFile` already read from args.train_file/args.val_file, else they are read now.
    """
    lengths = (args.max_length, args.max_target_length)
    train = dialogue_file(train or args.train_file)
    if args.val_file:
        return (DailyDialogDataset(tokenizer, train, *lengths),
                DailyDialogDataset(tokenizer, val or args.val_file, *lengths))
    if len(train.dialogues) < 2:
        raise DataError(f"{args.train_file}: one dialogue cannot be split into training and validation; "
                        "pass --val-file or use more dialogues")
    train_ids, val_ids = holdout(len(train.dialogues), args.val_share, args.seed)
    return (DailyDialogDataset(tokenizer, train, *lengths, dialogue_ids=train_ids),
            DailyDialogDataset(tokenizer, train, *lengths, dialogue_ids=val_ids))
