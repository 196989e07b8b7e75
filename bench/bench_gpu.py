"""One GPU, a t5-small-shaped model, one epoch of ~76,000 pairs: train.py's settings vs Hugging Face's Seq2SeqTrainer.

    python bench/bench_gpu.py --data-dir data/dailydialog              # all arms (python data/download.py first)
    python bench/bench_gpu.py --data-dir data/sample --json gpu.json   # the demo dialogues, repeated to ~76k pairs
    python bench/bench_gpu.py --quick --data-dir data/sample           # smoke run: tiny model, 300 pairs, CPU too

Nothing is downloaded. The model is built from a config shaped like t5-small
(d_model 512, d_ff 2048, 6+6 layers, 8 heads, d_kv 64, ReLU feed-forward,
random init) with its vocabulary padded to 32,128 rows, so the output layer
costs what t5-small's does; its tokenizer is trained on --data-dir's
train.txt (models.train_tokenizer). The training file's dialogues are
repeated until the pairs reach --pairs (the full DailyDialog training set
has about 76k), and the output says by how much.

Arms, each one epoch in its own process from the same initial weights:

  fp32               train.py --precision fp32 --attention eager (TF32 off)
  bf16               train.py --precision bf16 --attention eager
  bf16-sdpa          train.py --precision bf16 --attention sdpa
  bf16-sdpa-compile  the same with --compile
  hf                 Seq2SeqTrainer, bf16=True, group_by_length, the same lr, warmup and weight decay, at the
                     fastest of --hf-batch-sizes that fits (each probed on --hf-probe-pairs pairs first)
  generate           eval.py's batched generation (eval.generate_all) on --generate-pairs validation pairs and the
                     median latency of infer.generate_response, fp32 and bf16 weights, with a trained arm's checkpoint

Training time and real tokens (non-pad input + target tokens) of train.py's
arms are the sums of its metrics.jsonl logging windows (validation and
checkpoint writes fall outside them); "warm" leaves out the first window,
which carries start-up and compilation. MFU is 3x the analytic forward FLOPs
of the epoch's real tokens per second, over the card's dense bf16 peak
(benchlib.GPU_PEAKS; unknown cards: a measured bf16 torch.mm rate). Peak
memory is torch.cuda.max_memory_allocated of the arm's own process (peak RSS
on a CPU). Validation loss: one function for every arm (validation.validation_loss in
fp32 on the validation file, fixed token budget).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import NEVER, UserError

from t5dialog.cli import OneLineParser, run_script

SCRIPT = str(Path(__file__).resolve())
T5_SMALL = dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6, dropout_rate=0.1,
                feed_forward_proj="relu", tie_word_embeddings=True)
QUICK_MODEL = dict(T5_SMALL, d_model=64, d_ff=256, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2)
PADDED_VOCAB = 32128  # t5-small's embedding rows
# name -> (train.py --precision, --attention, --compile)
TRAIN_ARMS = {"fp32": ("fp32", "eager", False), "tf32": ("tf32", "eager", False), "bf16": ("bf16", "eager", False),
              "bf16-sdpa": ("bf16", "sdpa", False), "bf16-sdpa-compile": ("bf16", "sdpa", True)}
ALL_ARMS = [*TRAIN_ARMS, "hf", "generate"]
QUICK = dict(pairs=300, val_dialogues=10, max_tokens=2048, hf_batch_sizes="16,32", hf_probe_pairs=64, generate_pairs=16,
             infer_prompts=3, log_every=5)


def build_parser():
    p = OneLineParser(prog="bench_gpu.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data-dir", default=None, help="folder holding train.txt and validation.txt (DailyDialog format), e.g. data/sample")
    a("--pairs", type=int, default=76000, help="repeat the training dialogues up to this many pairs (a longer file is cut)")
    a("--val-dialogues", type=int, default=0, help="the first N validation dialogues (0 = all)")
    a("--max-tokens", type=int, default=16384, help="train.py's token budget per batch (its default, 2048, is sized for a CPU)")
    a("--lr", type=float, default=None, help="peak learning rate of every arm (default: train.py's)")
    a("--vocab-size", type=int, default=8000, help="pieces of the tokenizer trained on the data (the model's rows stay 32,128)")
    a("--arms", default=",".join(ALL_ARMS), help="comma-separated subset of: " + ", ".join(ALL_ARMS))
    a("--hf-batch-sizes", default="32,64,128", help="Seq2SeqTrainer batch sizes to probe; the fastest that fits runs the epoch")
    a("--hf-probe-pairs", type=int, default=8192, help="pairs each batch-size probe trains on")
    a("--generate-pairs", type=int, default=1000, help="validation pairs the generation arm decodes")
    a("--infer-prompts", type=int, default=50, help="prompts whose infer.generate_response latency is measured")
    a("--log-every", type=int, default=50, help="train.py's logging window, in steps")
    a("--quick", action="store_true", help="a tiny model on 300 pairs: checks the benchmark end to end in minutes, also on a CPU")
    a("--work-dir", default=None, help="keep the data, models, checkpoints and arm logs here (default: a temporary folder)")
    a("--json", default=None, help="also write the results to this file")
    a("--_arm", help=argparse.SUPPRESS)
    a("--_work", help=argparse.SUPPRESS)
    a("--_batch", type=int, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------- preparation (driver process)


def write_repeated(src: Path, dst: Path, target_pairs: int) -> dict:
    """src's dialogues in order, repeated until `target_pairs` pairs; the last pass (or a longer file) is cut there."""
    from dataset import EOU, read_dialogues

    dialogues, _ = read_dialogues(src)
    pairs = sum(len(d) - 1 for d in dialogues)
    out, n = [], 0
    while n < target_pairs or not out:
        for d in dialogues:
            if out and n >= target_pairs:
                break
            out.append(f" {EOU} ".join(d) + f" {EOU}\n")
            n += len(d) - 1
    dst.write_text("".join(out), encoding="utf-8")
    return {"source_dialogues": len(dialogues), "source_pairs": pairs, "dialogues": len(out), "pairs": n,
            "repeats": n / pairs}


