"""Training (and inference) speed: our loop vs Seq2SeqTrainer vs the seed recipe.

    python bench/bench_train.py                              # full train.txt, 1 epoch, all arms
    python bench/bench_train.py --train-dialogues 400        # a documented slice (first 400 dialogues)
    python bench/bench_train.py --model t5-small             # any other seq2seq model (hub name or folder)

Every arm runs in its own subprocess, so its peak memory is that process's
ru_maxrss; all arms start from the same weights (built once, saved to a temp
folder, loaded by each arm) and train on the same tokenized pairs:

  ours  train.py's Trainer with its defaults (token-budget batches, fast dropout), via train.main;
        --ours-args=--no-fast-dropout measures it with torch's dropout
  hf    Seq2SeqTrainer + DataCollatorForSeq2Seq, train_sampling_strategy="group_by_length",
        batch 16, the same peak lr and warmup share
  seed  the seed recipe: every input and every target padded to 512 tokens,
        batch 2; measured on the first --seed-pairs pairs only (it is ~20x slower)

Validation loss of every arm comes from one function (`shared_val_loss`:
train.evaluate with a fixed token budget on the same validation slice).
Real tokens = non-pad input + target tokens; padding efficiency = real /
processed (padded) tokens, counted on the batches each arm actually ran.
MFU = analytic model FLOPs of the real tokens (6 x params touched per token +
attention) per second, over the fp32 matmul peak measured here with torch.mm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "dailydialog"
EVAL_MAX_TOKENS = 4096  # fixed budget of the shared validation function, whatever the arm's batch


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- shared pieces


def load_model(model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForSeq2SeqLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def load_dataset(tokenizer, path, max_length=512, max_target_length=128):
    from dataset import DailyDialogDataset

    return DailyDialogDataset(tokenizer, path, max_length, max_target_length)


def shared_val_loss(model, tokenizer, val_file) -> float:
    """The one validation loss all arms report: mean token loss, dropout off."""
    import torch

    import train

    ds = load_dataset(tokenizer, val_file)
    return train.evaluate(model, ds, EVAL_MAX_TOKENS, torch.device("cpu"))


def model_flops(config, src_lengths, tgt_lengths) -> float:
    """Training FLOPs of these examples (real tokens only): 3 x forward.

    Forward per token: 2 x the weights it meets (encoder layers for input
    tokens; decoder layers + LM head for target tokens) plus attention
    score/value products (4 x length x inner dim per attention layer).
    """
    d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    gated = "gated" in getattr(config, "feed_forward_proj", "relu")
    ffn = d * ff * (3 if gated else 2)
    enc_layer = 4 * d * inner + ffn
    dec_layer = 8 * d * inner + ffn
    enc = config.num_layers * enc_layer
    dec = config.num_decoder_layers * dec_layer + d * config.vocab_size
    total = 0.0
    for s, t in zip(src_lengths, tgt_lengths):
        fwd = 2 * (enc * s + dec * t)
        fwd += 4 * inner * (config.num_layers * s * s + config.num_decoder_layers * (t * t + t * s))
        total += 3 * fwd
    return total


def matmul_peak_gflops(n=1024, seconds=3.0) -> float:
    """fp32 torch.mm GFLOP/s at the thread count training uses (best of runs)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


# ---------------------------------------------------------------- arms (each in its own process)


