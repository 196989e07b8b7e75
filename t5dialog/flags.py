"""train.py's flags: what they mean, how they are checked, and what a resumed run keeps.

Every flag is recorded in each checkpoint's run_config.json. With --resume,
flags not typed come from there; typed ones apply from the resumed step on,
except the few that define the run (FIXED_ON_RESUME), which are refused.
A length typed with --resume (--epochs or --max-steps) replaces the recorded
one, even when it is the same number or the default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from t5dialog import models, training_files
from t5dialog.cli import OneLineParser, UserError, add_device_arg, add_precision_arg, check_positive, finite_float, float_flag


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description="Fine-tune T5 on DailyDialog with a plain PyTorch loop.")
    a = p.add_argument
    a("--model", default=models.DEFAULT_MODEL, help="hub name or local folder of a seq2seq model; "
                                                    "'scratch' trains a small T5 from scratch")
    a("--train-file", default=None, help="DailyDialog training file; without it, data/dailydialog/train.txt (downloaded "
                                         "when the hub answers), else the demo sample")
    a("--val-file", default=None, help="validation file; without it, validation.txt beside the training file, "
                                       "else --val-share of it")
    a("--val-share", type=finite_float, default=0.05,
      help="with no validation file, hold out this share of whole dialogues (seeded)")
    a("--no-download", action="store_true", help="never download the corpus; without data/dailydialog train on the demo sample")
    a("--output-dir", default="checkpoints", help="where checkpoints, metrics.jsonl and the loss plot go")
    a("--resume", action="store_true", help="continue from the newest good checkpoint in --output-dir")
    a("--epochs", type=int, default=3, help="passes over the training data; typed with --resume, it replaces the run's "
                                            "length, a recorded --max-steps included")
    a("--max-steps", type=int, default=None, metavar="N",
      help="stop when the step counter reaches N (overrides --epochs). One step is one optimizer step of whatever size "
           "(--grad-accum x processes): a resumed run counts on from its checkpoint's step number, so N is the last "
           "step's number whatever the world size or --grad-accum; the learning rate reaches 0 there")
    a("--lr", type=finite_float, default=5e-4, help="peak learning rate of AdamW")
    a("--weight-decay", type=finite_float, default=0.01, help="AdamW weight decay (not applied to biases and layer norms)")
    a("--warmup-ratio", type=finite_float, default=0.05, help="share of all steps spent warming the learning rate up from 0")
    a("--max-tokens", type=int, default=2048, help="token budget of a batch: rows x (longest input + longest target)")
    a("--grad-accum", type=int, default=1, help="batches whose gradients are summed before one optimizer step")
    a("--max-grad-norm", type=float_flag, default=1.0, help="clip the gradient norm to this value (0 or inf disables)")
    a("--max-length", type=int, default=512, help="input tokens; older turns are dropped first")
    a("--max-target-length", type=int, default=128, help="target tokens; longer responses are cut")
    a("--eval-every", type=int, default=500, help="validation loss every N steps (and at each epoch end)")
    a("--save-every", type=int, default=500, help="checkpoint every N steps (and at each epoch end)")
    a("--keep", type=int, default=2, help="keep the newest K checkpoints (the best is kept too)")
    a("--log-every", type=int, default=10, help="log loss, lr, grad norm and tokens/s every N steps")
    a("--seed", type=int, default=42, help="seed of initialisation, data order and dropout")
    add_device_arg(p)
    add_precision_arg(p)
    a("--attention", choices=("auto", "eager", "sdpa"), default="auto",
      help="attention kernel: auto = sdpa on CUDA, eager on CPU (where fast dropout brings its own; sdpa turns that off)")
    a("--compile", action="store_true", help="torch.compile the model (on a 2-core CPU it measured slower; see bench/README.md)")
    a("--fast-dropout", action=argparse.BooleanOptionalAction, default=True,
      help="on CPU, draw dropout masks 64 bits per 4 elements instead of one call each (fast_dropout.py; 1.3x faster here)")
    a("--scratch-vocab-size", type=int, default=8000, help="largest vocabulary of the tokenizer trained for --model scratch "
                                                             "(a small text gives fewer tokens)")
    a("--eval-generate", type=int, default=0, help="at the end, generate for the first N validation pairs and write eval metrics")
    a("--log-examples", action="store_true", help="debug: record each step's example indices in metrics.jsonl")
    return p


def parse(argv) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and which of them the user typed."""
    return build_parser().parse_args(argv), typed_flags(argv)