def build_model(train_file: Path, model_dir: Path, vocab_size: int, config: dict):
    """A randomly initialised T5 of `config`, 32,128 vocabulary rows, and a tokenizer trained on the training text."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from dataset import SEPARATOR, read_dialogues
    from t5dialog import models

    dialogues, _ = read_dialogues(train_file)
    tokenizer = models.train_tokenizer([SEPARATOR.join(d) for d in dict.fromkeys(tuple(d) for d in dialogues)], vocab_size)
    if len(tokenizer) > PADDED_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} gives {len(tokenizer)} tokens, more than t5-small's {PADDED_VOCAB}; lower it")
    cfg = T5Config(vocab_size=PADDED_VOCAB, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   decoder_start_token_id=tokenizer.pad_token_id, **config)
    torch.manual_seed(42)
    model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model.config, tokenizer, sum(p.numel() for p in model.parameters())


def prepare(args, w: Path) -> dict:
    train_src, val_src = benchlib.data_files(args.data_dir)
    from transformers.utils import logging as hf_logging

    from dataset import DailyDialogDataset
    from t5dialog import flags as train_flags

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    data = write_repeated(train_src, w / "train.txt", args.pairs)
    benchlib.write_slice(val_src, w / "validation.txt", args.val_dialogues)
    shape = QUICK_MODEL if args.quick else T5_SMALL
    config, tokenizer, parameters = build_model(w / "train.txt", w / "model", args.vocab_size, shape)
    ds = DailyDialogDataset(tokenizer, w / "train.txt")
    data.update(train_source=str(train_src), validation_source=str(val_src),
                validation_pairs=len(DailyDialogDataset(tokenizer, w / "validation.txt")),
                real_tokens=sum(ds.src_lengths) + sum(ds.tgt_lengths),
                epoch_flops=benchlib.model_flops(config, ds.src_lengths, ds.tgt_lengths),
                parameters=parameters, tokenizer_pieces=len(tokenizer))
    defaults = train_flags.build_parser().parse_args([])
    settings = {"lr": args.lr or defaults.lr, "warmup_ratio": defaults.warmup_ratio, "weight_decay": defaults.weight_decay,
                "max_tokens": args.max_tokens, "log_every": args.log_every, "hf_probe_pairs": args.hf_probe_pairs,
                "generate_pairs": args.generate_pairs, "infer_prompts": args.infer_prompts}
    (w / "settings.json").write_text(json.dumps(settings))
    return data


# ---------------------------------------------------------------- arms (each in its own process)


def arm_peak(w: Path, device) -> dict:
    import torch

    return {**benchlib.device_peak(device), "bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(),
            "torch": torch.__version__}


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return benchlib.peak_rss_mib()


def arm_train(w: Path, name: str, s: dict, device) -> dict:
    """train.py itself, through train.main, one epoch; its figures from its own metrics.jsonl."""
    import train
    from dataset import DailyDialogDataset, padding_efficiency
    from t5dialog import models

    precision, attention, compiled = TRAIN_ARMS[name]
    out = w / f"{name}-run"
    flags = ["--model", str(w / "model"), "--train-file", str(w / "train.txt"), "--val-file", str(w / "validation.txt"),
             "--output-dir", str(out), "--epochs", "1", "--eval-every", NEVER, "--save-every", NEVER,
             "--log-every", str(s["log_every"]), "--max-tokens", str(s["max_tokens"]), "--lr", str(s["lr"]),
             "--device", device.type, "--precision", precision, "--attention", attention, *(["--compile"] if compiled else [])]
    code = train.main(flags)
    if code != 0:
        raise SystemExit(f"train.py {' '.join(flags)} exited with {code}")
    memory = peak_memory_mib(device)
    totals = benchlib.window_totals(out)
    model, tokenizer = models.load_checkpoint(benchlib.final_checkpoint(out))
    ds = DailyDialogDataset(tokenizer, w / "train.txt")
    batches = benchlib.batches_run(ds, flags, totals["steps"])
    val = benchlib.shared_val_loss(model, tokenizer, w / "validation.txt", device)
    return {"arm": name, **totals, "peak_memory_mib": memory, "val_loss": val,
            "padding_efficiency": padding_efficiency(ds.src_lengths, ds.tgt_lengths, batches),
            "plan_real_tokens": sum(ds.src_lengths[i] + ds.tgt_lengths[i] for b in batches for i in b),
            "precision": precision, "attention": attention,
            "compile": compiled, "batch": f"{s['max_tokens']} tokens", "flags": " ".join(flags[flags.index("--epochs"):])}


def arm_hf(w: Path, s: dict, device, batch: int, probe: bool) -> dict:
    """Seq2SeqTrainer, bf16, group_by_length; a probe trains on the first hf_probe_pairs pairs' worth of steps."""
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from dataset import DailyDialogDataset

    model, tokenizer = benchlib.load_model(w / "model")
    ds = DailyDialogDataset(tokenizer, w / "train.txt")
    rows, collator, count = benchlib.hf_rows_and_collator(ds, tokenizer, model)

    first = {}

    class FirstSteps(TrainerCallback):  # when the first logging window's worth of steps is done (warm rate after it)
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == s["log_every"]:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first.update(time=time.perf_counter(), tokens=count["real"])

    cuda = device.type == "cuda"
    args = Seq2SeqTrainingArguments(
        output_dir=str(w / f"hf-run-{batch}"), per_device_train_batch_size=batch, learning_rate=s["lr"],
        warmup_steps=s["warmup_ratio"], weight_decay=s["weight_decay"], num_train_epochs=1,
        max_steps=math.ceil(s["hf_probe_pairs"] / batch) if probe else -1, train_sampling_strategy="group_by_length",
        bf16=cuda, use_cpu=not cuda, eval_strategy="no", save_strategy="no", logging_steps=s["log_every"], report_to=[],
        seed=42, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[FirstSteps()])
    start = time.perf_counter()
    try:
        result = trainer.train()
    except torch.OutOfMemoryError:
        return {"arm": "hf", "batch": batch, "oom": True}
    if cuda:
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    seconds = end - start
    out = {"arm": "hf", "batch": batch, "seconds": seconds, "steps": result.global_step, "real_tokens": count["real"],
           "padding_efficiency": count["real"] / count["processed"], "peak_memory_mib": peak_memory_mib(device),
           "precision": "bf16" if cuda else "fp32", "attention": model.config._attn_implementation, "compile": False,
           "optimizer": str(args.optim), "first_window_seconds": first["time"] - start if first else None,
           "first_window_tokens": first.get("tokens")}
    if not probe:
        out["val_loss"] = benchlib.shared_val_loss(trainer.model, tokenizer, w / "validation.txt", device)
    return out