def arm_ours(w: Path, extra: list[str], model_dir: Path | None = None, name: str = "ours") -> dict:
    """train.py's real loop with its defaults; validation/saving stubbed out of the timing."""
    import train

    captured = {}
    real_fit = train.Trainer.fit

    def timed_fit(self, stop):
        captured["trainer"] = self
        captured["steps_planned"] = self.total_steps
        start, cpu = time.perf_counter(), cpu_seconds()
        code = real_fit(self, stop)
        captured["seconds"], captured["cpu_seconds"] = time.perf_counter() - start, cpu_seconds() - cpu
        return code

    train.Trainer.fit = timed_fit
    train.Trainer.validate = lambda self, bar: None  # the shared function measures validation after
    train.Trainer.save = lambda self: None  # checkpoint writes are not training speed
    train.plot_losses = lambda out: None
    out = w / f"{name}-run"
    code = train.main(["--model", str(model_dir or w / "model"), "--train-file", str(w / "train.txt"), "--val-file", str(w / "validation.txt"),
                       "--output-dir", str(out), "--log-every", "50", *extra])
    assert code == 0, code
    tr = captured["trainer"]
    rss = peak_rss_mib()
    ds, args = tr.train_ds, tr.args
    from dataset import padding_efficiency, token_budget_batches

    batches = [b for e in range(tr.epoch) for b in token_budget_batches(ds.src_lengths, ds.tgt_lengths, args.max_tokens, args.seed, e)]
    real = sum(ds.src_lengths[i] + ds.tgt_lengths[i] for b in batches for i in b)
    val = None
    if "--max-steps" not in extra:
        tr.model.save_pretrained(w / f"{name}-model")
        tr.tokenizer.save_pretrained(w / f"{name}-model")
        # Validated as saved and reloaded (stock attention), exactly like the other arms' models.
        val = shared_val_loss(*load_model(w / f"{name}-model"), w / "validation.txt")
    return {"arm": name, "seconds": captured["seconds"], "cpu_seconds": captured["cpu_seconds"], "steps": tr.step, "real_tokens": real,
            "padding_efficiency": padding_efficiency(ds.src_lengths, ds.tgt_lengths, batches), "peak_rss_mib": rss,
            "val_loss": val, "settings": f"max_tokens {args.max_tokens}, lr {args.lr}, warmup {args.warmup_ratio}, fast dropout {args.fast_dropout}",
            "flops": model_flops(tr.model.config, [ds.src_lengths[i] for b in batches for i in b],
                                 [ds.tgt_lengths[i] for b in batches for i in b])}


def arm_hf(w: Path, lr: float, warmup: float, epochs: int) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    model, tokenizer = load_model(w / "model")
    ds = load_dataset(tokenizer, w / "train.txt")
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]} for e in ds.examples]
    inner = DataCollatorForSeq2Seq(tokenizer, model=model)
    count = {"real": 0, "processed": 0}

    def collator(features):
        batch = inner(features)
        count["real"] += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        count["processed"] += batch["input_ids"].numel() + batch["labels"].numel()
        return batch

    args = Seq2SeqTrainingArguments(output_dir=str(w / "hf-run"), per_device_train_batch_size=16, learning_rate=lr,
                                    warmup_steps=warmup, num_train_epochs=epochs, train_sampling_strategy="group_by_length",
                                    eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], seed=42,
                                    use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    start, cpu = time.perf_counter(), cpu_seconds()
    result = trainer.train()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    rss = peak_rss_mib()
    val = shared_val_loss(model, tokenizer, w / "validation.txt")
    return {"arm": "hf", "seconds": seconds, "cpu_seconds": cpu, "steps": result.global_step, "real_tokens": count["real"],
            "padding_efficiency": count["real"] / count["processed"], "peak_rss_mib": rss, "val_loss": val,
            "settings": f"batch 16, group_by_length, lr {lr}, warmup {warmup}, optim {args.optim}",
            "flops": model_flops(model.config, ds.src_lengths * epochs, ds.tgt_lengths * epochs)}


def arm_seed(w: Path, lr: float, pairs: int) -> dict:
    """The seed's recipe: inputs and targets each padded to 512 tokens, batch 2, on the first `pairs` pairs."""
    import random

    import torch

    import train

    model, tokenizer = load_model(w / "model")
    ds = load_dataset(tokenizer, w / "train.txt")
    idx = list(range(min(pairs, len(ds))))
    random.Random(42).shuffle(idx)
    torch.manual_seed(42)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    real = processed = 0
    start, cpu = time.perf_counter(), cpu_seconds()
    for k in range(0, len(idx), 2):
        ex = [ds[i] for i in idx[k : k + 2]]
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
        loss.item()  # the seed's per-step logging sync
        real += sum(len(e["input_ids"]) + len(e["labels"]) for e in ex)
        processed += input_ids.numel() + labels.numel()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"arm": "seed", "seconds": seconds, "cpu_seconds": cpu, "steps": (len(idx) + 1) // 2, "real_tokens": real,
            "padding_efficiency": real / processed, "peak_rss_mib": peak_rss_mib(), "val_loss": None,
            "settings": f"pad 512+512, batch 2, first {len(idx)} pairs only",
            "flops": model_flops(model.config, [ds.src_lengths[i] for i in idx], [ds.tgt_lengths[i] for i in idx])}


def arm_peak() -> dict:
    import torch

    return {"arm": "peak", "gflops": matmul_peak_gflops(), "threads": torch.get_num_threads()}


