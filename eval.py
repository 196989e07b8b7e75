"""Score a checkpoint on DailyDialog: a generated reply for every pair, then metrics.

    python eval.py --data data/dailydialog/validation.txt                  # best, else latest in checkpoints/
    python eval.py --checkpoint DIR --data FILE --max-examples 500 --out DIR
    python eval.py ... --num-beams 4                                        # decoding flags as in infer.py
    python eval.py ... --precision bf16                                     # bf16 autocast (auto: on a GPU that has it)

Every turn after the first of every dialogue in --data is a reference; its
history goes through `dataset.encode_history`, as in training and infer.py.
Prints a table of the metrics (metrics.py explains each one; every BLEU is on
the 0-100 scale), three of the pairs with their replies and, when the replies
collapsed, a line saying so (`metrics.collapse_line`). Writes into
--out (default: ``eval/<checkpoint name>`` beside the checkpoint, e.g.
``checkpoints/eval/checkpoint-00001000``; not inside it, because a running
train.py deletes old checkpoint folders with everything in them):

- ``report.json``: the metrics, the decoding settings, the checkpoint, the
  data file and its sha256, the number of pairs;
- ``samples.jsonl``: one ``{"context": [turns], "reference", "response"}``
  object per pair, in file order.

Perplexity is teacher-forced on the same inputs and labels as training
(the checkpoint's --max-length and --max-target-length) and is per target
token, ``</s>`` included, padding excluded.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

from dataset import DailyDialogDataset, encode_history, read_dialogues
from t5dialog import checkpoint as ckpt
from t5dialog import cli
from t5dialog.cli import OneLineParser, UserError, check_positive, pick_device, run_script
from t5dialog.files import make_writable_dir, sha256, write_json_atomic
from t5dialog.generation import (
    DEFAULT_DIR,
    add_generation_args,
    find_and_load,
    generate_ids,
    generation_options,
    max_input_length,
)
from t5dialog.metrics import collapse_line, compute_metrics, format_table, perplexity
from t5dialog.models import autocast, resolve_precision, set_math_mode
from t5dialog.validation import target_nll

warn = functools.partial(cli.warn, "eval.py")

BATCH_SIZE = 32  # rows per generate() call; inputs of similar length go together, so padding stays small
SHOWN = 3  # pairs printed with their replies under the table: what the model says, beside the numbers


# ---------------------------------------------------------------- generation


def generate_all(histories: list[list[str]], model, tokenizer, device, max_length: int = 512,
                 batch_size: int = BATCH_SIZE, progress: bool = True, **options) -> list[str]:
    """A reply to every history (turns, newest last), in the order given.

    Inputs are built by `encode_history` exactly as `infer.generate_response`
    builds them, sorted by length (longest first, so running out of memory
    shows at once and the progress bar's estimate errs on the safe side) and
    decoded `batch_size` at a time, each batch padded to its own longest
    input. Greedy and beam decoding give the same text as one call per
    history; sampling draws differ, as any change of batching makes them.
    """
    from tqdm import tqdm

    inputs = [encode_history(tokenizer, h, max_length) for h in histories]
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    responses: list[str] = [""] * len(inputs)
    with tqdm(total=len(inputs), desc="generating", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, text in zip(rows, generate_ids([inputs[i] for i in rows], model, tokenizer, device, **options), strict=True):
                responses[i] = text
            bar.update(len(rows))
    return responses


# ---------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(prog="eval.py", description="Generate a reply for every DailyDialog pair of a file and score them.")
    cli.add_checkpoint_arg(p, DEFAULT_DIR)
    p.add_argument("--data", required=True, help="DailyDialog file to evaluate on, e.g. data/dailydialog/validation.txt")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N pairs of the file; without it, all")
    p.add_argument("--out", default=None,
                   help="folder for report.json and samples.jsonl; without it, eval/<checkpoint name> beside the checkpoint, "
                        f"e.g. {DEFAULT_DIR}/eval/checkpoint-00001000; not inside it, since a running train.py deletes "
                        "old checkpoint folders with all they hold")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="pairs per generation (and perplexity) batch")
    cli.add_device_arg(p)
    cli.add_precision_arg(p)
    add_generation_args(p)
    return p


def default_out(checkpoint: Path) -> Path:
    """``eval/<checkpoint name>`` in the folder holding the checkpoint.

    Beside the checkpoints rather than inside one: train.py prunes old
    checkpoint folders while it runs, and an eval that wrote into one would
    lose minutes of generation; one folder per checkpoint keeps reports of
    different checkpoints apart.
    """
    full = checkpoint.resolve() if checkpoint.name in ("", "..") else checkpoint  # --checkpoint . has no name
    return full.parent / "eval" / full.name


def prepare_out(out: Path):
    """Create --out and check it takes files, before the minutes of generation rather than after."""
    try:
        make_writable_dir(out)
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({e.strerror or e}); pass another folder") from None


def format_report(metrics: dict, samples: list[dict]) -> str:
    """The metrics table, SHOWN samples spread over the pairs (the first, the middle, the last), the collapse line."""
    picks = sorted({round(i * (len(samples) - 1) / (SHOWN - 1)) for i in range(SHOWN)})
    lines = [format_table(metrics), "", f"{len(picks)} of the {len(samples):,} replies (all in samples.jsonl):"]
    for i in picks:
        context = samples[i]["context"]
        earlier = len(context) - 1
        lines.append(f"pair {i + 1}" + (f", after {earlier} earlier turn{'s' * (earlier > 1)}" if earlier else ""))
        for label, text in (("input", context[-1]), ("reference", samples[i]["reference"]),
                            ("reply", samples[i]["response"])):
            lines.append(f"  {label:<10} {' '.join(text.split()) or '(empty)'}")  # one line each, whatever the reply holds
    collapse = collapse_line([s["response"] for s in samples])
    return "\n".join(lines + ([collapse] if collapse else []))


def write_outputs(out: Path, report: dict, samples: list[dict]):
    try:
        with open(out / "samples.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        write_json_atomic(out / "report.json", report)  # last: its presence means the run finished
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); the metrics are printed above, "
                        "the samples are lost: pass another folder with --out") from None


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    options = generation_options(args)  # a bad decoding flag fails before any loading
    check_positive(args, "max_examples", "batch_size")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    set_math_mode(device, precision)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is an existing file; pass a folder path")
    read_dialogues(args.data)  # DataError before minutes of model loading, not after
    path, model, tokenizer = find_and_load(args.checkpoint, device, warn)
    out = Path(args.out) if args.out else default_out(path)
    max_length = max_input_length(path)
    max_target_length = int(ckpt.read_run_config(path).get("max_target_length", 128))
    ds = DailyDialogDataset(tokenizer, args.data, max_length, max_target_length)
    prepare_out(out)
    n = min(args.max_examples or len(ds), len(ds))
    pairs, examples = ds.pairs[:n], ds.examples[:n]
    print(f"evaluating {path} on {n:,} of {len(ds):,} pairs of {args.data} (device {device}, {precision})", flush=True)

    order = sorted(range(n), key=lambda i: len(examples[i]["input_ids"]))  # similar lengths pad little
    batches = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    nll, tokens = target_nll(model, examples, tokenizer.pad_token_id, batches, device, precision)
    with autocast(device, precision):
        torch.manual_seed(args.seed)
        responses = generate_all([history for history, _ in pairs], model, tokenizer, device, max_length, args.batch_size,
                                 **options)
    references = [reference for _, reference in pairs]
    metrics = {"perplexity": perplexity(nll, tokens), **compute_metrics(responses, references)}

    report = {
        "checkpoint": str(path),
        "data": str(args.data),
        "data_sha256": sha256(args.data),
        "num_pairs": n,
        "pairs_in_file": len(ds),
        "target_tokens": tokens,
        "max_length": max_length,
        "max_target_length": max_target_length,
        "precision": precision,
        "decoding": {**options, "seed": args.seed, "batch_size": args.batch_size},
        "metrics": metrics,  # written as strict JSON: a perplexity that overflowed becomes null
    }
    samples = [{"context": history, "reference": reference, "response": response}
               for (history, reference), response in zip(pairs, responses, strict=True)]
    try:
        write_outputs(out, report, samples)
    finally:  # saved or not, minutes of generation end in the table
        # Flushed inside run_script's handlers: a reader that left must not fail Python's exit-time flush.
        print(format_report(metrics, samples), flush=True)
    print(f"wrote {out / 'report.json'} and {out / 'samples.jsonl'}", flush=True)
    return 0


def main(argv=None) -> int:
    return run_script("eval.py", run, argv, out_of_memory="lower --batch-size or --num-beams")


if __name__ == "__main__":
    sys.exit(main())