def arm_generate(w: Path, s: dict, device, source: str) -> dict:
    """eval.py's batched generation and infer.py's one-reply latency, with a trained checkpoint, fp32 then bf16 weights."""
    import torch

    import eval as evaluation
    import infer
    from dataset import dialogue_pairs, read_dialogues
    from t5dialog import generation, models

    path = benchlib.final_checkpoint(w / f"{source}-run")
    model, tokenizer = generation.load(path, device)
    max_length = generation.max_input_length(path)
    dialogues, _ = read_dialogues(w / "validation.txt")
    histories = [h for h, _ in dialogue_pairs(dialogues)][: s["generate_pairs"]]
    prompts = [d[0] for d in dialogues][: s["infer_prompts"]]
    options = dict(models.GENERATION_DEFAULTS)
    result = {"arm": "generate", "checkpoint_of": source, "pairs": len(histories), "prompts": len(prompts),
              "batch_size": evaluation.BATCH_SIZE, "max_new_tokens": options["max_new_tokens"]}
    for dtype in (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]):
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        evaluation.generate_all(histories[: evaluation.BATCH_SIZE], model, tokenizer, device, max_length, progress=False,
                                **options)  # warm-up: first-call allocations and kernel choices
        start = time.perf_counter()
        replies = evaluation.generate_all(histories, model, tokenizer, device, max_length, progress=False, **options)
        batched = time.perf_counter() - start
        latencies = []
        for text in prompts:
            start = time.perf_counter()
            infer.generate_response(text, model, tokenizer, device, max_length=max_length, **options)
            latencies.append(time.perf_counter() - start)
        tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
        result[dtype] = {"batched_s": batched, "pairs_per_s": len(histories) / batched,
                         "mean_reply_tokens": tokens / max(1, len(replies)),
                         "infer_median_ms": statistics.median(latencies) * 1000}
    return result


