"""How much batching buys eval.py: batched generation vs one generate_response call per pair.

    python bench/bench_eval.py --data-dir DIR               # 1,000 validation pairs, scratch-size T5 (minutes on 2 cores)
    python bench/bench_eval.py --data-dir DIR --pairs 100   # quicker, for development
    python bench/bench_eval.py --data-dir DIR --model CKPT  # any checkpoint (folder or output dir) instead

Both arms decode the same pairs with the same settings (infer.py's defaults,
but --max-new-tokens 32) and must give the same text; only the generation is
timed, the part where the two differ (perplexity and metrics cost the same
either way). Without --model the model is models.SCRATCH_CONFIG (d_model 256,
4+4 layers) with random weights and a tokenizer trained on DIR/train.txt: an
untrained model never says </s>, so every reply runs the full
--max-new-tokens, the worst case for both arms. The data is the first --pairs
pairs of DIR/validation.txt (DIR: data/sample, or data/dailydialog after
`python data/download.py`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import benchlib
import torch

import eval as evaluation
import infer
from dataset import dialogue_pairs, read_dialogues
from t5dialog import checkpoint, generation, models
from t5dialog.cli import OneLineParser, UserError, pick_device, run_script


def build_parser():
    p = OneLineParser(prog="bench_eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding train.txt and validation.txt, e.g. data/sample")
    p.add_argument("--pairs", type=int, default=1000, help="validation pairs to decode in each arm")
    p.add_argument("--batch-size", type=int, default=evaluation.BATCH_SIZE, help="rows per generate() call, batched arm")
    p.add_argument("--max-new-tokens", type=int, default=32, help="reply length cap (an untrained model always reaches it)")
    p.add_argument("--model", default=None, help="checkpoint folder or output dir (default: random-init scratch T5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    # One thread by default: on cores shared with other jobs, several OpenMP threads spin-wait for each other
    # and both arms slow down up to 10x, erratically; one thread gives steady, comparable timings.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    train_file, val_file = benchlib.data_files(args.data_dir)
    if args.pairs < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--pairs, --batch-size and --max-new-tokens must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.model:
        path = checkpoint.choose_checkpoint(args.model)
        model, tokenizer = generation.load(path, device)
        max_length, name = generation.max_input_length(path), str(path)
    else:
        model, tokenizer = models.build_scratch(train_file, vocab_size=8000, seed=0)
        model = model.to(device).eval()
        max_length, name = 512, "scratch T5 (models.SCRATCH_CONFIG), random init"
    histories = [h for h, _ in dialogue_pairs(read_dialogues(val_file)[0])][: args.pairs]
    options = {**models.GENERATION_DEFAULTS, "max_new_tokens": args.max_new_tokens}
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {name} ({params / 1e6:.1f}M parameters); {len(histories):,} pairs of {val_file}; "
          f"device {device}, {torch.get_num_threads()} threads; decoding {options}")

    one = lambda h: infer.generate_response(h[-1], model, tokenizer, device, history=h[:-1], max_length=max_length, **options)  # noqa: E731
    one(histories[0])  # warm-up: first-call allocations are not what we measure
    batched, t_batched = timed(lambda: evaluation.generate_all(histories, model, tokenizer, device, max_length,
                                                              args.batch_size, progress=False, **options))
    single, t_single = timed(lambda: [one(h) for h in histories])

    mismatches = sum(a != b for a, b in zip(batched, single, strict=True))
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in batched) / len(batched)
    result = {"pairs": len(histories), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "one_by_one_s": round(t_single, 2), "batched_s": round(t_batched, 2), "speedup": round(t_single / t_batched, 2),
              "mismatches": mismatches, "mean_reply_tokens": round(new_tokens, 1), "device": str(device),
              "threads": torch.get_num_threads(), "model": name}
    print(f"one generate_response per pair: {t_single:7.1f} s  ({len(histories) / t_single:6.1f} pairs/s)")
    print(f"batched (--batch-size {args.batch_size}):       {t_batched:7.1f} s  ({len(histories) / t_batched:6.1f} pairs/s)")
    print(f"speedup: {t_single / t_batched:.1f}x; replies that differ: {mismatches}; mean reply {new_tokens:.1f} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    return run_script("bench_eval.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
