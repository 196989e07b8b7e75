"""Batches by token budget: which examples go together, padded how, and prepared ahead on a GPU.

`token_budget_batches` is a pure function of (seed, epoch), so a resumed or
distributed run recomputes the same order without saving sampler state.
"""

from __future__ import annotations

import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch


def collate(examples: list[dict], pad_id: int, src_length: int = 0, tgt_length: int = 0) -> dict:
    """Pad a batch to its own longest input and target (labels with -100), or to the given lengths if longer.

    Examples without labels (inputs to generate from) give ``input_ids`` and ``attention_mask`` only.
    """
    if not isinstance(examples[0]["input_ids"], list):  # padded tensors would all look full: every pad attended to
        raise TypeError("collate takes unpadded examples (ds.examples[i]), not the padded tensors of ds[i]")
    src = max(src_length, *(len(e["input_ids"]) for e in examples))
    input_ids = torch.full((len(examples), src), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), src), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention_mask[row, : len(e["input_ids"])] = 1
    if "labels" not in examples[0]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    tgt = max(tgt_length, *(len(e["labels"]) for e in examples))
    labels = torch.full((len(examples), tgt), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_cost(src_lengths, tgt_lengths, batch) -> int:
    """Padded tokens a batch costs: rows x (longest input + longest target)."""
    return len(batch) * (max(src_lengths[i] for i in batch) + max(tgt_lengths[i] for i in batch))


def token_budget_batches(src_lengths, tgt_lengths, max_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches: similar lengths together, each example exactly once.

    A pure function of ``(seed, epoch)`` (and the lengths), so a resumed or
    distributed run recomputes the same order without saving sampler state.
    Examples are shuffled, then sorted by input length in coarse buckets and
    by target length inside a bucket, so that both the input and the target
    of a batch pad little; batches fill up to ``max_tokens`` padded tokens
    and are then shuffled so an epoch does not go from short to long.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(src_lengths)))
    rng.shuffle(order)  # random tie-breaking between equal lengths
    bucket = 8  # input tokens per bucket: coarse enough to group targets too
    order.sort(key=lambda i: (src_lengths[i] // bucket, tgt_lengths[i]))
    batches, current, src_max, tgt_max = [], [], 0, 0
    for i in order:
        s, t = max(src_max, src_lengths[i]), max(tgt_max, tgt_lengths[i])
        if current and (len(current) + 1) * (s + t) > max_tokens:
            batches.append(current)
            current, s, t = [], src_lengths[i], tgt_lengths[i]
        current.append(i)
        src_max, tgt_max = s, t
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def padding_efficiency(src_lengths, tgt_lengths, batches) -> float:
    """Real tokens / padded tokens processed (1.0 means no padding)."""
    real = sum(src_lengths[i] + tgt_lengths[i] for b in batches for i in b)
    padded = sum(batch_cost(src_lengths, tgt_lengths, b) for b in batches)
    return real / max(padded, 1)


def collated_steps(steps, ds, rank: int, world: int, device):
    """(step's batches, this rank's collated micro-batches) for each of ``steps``.

    On CUDA a thread collates the next steps into pinned memory while the GPU
    runs the current one, so the GPU never waits for the host; on CPU the
    cores are busy with the model, so collation stays inline.
    """
    def make(step_batches):
        batches = [collate([ds.examples[i] for i in b], ds.pad_id) for b in step_batches[rank::world]]
        if device.type == "cuda":
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return step_batches, batches

    if device.type != "cuda":
        yield from (make(s) for s in steps)
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = deque(pool.submit(make, s) for s in steps[:2])
        for s in steps[2:]:
            yield ahead.popleft().result()
            ahead.append(pool.submit(make, s))
        while ahead:
            yield ahead.popleft().result()