def run_arm_here(args) -> int:
    """Inside an arm's process: run it, write its JSON beside the work files."""
    import torch

    w = Path(args._work)
    s = json.loads((w / "settings.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args._arm == "peak":
        result = arm_peak(w, device)
    elif args._arm in TRAIN_ARMS:
        result = arm_train(w, args._arm, s, device)
    elif args._arm.startswith("hf-probe-"):
        result = arm_hf(w, s, device, args._batch, probe=True)
    elif args._arm == "hf":
        result = arm_hf(w, s, device, args._batch, probe=False)
    elif args._arm.startswith("generate-"):
        result = arm_generate(w, s, device, args._arm.removeprefix("generate-"))
    else:
        raise UserError(f"unknown arm {args._arm}")
    benchlib.write_result(w, args._arm, result)
    return 0


# ---------------------------------------------------------------- driver


def choose_arms(args, cuda: bool) -> tuple[list[str], list[str]]:
    """(arms to run, lines saying which are skipped and why)."""
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in ALL_ARMS]
    if unknown:
        raise UserError(f"--arms {','.join(unknown)}: unknown; choose from {', '.join(ALL_ARMS)}")
    notes = []
    if not cuda:
        gpu_only = [a for a in wanted if a in TRAIN_ARMS and TRAIN_ARMS[a][0] != "fp32"]
        if gpu_only:
            notes.append(f"{', '.join(gpu_only)}: need CUDA (TF32, bf16 autocast, sdpa and compile are GPU arms here); skipped")
        wanted = [a for a in wanted if a not in gpu_only]
    if "hf" in wanted and not benchlib.has_accelerate():
        notes.append("hf: skipped: Seq2SeqTrainer needs accelerate (pip install accelerate)")
        wanted.remove("hf")
    return wanted, notes


def run_hf(w: Path, sizes: list[int], results: dict, say) -> dict:
    """Probe each batch size in its own process; the fastest that fits trains the epoch."""
    probes = {}
    if len(sizes) > 1:
        for b in sizes:
            say(f"running hf batch-size probe {b} ...")
            probes[b] = benchlib.run_arm(SCRIPT, w, f"hf-probe-{b}", "--_batch", str(b))
    fitting = {b: r["real_tokens"] / r["seconds"] for b, r in probes.items() if "seconds" in r}
    results["hf_probes"] = {str(b): {"tokens_per_s": fitting[b]} if b in fitting else {"failed": r.get("error", "out of memory")}
                            for b, r in probes.items()}
    best = max(fitting, key=fitting.get) if fitting else sizes[0]
    say(f"running hf (batch {best}) ...")
    return benchlib.run_arm(SCRIPT, w, "hf", "--_batch", str(best))


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args._arm:
        return run_arm_here(args)
    benchlib.data_files(args.data_dir)  # a missing folder fails before any work
    import torch

    cuda = torch.cuda.is_available()
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
    elif not cuda:
        raise UserError("no CUDA GPU here: this benchmark measures GPU training; run it on a GPU machine, "
                        "or pass --quick for a CPU smoke run (fp32 arms only)")
    sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b.strip()]
    for flag, value in (("--pairs", args.pairs), ("--max-tokens", args.max_tokens), ("--log-every", args.log_every),
                        ("--generate-pairs", args.generate_pairs), ("--infer-prompts", args.infer_prompts)):
        if value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
    if not sizes or min(sizes) < 1:
        raise UserError(f"--hf-batch-sizes {args.hf_batch_sizes}: give positive sizes, e.g. 32,64,128")
    arms, notes = choose_arms(args, cuda)

    def say(line):
        print(line, flush=True)

    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench-gpu-")
    w = Path(args.work_dir or tmp.name)
    w.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare(args, w)
        say(f"data: {data['source_dialogues']:,} dialogues ({data['source_pairs']:,} pairs) of {data['train_source']}, "
            + (f"repeated {data['repeats']:.2f}x to {data['pairs']:,} pairs (the full DailyDialog training set has about "
               "76,000; the repeats are the same pairs)" if data["repeats"] > 1 else
               f"its first {data['dialogues']:,} dialogues: {data['pairs']:,} pairs")
            + f"; validation {data['validation_pairs']:,} pairs of {data['validation_source']}")
        say(f"model: {'tiny T5 (--quick)' if args.quick else 't5-small-shaped T5'}, random init, {data['parameters'] / 1e6:.1f}M "
            f"parameters, vocabulary {PADDED_VOCAB:,} rows ({data['tokenizer_pieces']:,} trained pieces); "
            f"device {'cuda' if cuda else 'cpu'}; work folder {w}")
        for line in notes:
            say(line)
        results = {"data": data, "settings": json.loads((w / "settings.json").read_text()), "notes": notes,
                   "peak": benchlib.run_arm(SCRIPT, w, "peak")}
        if cuda and not results["peak"].get("bf16", True):  # no bf16 means pre-Ampere: no TF32 either
            arms = [a for a in arms if a not in TRAIN_ARMS or TRAIN_ARMS[a][0] == "fp32"]
            notes.append("tf32 and bf16 arms: this GPU has neither; skipped")
        for name in [a for a in arms if a in TRAIN_ARMS]:
            say(f"running {name} ...")
            results[name] = benchlib.run_arm(SCRIPT, w, name)
        if "hf" in arms:
            results["hf"] = run_hf(w, sizes, results, say)
        if "generate" in arms:
            trained = [a for a in ("bf16-sdpa", "bf16", "bf16-sdpa-compile", "fp32") if "seconds" in results.get(a, {})]
            source = trained[0] if trained else None
            if source is None:
                notes.append("generate: skipped: it needs a checkpoint from one of train.py's arms")
            else:
                say(f"running generate (checkpoint of {source}) ...")
                results["generate"] = benchlib.run_arm(SCRIPT, w, f"generate-{source}")
        report(results, say)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            say(f"results: {args.json}")
    finally:
        if tmp is not None:
            tmp.cleanup()
        elif args.work_dir:
            say(f"kept: {w} (data, model, checkpoints, <arm>.log)")
    return 0


