"""Training (and inference) speed on a CPU: train.py vs Seq2SeqTrainer vs the first version's recipe.

    python bench/bench_train.py --data-dir DIR                        # DIR's train.txt, 1 epoch, all arms
    python bench/bench_train.py --data-dir DIR --train-dialogues 400  # a documented slice (first 400 dialogues)
    python bench/bench_train.py --data-dir DIR --model t5-small       # any other seq2seq model (hub name or folder)

DIR holds train.txt and validation.txt in DailyDialog format (data/sample,
or data/dailydialog after `python data/download.py`). Every arm runs in its
own process, so its peak memory is that process's ru_maxrss; all arms start
from the same weights (built once, saved to a temporary folder, loaded by
each arm) and train on the same tokenized pairs:

  ours      train.py with its defaults (token-budget batches, fast dropout), run by train.main;
            --ours-args=--no-fast-dropout measures it with torch's dropout
  torchdrop the same with --no-fast-dropout, in the same run
  hf        Seq2SeqTrainer + DataCollatorForSeq2Seq, train_sampling_strategy="group_by_length",
            batch 16, the same peak lr and warmup share
  seed      every input and every target padded to 512 tokens, batch 2;
            measured on the first --seed-pairs pairs only (it is ~20x slower)
  t5small   memory only: a t5-small-sized model (random init), 2 steps of train.py
  infer     infer.generate_response vs a plain model.generate; `python infer.py` split into its parts

train.py is measured through what it writes: its time and real tokens are
the sums of the logging windows in metrics.jsonl (validation and checkpoint
writes lie outside them; --eval-every/--save-every are set past the run),
its batches are train.epoch_plan's, and its model is the checkpoint it saved.
Validation loss of every arm comes from one function (benchlib.shared_val_loss:
validation.validation_loss, as train.py validates, with a fixed token budget on the same validation slice).
Real tokens = non-pad input + target tokens; padding efficiency = real /
processed (padded) tokens, counted on the batches each arm actually ran.
MFU = analytic model FLOPs of the real tokens (6 x params touched per token +
attention) per second, over the fp32 matmul peak measured here with torch.mm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import NEVER, ROOT, UserError

from t5dialog.cli import OneLineParser, run_script

SCRIPT = str(Path(__file__).resolve())
ARMS = ("ours", "torchdrop", "hf", "seed", "t5small", "infer")


def load_dataset(tokenizer, path, max_length=512, max_target_length=128):
    from dataset import DailyDialogDataset

    return DailyDialogDataset(tokenizer, path, max_length, max_target_length)


# ---------------------------------------------------------------- arms (each in its own process)


def arm_ours(w: Path, extra: list[str], model_dir: Path | None = None, name: str = "ours") -> dict:
    """train.py's own loop, through train.main; its figures from its metrics.jsonl, plan and checkpoint."""
    import torch

    import train
    from dataset import padding_efficiency
    from t5dialog import checkpoint as ckpt
    from t5dialog import models

    out = w / f"{name}-run"
    flags = ["--model", str(model_dir or w / "model"), "--train-file", str(w / "train.txt"), "--val-file",
             str(w / "validation.txt"), "--output-dir", str(out), "--device", "cpu", "--log-every", "50",
             "--eval-every", NEVER, "--save-every", NEVER, *extra]
    code = train.main(flags)
    if code != 0:
        raise SystemExit(f"train.py exited with {code}")
    rss = benchlib.peak_rss_mib()
    totals = benchlib.window_totals(out)
    path = benchlib.final_checkpoint(out)
    model, tokenizer = models.load_checkpoint(path)
    config = ckpt.read_run_config(path)
    ds = load_dataset(tokenizer, w / "train.txt", config["max_length"], config["max_target_length"])
    batches = benchlib.batches_run(ds, flags, totals["steps"])
    src, tgt = [ds.src_lengths[i] for b in batches for i in b], [ds.tgt_lengths[i] for b in batches for i in b]
    if sum(src) + sum(tgt) != totals["real_tokens"]:  # the plan and the log must describe the same run
        raise SystemExit(f"metrics.jsonl counts {totals['real_tokens']} real tokens, train.epoch_plan {sum(src) + sum(tgt)}")
    val = None
    if "--max-steps" not in extra:
        val = benchlib.shared_val_loss(model, tokenizer, w / "validation.txt", torch.device("cpu"))
    return {"arm": name, "seconds": totals["seconds"], "steps": totals["steps"], "real_tokens": totals["real_tokens"],
            "padding_efficiency": padding_efficiency(ds.src_lengths, ds.tgt_lengths, batches), "peak_rss_mib": rss,
            "val_loss": val, "flops": benchlib.model_flops(model.config, src, tgt),
            "settings": f"max_tokens {config['max_tokens']}, lr {config['lr']}, warmup {config['warmup_ratio']}, "
                        f"fast dropout {config['fast_dropout']}"}


