"""The teacher-forced loss of a model on held-out pairs: train.py's validation loss and eval.py's perplexity.

Both come from one loop, `target_nll`, over training's own loss
(`models.token_loss_sum`), so the two numbers measure the same thing.
"""

from __future__ import annotations

import hashlib
import json

import torch

from t5dialog.batching import collate, token_budget_batches
from t5dialog.models import autocast, to_device, token_loss_sum


@torch.no_grad()
def target_nll(model, examples: list[dict], pad_id: int, batches: list[list[int]], device, precision: str = "fp32",
               world: int = 1) -> tuple[float, int]:
    """(summed negative log-likelihood, number of target tokens) of ``examples``, teacher-forced.

    ``batches``: this rank's lists of indices into ``examples``; with several
    ranks the sums are added up over all of them. Every target token counts,
    ``</s>`` included, padding not. Dropout is off meanwhile; the model's mode is restored.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed on the device: one sync at the end
    for b in batches:
        batch = to_device(collate([examples[i] for i in b], pad_id), device)
        with autocast(device, precision):
            totals[0] += token_loss_sum(model, batch).double()
        totals[1] += (batch["labels"] != -100).sum()
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    nll, tokens = totals.tolist()
    return nll, int(tokens)


def validation_loss(model, dataset, max_tokens: int, device, rank: int = 0, world: int = 1,
                    precision: str = "fp32") -> float:
    """Loss per target token of a `DailyDialogDataset`, in fixed batches of ``max_tokens`` padded tokens shared among ranks."""
    batches = token_budget_batches(dataset.src_lengths, dataset.tgt_lengths, max_tokens, seed=0, epoch=0)[rank::world]
    nll, tokens = target_nll(model, dataset.examples, dataset.pad_id, batches, device, precision, world)
    return nll / tokens


def validation_set_id(dataset) -> str:
    """A fingerprint of the examples a validation loss is measured on (file, split, tokenizer, lengths):
    losses measured on different sets are not comparable, so "best" holds only within one."""
    examples = [[e["input_ids"], e["labels"]] for e in dataset.examples]
    return hashlib.sha256(json.dumps(examples, separators=(",", ":")).encode()).hexdigest()