# ---------------------------------------------------------------- report


def report(results: dict, say):
    data, peak = results["data"], results["peak"]
    tflops = peak.get("tflops")
    say(f"\n{peak.get('device', '?')}: peak {tflops:.3g} TFLOP/s ({peak.get('source')}); torch {peak.get('torch')}"
        if tflops else f"\npeak: {peak.get('error')}")
    say(f"one epoch: {data['pairs']:,} pairs, {data['real_tokens']:,} real tokens, {data['epoch_flops'] / 1e15:.2f} PFLOP")
    head = (f"| {'arm':17} | precision | attention | compile | {'batch':12} | pad eff | s/epoch | real tok/s | warm tok/s "
            f"| MFU   | peak mem MiB | val loss |")
    say(head)
    say("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name in [*TRAIN_ARMS, "hf"]:
        r = results.get(name)
        if not r:
            continue
        if "seconds" not in r:
            say(f"| {name:17} | failed: {r.get('error', 'out of memory')}")
            continue
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        warm_s = r["seconds"] - (r.get("first_window_seconds") or 0)
        r["warm_tokens_per_s"] = (r["real_tokens"] - (r.get("first_window_tokens") or 0)) / warm_s if warm_s > 0 else None
        flops = data["epoch_flops"] * r["real_tokens"] / data["real_tokens"]  # a probe or a cut run: its share of the epoch
        r["mfu"] = flops / r["seconds"] / (tflops * 1e12) if tflops else None
        if r["real_tokens"] != data["real_tokens"] or r.get("plan_real_tokens", r["real_tokens"]) != r["real_tokens"]:
            r["note"] = (f"logged {r['real_tokens']:,} real tokens; the epoch has {data['real_tokens']:,}"
                         + (f", train.epoch_plan {r['plan_real_tokens']:,}" if "plan_real_tokens" in r else ""))
        batch = r["batch"] if isinstance(r["batch"], str) else f"{r['batch']} pairs"
        warm = f"{r['warm_tokens_per_s']:,.0f}" if r["warm_tokens_per_s"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        val = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "n/a"
        say(f"| {name:17} | {r['precision']:9} | {r['attention']:9} | {'yes' if r['compile'] else 'no':7} | {batch:12} "
            f"| {r['padding_efficiency']:7.1%} | {r['seconds']:7.1f} | {r['tokens_per_s']:10,.0f} | {warm:>10} | {mfu:>5} "
            f"| {r['peak_memory_mib']:12,.0f} | {val:>8} |")
        if r.get("note"):
            say(f"  {name}: {r['note']}")
    for b, p in results.get("hf_probes", {}).items():
        say(f"  hf probe, batch {b}: " + (f"{p['tokens_per_s']:,.0f} real tok/s" if "tokens_per_s" in p else p["failed"]))
    g = results.get("generate")
    if g and "error" not in g:
        for dtype in ("fp32", "bf16"):
            if dtype in g:
                x = g[dtype]
                say(f"generation, {dtype} weights ({g['checkpoint_of']} checkpoint): eval.generate_all {g['pairs']:,} pairs in "
                    f"{x['batched_s']:.1f} s ({x['pairs_per_s']:,.1f} pairs/s, batch {g['batch_size']}, mean reply "
                    f"{x['mean_reply_tokens']:.1f} tokens); infer.generate_response median {x['infer_median_ms']:.1f} ms "
                    f"over {g['prompts']} prompts")
    elif g:
        say(f"generation: failed: {g['error']}")
    for line in results["notes"]:
        say(f"note: {line}")


def main(argv=None) -> int:
    return run_script("bench_gpu.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