def typed_flags(argv) -> set[str]:
    """The flags the user actually typed (so --resume can reuse the others)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


SEED_LIMIT = 2**32


def check_args(args):
    """Refuse contradictory or impossible settings before any work starts."""
    check_positive(args, "lr", "epochs", "max_steps", "max_tokens", "grad_accum", "eval_every", "save_every", "keep",
                   "log_every", "max_length", "max_target_length")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0 < args.val_share < 1:
        raise UserError(f"--val-share must be between 0 and 1 (e.g. 0.05), got {args.val_share}")
    if args.max_grad_norm < 0 or args.weight_decay < 0 or args.eval_generate < 0:
        raise UserError("--max-grad-norm, --weight-decay and --eval-generate cannot be negative")
    if args.scratch_vocab_size < models.MIN_SCRATCH_VOCAB:
        raise UserError(f"--scratch-vocab-size must be at least {models.MIN_SCRATCH_VOCAB}, got {args.scratch_vocab_size}")
    if not -SEED_LIMIT < args.seed < SEED_LIMIT:  # torch.manual_seed takes 64 bits, and dropout seeds add to it
        raise UserError(f"--seed {args.seed}: out of range; give a number from -{SEED_LIMIT - 1} to {SEED_LIMIT - 1}")
    if args.max_tokens < args.max_length + args.max_target_length:
        raise UserError(f"--max-tokens {args.max_tokens} cannot hold one example of --max-length + --max-target-length "
                        f"({args.max_length + args.max_target_length}); raise --max-tokens or lower the lengths")


# Fixed for the life of a run: typing another value with --resume is refused.
FIXED_ON_RESUME = {"model": "the weights and tokenizer come from it", "seed": "it decides data order and dropout noise",
                   "train_file": "the data plan is built from it", "val_share": "it decides which dialogues are held out",
                   "scratch_vocab_size": "the tokenizer is already trained"}
NOT_RECORDED = {"resume", "output_dir", "no_download"}  # about this invocation, not the run


def merge_resumed_flags(args, typed: set[str], recorded: dict, checkpoint: Path):
    """Flags not typed now come from the run being resumed; typed ones must be changeable.

    Typing the run's own value again is accepted for every flag; a length
    flag typed (--epochs or --max-steps) sets the run's length from it.
    """
    for key, value in recorded.items():
        if key in NOT_RECORDED or not hasattr(args, key):
            continue
        if key not in typed:
            setattr(args, key, value)
        elif key in FIXED_ON_RESUME and value is not None and _as_recorded(getattr(args, key), key) != _as_recorded(value, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} cannot change on --resume ({FIXED_ON_RESUME[key]}): {checkpoint.name} was trained with "
                            f"{flag} {value}; drop the flag, or start a new run with another --output-dir")
    if "epochs" in typed and "max_steps" not in typed:
        args.max_steps = None  # --epochs typed now, whatever its value: the run's length is counted in epochs again


def _as_recorded(value, key):
    """The value as a run records it: data files absolute, a model folder absolute however it was typed
    (``dir/``, ``./dir``, relative to another cwd); a hub name or 'scratch' as is."""
    if key in ("train_file", "val_file") or (key == "model" and isinstance(value, str) and Path(value).is_dir()):
        return training_files.absolute(value)
    return value


def run_config(args, tokenizer_vocab_size: int) -> dict:
    """The flags as a checkpoint records them, and the vocabulary the run's tokenizer really has:
    --scratch-vocab-size is a ceiling, which a small training text does not reach."""
    return {**{k: v for k, v in vars(args).items() if k not in NOT_RECORDED}, "tokenizer_vocab_size": tokenizer_vocab_size}