def arm_infer(w: Path, prompts: int) -> dict:
    """Median latency: infer.generate_response vs a plain model.generate with the same settings."""
    import torch

    import infer
    from dataset import encode_history, read_dialogues

    model_dir = w / "ours-model"
    model, tokenizer = infer.load(model_dir, torch.device("cpu"))
    dialogues, _ = read_dialogues(w / "validation.txt")
    texts = [d[0] for d in dialogues][:prompts]
    options = {**infer.GENERATION_DEFAULTS}
    for k in ("top_p", "top_k", "temperature"):
        options.pop(k)
    ours, plain = [], []
    for t in texts:  # interleaved so that load changes hit both alike
        s = time.perf_counter()
        infer.generate_response(t, model, tokenizer, torch.device("cpu"))
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
    probe = ("import time,sys;t0=time.perf_counter();import torch;t1=time.perf_counter();import transformers, infer;"
             "from transformers import AutoModelForSeq2SeqLM;t2=time.perf_counter();from pathlib import Path;"
             f"m,tok=infer.load(Path({str(model_dir)!r}),torch.device('cpu'));t3=time.perf_counter();"
             "infer.generate_response('How are you?',m,tok,torch.device('cpu'));t4=time.perf_counter();"
             "print(t1-t0,t2-t1,t3-t2,t4-t3)")
    s = time.perf_counter()
    parts = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    probe_total = time.perf_counter() - s
    imp_torch, imp_rest, load, gen = map(float, parts.stdout.split())
    return {"arm": "infer", "prompts": len(texts), "ours_median_s": statistics.median(ours), "plain_median_s": statistics.median(plain),
            "cli_wall_s": cli, "probe_total_s": probe_total, "import_torch_s": imp_torch, "import_transformers_infer_s": imp_rest,
            "load_s": load, "generate_s": gen}


# ---------------------------------------------------------------- driver


def prepare(args, w: Path):
    """Slices of the data and the shared initial weights, in the work folder."""
    for name, n in (("train.txt", args.train_dialogues), ("validation.txt", args.val_dialogues)):
        lines = [line for line in Path(getattr(args, name.split(".")[0] + "_file")).read_text().splitlines(True) if line.strip()]
        (w / name).write_text("".join(lines[:n] if n else lines))
    import torch

    import train

    if args.model == "scratch":
        model, tokenizer = train.build_scratch(w / "train.txt", 8000, seed=42)
    else:
        model, tokenizer = train.load_pretrained(args.model)
    model.save_pretrained(w / "model")
    tokenizer.save_pretrained(w / "model")
    return model.config