def arm_hf(w: Path, lr: float, warmup: float, epochs: int) -> dict:
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model, tokenizer = benchlib.load_model(w / "model")
    ds = load_dataset(tokenizer, w / "train.txt")
    rows, collator, count = benchlib.hf_rows_and_collator(ds, tokenizer, model)

    args = Seq2SeqTrainingArguments(output_dir=str(w / "hf-run"), per_device_train_batch_size=16, learning_rate=lr,
                                    warmup_steps=warmup, num_train_epochs=epochs, train_sampling_strategy="group_by_length",
                                    eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], seed=42,
                                    use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    rss = benchlib.peak_rss_mib()
    val = benchlib.shared_val_loss(model, tokenizer, w / "validation.txt", torch.device("cpu"))
    return {"arm": "hf", "seconds": seconds, "steps": result.global_step, "real_tokens": count["real"],
            "padding_efficiency": count["real"] / count["processed"], "peak_rss_mib": rss, "val_loss": val,
            "settings": f"batch 16, group_by_length, lr {lr}, warmup {warmup}, optim {args.optim}",
            "flops": benchlib.model_flops(model.config, ds.src_lengths * epochs, ds.tgt_lengths * epochs)}


def arm_seed(w: Path, lr: float, pairs: int) -> dict:
    """Inputs and targets each padded to 512 tokens, batch 2, on the first `pairs` pairs."""
    import random

    import torch

    model, tokenizer = benchlib.load_model(w / "model")
    ds = load_dataset(tokenizer, w / "train.txt")
    idx = list(range(min(pairs, len(ds))))
    random.Random(42).shuffle(idx)
    torch.manual_seed(42)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    real = processed = 0
    start = time.perf_counter()
    for k in range(0, len(idx), 2):
        ex = [ds.examples[i] for i in idx[k : k + 2]]
        input_ids = torch.full((len(ex), 512), tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        labels = torch.full((len(ex), 512), -100)
        for r, e in enumerate(ex):
            input_ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[r, : len(e["input_ids"])] = 1
            labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # that recipe logged every step, a host sync each time
        real += sum(len(e["input_ids"]) + len(e["labels"]) for e in ex)
        processed += input_ids.numel() + labels.numel()
    seconds = time.perf_counter() - start
    return {"arm": "seed", "seconds": seconds, "steps": (len(idx) + 1) // 2, "real_tokens": real,
            "padding_efficiency": real / processed, "peak_rss_mib": benchlib.peak_rss_mib(), "val_loss": None,
            "settings": f"pad 512+512, batch 2, first {len(idx)} pairs only",
            "flops": benchlib.model_flops(model.config, [ds.src_lengths[i] for i in idx], [ds.tgt_lengths[i] for i in idx])}


def arm_t5small(w: Path) -> dict:
    """Memory only: a t5-small-sized model (60M parameters, random init), 2 steps of train.py."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(w / "model")
    cfg = T5Config(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(w / "t5small")
    tok.save_pretrained(w / "t5small")
    return arm_ours(w, ["--max-steps", "2"], model_dir=w / "t5small", name="t5small")


def arm_peak() -> dict:
    import torch

    peak = benchlib.device_peak(torch.device("cpu"))
    return {"arm": "peak", "gflops": peak["tflops"] * 1000, "threads": torch.get_num_threads()}


def arm_infer(w: Path, prompts: int) -> dict:
    """Median latency: infer.generate_response vs a plain model.generate with the same settings."""
    import torch

    import infer
    from dataset import encode_history, read_dialogues
    from t5dialog import generation
    from t5dialog.models import GENERATION_DEFAULTS

    cpu = torch.device("cpu")
    model_dir = benchlib.final_checkpoint(w / "ours-run")
    model, tokenizer = generation.load(model_dir, cpu)
    dialogues, _ = read_dialogues(w / "validation.txt")
    texts = [d[0] for d in dialogues][:prompts]
    options = {k: v for k, v in GENERATION_DEFAULTS.items() if k not in ("top_p", "top_k", "temperature")}
    ours, plain = [], []
    for t in texts:  # interleaved so that load changes hit both alike
        s = time.perf_counter()
        infer.generate_response(t, model, tokenizer, cpu)
        ours.append(time.perf_counter() - s)
        s = time.perf_counter()
        ids = torch.tensor([encode_history(tokenizer, [t])])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        tokenizer.batch_decode(out, skip_special_tokens=True)
        plain.append(time.perf_counter() - s)
    # `python infer.py "How are you?"`: whole wall time, then where it goes.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    s = time.perf_counter()
    subprocess.run([sys.executable, "infer.py", "How are you?", "--checkpoint", str(model_dir)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    cli = time.perf_counter() - s
    probe = ("import time,sys;t0=time.perf_counter();import torch;t1=time.perf_counter();import transformers, infer, generation;"
             "from transformers import AutoModelForSeq2SeqLM;t2=time.perf_counter();from pathlib import Path;"
             f"m,tok=generation.load(Path({str(model_dir)!r}),torch.device('cpu'));t3=time.perf_counter();"
             "infer.generate_response('How are you?',m,tok,torch.device('cpu'));t4=time.perf_counter();"
             "print(t1-t0,t2-t1,t3-t2,t4-t3)")
    s = time.perf_counter()
    parts = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    probe_total = time.perf_counter() - s
    imp_torch, imp_rest, load, gen = map(float, parts.stdout.split())
    return {"arm": "infer", "prompts": len(texts), "ours_median_s": statistics.median(ours),
            "plain_median_s": statistics.median(plain), "cli_wall_s": cli, "probe_total_s": probe_total,
            "import_torch_s": imp_torch, "import_transformers_infer_s": imp_rest, "load_s": load, "generate_s": gen}


def run_arm_here(args, lr: float, warmup: float) -> int:
    w = Path(args._work)
    extra = ["--epochs", str(args.epochs), *(["--lr", str(lr)] if args.lr else []), *args.ours_args.split()]
    if args._arm == "ours":
        out = arm_ours(w, extra)
    elif args._arm == "torchdrop":  # the fast-dropout lever, measured in the same run
        out = arm_ours(w, extra + ["--no-fast-dropout"], name="torchdrop")
    elif args._arm == "t5small":
        out = arm_t5small(w)
    elif args._arm == "hf":
        out = arm_hf(w, lr, warmup, args.epochs)
    elif args._arm == "seed":
        out = arm_seed(w, lr, args.seed_pairs)
    elif args._arm == "peak":
        out = arm_peak()
    elif args._arm == "infer":
        out = arm_infer(w, args.infer_prompts)
    else:
        raise UserError(f"unknown arm {args._arm}")
    benchlib.write_result(w, args._arm, out)
    return 0


# ---------------------------------------------------------------- driver


def prepare(args, w: Path):
    """Slices of the data and the shared initial weights, in the work folder."""
    from t5dialog import models

    train_file, val_file = benchlib.data_files(args.data_dir)
    benchlib.write_slice(train_file, w / "train.txt", args.train_dialogues)
    benchlib.write_slice(val_file, w / "validation.txt", args.val_dialogues)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.model == "scratch":
        model, tokenizer = models.build_scratch(w / "train.txt", 8000, seed=42)
    else:
        model, tokenizer = models.load_pretrained(args.model)
    model.save_pretrained(w / "model")
    tokenizer.save_pretrained(w / "model")
    return train_file, val_file


def load_snapshot() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores"


def build_parser():
    p = OneLineParser(prog="bench_train.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data-dir", default=None, help="folder holding train.txt and validation.txt (DailyDialog format), e.g. data/sample")
    a("--model", default="scratch", help="'scratch' (the small T5 of models.SCRATCH_CONFIG) or any seq2seq model")
    a("--train-dialogues", type=int, default=0, help="use the first N training dialogues (0 = all)")
    a("--val-dialogues", type=int, default=200, help="the first N validation dialogues for the shared val loss (0 = all)")
    a("--epochs", type=int, default=1)
    a("--lr", type=float, default=None, help="peak lr for all arms (default: train.py's default)")
    a("--seed-pairs", type=int, default=60, help="pairs the padded-to-512 arm trains on (a slice)")
    a("--arms", default="ours,hf,seed,infer,t5small", help="comma-separated subset of " + ", ".join(ARMS))
    a("--infer-prompts", type=int, default=50)
    a("--ours-args", default="", help="extra train.py flags for our arm (default: none, i.e. its defaults)")
    a("--json", default=None, help="also write the results here")
    a("--_arm", help=argparse.SUPPRESS)
    a("--_work", help=argparse.SUPPRESS)
    return p


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    from t5dialog import flags

    defaults = flags.build_parser().parse_args([])
    lr = args.lr or defaults.lr
    if args._arm:
        return run_arm_here(args, lr, defaults.warmup_ratio)
    benchlib.data_files(args.data_dir)  # a missing folder fails before any work
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms {','.join(unknown)}: unknown; choose from {', '.join(ARMS)}")
    if "hf" in arms and not benchlib.has_accelerate():
        print("hf: skipped: Seq2SeqTrainer needs accelerate (pip install accelerate)")
        arms.remove("hf")
    if "infer" in arms and "ours" not in arms:
        print("infer: skipped: it uses the checkpoint of the ours arm")
        arms.remove("infer")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        w = Path(tmp)
        train_file, val_file = prepare(args, w)
        print(f"data: {args.train_dialogues or 'all'} training dialogues of {train_file}, "
              f"{args.val_dialogues or 'all'} validation dialogues of {val_file}; model {args.model}; {args.epochs} epoch(s)")
        print(f"before: {load_snapshot()}")
        results["peak"] = benchlib.run_arm(SCRIPT, w, "peak")
        passed = ["--epochs", str(args.epochs), "--seed-pairs", str(args.seed_pairs), "--infer-prompts", str(args.infer_prompts),
                  "--ours-args=" + args.ours_args, *(["--lr", str(args.lr)] if args.lr else [])]
        for name in ARMS:
            if name in arms:
                print(f"running {name} ... ({load_snapshot()})", flush=True)
                results[name] = benchlib.run_arm(SCRIPT, w, name, *passed)
        print(f"after: {load_snapshot()}")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict):
    peak = results["peak"]["gflops"]
    print(f"\nfp32 matmul peak (torch.mm 1024^3, {results['peak']['threads']} threads): {peak:.1f} GFLOP/s")
    print(f"{'arm':9} {'steps':>6} {'seconds':>8} {'real tok/s':>10} {'pad eff':>8} {'peak RSS':>10} {'val loss':>8} "
          f"{'MFU':>6}  settings")
    for name in ("ours", "torchdrop", "hf", "seed", "t5small"):
        r = results.get(name)
        if not r:
            continue
        if "error" in r:
            print(f"{name:9} failed: {r['error']}")
            continue
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["mfu"] = r["flops"] / r["seconds"] / 1e9 / peak
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        print(f"{name:9} {r['steps']:>6} {r['seconds']:>8.1f} {r['tokens_per_s']:>10.1f} {r['padding_efficiency']:>8.1%} "
              f"{r['peak_rss_mib']:>7.0f} MiB {val:>8} {r['mfu']:>6.1%}  {r['settings']}")
    ok = {k: v for k, v in results.items() if isinstance(v, dict) and "error" not in v}
    o, h, s, t = ok.get("ours"), ok.get("hf"), ok.get("seed"), ok.get("torchdrop")
    if o and h:
        print(f"ours / hf real tok/s: {o['tokens_per_s'] / h['tokens_per_s']:.2f}x; "
              f"val loss ours - hf: {o['val_loss'] - h['val_loss']:+.4f}; peak RSS ours - hf: "
              f"{o['peak_rss_mib'] - h['peak_rss_mib']:+.0f} MiB")
    if o and s:
        print(f"ours / seed real tok/s: {o['tokens_per_s'] / s['tokens_per_s']:.1f}x (seed on a slice)")
    if o and t:
        print(f"fast dropout: ours / ours with --no-fast-dropout real tok/s: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x; "
              f"val loss {o['val_loss']:.4f} vs {t['val_loss']:.4f}")
    if ok.get("t5small"):
        print(f"t5-small-sized model (60M params), 2 steps of train.py: peak RSS {ok['t5small']['peak_rss_mib']:.0f} MiB")
    i = ok.get("infer")
    if i:
        print(f"inference, median of {i['prompts']} prompts: infer.generate_response {i['ours_median_s'] * 1000:.1f} ms, "
              f"plain model.generate {i['plain_median_s'] * 1000:.1f} ms")
        print(f"`python infer.py \"How are you?\"`: {i['cli_wall_s']:.2f} s wall; split: import torch "
              f"{i['import_torch_s']:.2f} s, import transformers+infer {i['import_transformers_infer_s']:.2f} s, "
              f"load {i['load_s']:.2f} s, generate {i['generate_s']:.2f} s")
    elif results.get("infer"):
        print(f"infer failed: {results['infer']['error']}")


def main(argv=None) -> int:
    return run_script("bench_train.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
