"""The run's plan: which batches make each optimizer step, how many steps there are, and the learning rate at each.

All of it is a pure function of the flags, the data and (seed, epoch): ranks
agree without talking, and a resumed run recomputes the same plan.
"""

from __future__ import annotations

from t5dialog.batching import token_budget_batches
from t5dialog.cli import UserError


def epoch_plan(train_ds, args, epoch: int, world: int, start: int = 0) -> list[list[list[int]]]:
    """The epoch's optimizer steps from its batch ``start`` on, each a list of batches for all ranks.

    With several ranks the tail that does not divide evenly is dropped so
    every rank takes the same number of steps.
    """
    batches = token_budget_batches(train_ds.src_lengths, train_ds.tgt_lengths, args.max_tokens, args.seed, epoch)[start:]
    batches = batches[: len(batches) - len(batches) % world]  # from any start: a resume may change the world size
    per_step = args.grad_accum * world
    return [batches[i : i + per_step] for i in range(0, len(batches), per_step)]


def plan_key(args, train_ds) -> dict:
    """What the batch plan depends on; a run stopped mid-epoch resumes only against the same."""
    return {"train_sha256": train_ds.sha256, "pairs": len(train_ds), "max_tokens": args.max_tokens,
            "max_length": args.max_length, "max_target_length": args.max_target_length, "seed": args.seed}


def total_steps(args, train_ds, world: int) -> int:
    # Epochs differ slightly in length (batches are filled greedily after a
    # shuffle), so count each epoch's steps from its own plan.
    per_epoch = [len(epoch_plan(train_ds, args, e, world)) for e in range(args.epochs)]
    if 0 in per_epoch:
        raise UserError(f"{train_ds.path} makes fewer batches than the {world} processes: use more data, "
                        "fewer processes or a smaller --max-tokens")
    return args.max_steps or sum(per_epoch)


def schedule_position(train_ds, args, epoch: int, batch: int, world: int) -> int:
    """The schedule's step at batch ``batch`` of ``epoch`` with this run's step size: the steps its plan takes
    before that point, so that the steps left after it are exactly the plan's from there on."""
    done_epochs = sum(len(epoch_plan(train_ds, args, e, world)) for e in range(epoch))
    this_epoch = len(epoch_plan(train_ds, args, epoch, world)) - len(epoch_plan(train_ds, args, epoch, world, start=batch))
    return done_epochs + this_epoch


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: 0 -> 1 over the warmup, then linearly back to 0 at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def lr_at(step: int, offset: int, args, total: int) -> float:
    """The rate at step number ``step``; the schedule counts ``step - offset`` of ``total - offset``."""
    step, total = step - offset, total - offset
    return args.lr * lr_factor(step, int(args.warmup_ratio * total), total)