def run_arm(w: Path, name: str, *extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--_arm", name, "--_work", str(w), *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"arm {name} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_snapshot() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="scratch", help="'scratch' (the small T5 built here) or any seq2seq model")
    p.add_argument("--train-file", default=str(SHARED / "train.txt"))
    p.add_argument("--validation-file", default=str(SHARED / "validation.txt"))
    p.add_argument("--train-dialogues", type=int, default=0, help="use the first N training dialogues (0 = all)")
    p.add_argument("--val-dialogues", type=int, default=200, help="the first N validation dialogues for the shared val loss (0 = all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak lr for all arms (default: train.py's default)")
    p.add_argument("--seed-pairs", type=int, default=60, help="pairs the seed-style arm trains on (a slice)")
    p.add_argument("--arms", default="ours,hf,seed,infer,t5small",
                   help="comma-separated subset to run; 'torchdrop' adds our loop with --no-fast-dropout")
    p.add_argument("--infer-prompts", type=int, default=50)
    p.add_argument("--ours-args", default="", help="extra train.py flags for our arm (default: none, i.e. its defaults)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_arm", help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.validation_file = args.validation_file

    import train

    defaults = train.build_parser().parse_args([])
    lr = args.lr or defaults.lr
    if args._arm:
        w = Path(args._work)
        extra = ["--epochs", str(args.epochs), *(["--lr", str(lr)] if args.lr else []), *args.ours_args.split()]
        if args._arm == "ours":
            out = arm_ours(w, extra)
        elif args._arm == "torchdrop":  # the fast-dropout lever, measured in the same run
            out = arm_ours(w, extra + ["--no-fast-dropout"], name="torchdrop")
        elif args._arm == "t5small":  # memory only: a t5-small-sized model, a few steps of our loop
            from transformers import T5Config, T5ForConditionalGeneration
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(w / "model")
            cfg = T5Config(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
            T5ForConditionalGeneration(cfg).save_pretrained(w / "t5small")
            tok.save_pretrained(w / "t5small")
            out = arm_ours(w, ["--max-steps", "2", "--output-dir", str(w / "t5small-run")], model_dir=w / "t5small")
            out["arm"] = "t5small"
        elif args._arm == "hf":
            out = arm_hf(w, lr, defaults.warmup_ratio, args.epochs)
        elif args._arm == "seed":
            out = arm_seed(w, lr, args.seed_pairs)
        elif args._arm == "peak":
            out = arm_peak()
        elif args._arm == "infer":
            out = arm_infer(w, args.infer_prompts)
        print(json.dumps(out))
        return 0

    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        w = Path(tmp)
        args.train_file, args.validation_file = args.train_file, args.validation_file
        config = prepare(args, w)
        print(f"data: {args.train_dialogues or 'all'} training dialogues of {args.train_file}, "
              f"{args.val_dialogues or 'all'} validation dialogues; model {args.model}; {args.epochs} epoch(s)")
        print(f"before: {load_snapshot()}")
        results = {"peak": run_arm(w, "peak")}
        for name in ("ours", "torchdrop", "hf", "seed", "t5small", "infer"):
            if name in arms and not (name == "infer" and "ours" not in arms):
                print(f"running {name} ... ({load_snapshot()})", flush=True)
                results[name] = run_arm(w, name, "--epochs", str(args.epochs), "--seed-pairs", str(args.seed_pairs),
                                        "--infer-prompts", str(args.infer_prompts), "--ours-args=" + args.ours_args,
                                        *(["--lr", str(args.lr)] if args.lr else []))
        print(f"after: {load_snapshot()}")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict):
    peak = results["peak"]["gflops"]
    print(f"\nfp32 matmul peak (torch.mm 1024^3, {results['peak']['threads']} threads): {peak:.1f} GFLOP/s")
    print(f"{'arm':8} {'steps':>6} {'seconds':>8} {'real tok/s':>10} {'pad eff':>8} {'peak RSS':>10} {'val loss':>8} {'MFU':>6} {'tok/CPU-s':>9}  settings")
    for name in ("ours", "torchdrop", "hf", "seed", "t5small"):
        r = results.get(name)
        if not r:
            continue
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["mfu"] = r["flops"] / r["seconds"] / 1e9 / peak
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        print(f"{name:8} {r['steps']:>6} {r['seconds']:>8.1f} {r['tokens_per_s']:>10.1f} {r['padding_efficiency']:>8.1%} "
              f"{r['peak_rss_mib']:>7.0f} MiB {val:>8} {r['mfu']:>6.1%} {r['real_tokens'] / r['cpu_seconds']:>9.1f}  {r['settings']}")
    o, h, s = results.get("ours"), results.get("hf"), results.get("seed")
    if o and h:
        print(f"ours / hf real tok/s: {o['tokens_per_s'] / h['tokens_per_s']:.2f}x (target >= 2.0x), per CPU-second {o['real_tokens'] / o['cpu_seconds'] / (h['real_tokens'] / h['cpu_seconds']):.2f}x; "
              f"val loss ours - hf: {o['val_loss'] - h['val_loss']:+.4f} (target <= +0.05); "
              f"peak RSS ours - hf: {o['peak_rss_mib'] - h['peak_rss_mib']:+.0f} MiB (target <= 0)")
    if o and s:
        print(f"ours / seed real tok/s: {o['tokens_per_s'] / s['tokens_per_s']:.1f}x (target >= 15x; seed on a slice)")
    t = results.get("torchdrop")
    if o and t:
        print(f"fast dropout: ours / ours with --no-fast-dropout real tok/s: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x; "
              f"val loss {o['val_loss']:.4f} vs {t['val_loss']:.4f}" if o["val_loss"] is not None else "")
    if results.get("t5small"):
        print(f"t5-small-sized model (60M params), 2 steps of our loop: peak RSS {results['t5small']['peak_rss_mib']:.0f} MiB (target <= 4096)")
    i = results.get("infer")
    if i:
        print(f"inference, median of {i['prompts']} prompts: infer.generate_response {i['ours_median_s'] * 1000:.1f} ms, "
              f"plain model.generate {i['plain_median_s'] * 1000:.1f} ms")
        print(f"`python infer.py \"How are you?\"`: {i['cli_wall_s']:.2f} s wall; split: import torch {i['import_torch_s']:.2f} s, "
              f"import transformers+infer {i['import_transformers_infer_s']:.2f} s, load {i['load_s']:.2f} s, generate {i['generate_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
