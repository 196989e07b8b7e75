"""What the benchmarks share: the data flag, FLOPs and peaks, reading a run's metrics.jsonl, one process per arm.

The benchmarks measure train.py through what it shows: `train.main` with its
own flags, the rows it writes to metrics.jsonl (each logging window's
"seconds" and "real_tokens", validation and checkpoint writes outside them)
and the checkpoint it saves. Nothing in train.py is patched.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from t5dialog.cli import UserError  # noqa: E402

EVAL_MAX_TOKENS = 4096  # fixed token budget of the one validation function every arm is scored with
NEVER = str(10**9)  # --eval-every/--save-every beyond any run: only the end-of-run validation and save remain

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the T4 has no bf16, so its fp16.
# None: a card not in this table (the H100 NVL runs at other clocks), whose peak is measured instead.
GPU_PEAKS = [(r"H100.*PCIe", 756.0), (r"H100.*NVL", None), (r"H100", 989.0), (r"H200", 989.0), (r"A100", 312.0),
             (r"\bL4\b", 121.0), (r"RTX 4090", 165.0), (r"\bT4\b", 65.0)]


def data_files(data_dir) -> tuple[Path, Path]:
    """train.txt and validation.txt of --data-dir, or a one-line error saying what to pass."""
    hint = "pass --data-dir DIR holding train.txt/validation.txt, e.g. data/sample"
    if data_dir is None:
        raise UserError(f"no data: {hint} (or data/dailydialog after `python data/download.py`)")
    base = Path(data_dir)
    missing = [n for n in ("train.txt", "validation.txt") if not (base / n).is_file()]
    if missing:
        raise UserError(f"--data-dir {base}: no {' or '.join(missing)} there; {hint}")
    return base / "train.txt", base / "validation.txt"


def write_slice(src: Path, dst: Path, dialogues: int = 0):
    """The first N dialogues (non-blank lines) of a DailyDialog file; 0 = all."""
    lines = [line for line in src.read_text(encoding="utf-8-sig").splitlines(True) if line.strip()]
    dst.write_text("".join(lines[:dialogues] if dialogues else lines), encoding="utf-8")


# ---------------------------------------------------------------- a run's figures, from its files


def window_totals(out: Path) -> dict:
    """Training time and tokens of a train.py run: its logging windows, summed.

    Validation and checkpoint writes fall outside the windows, so with
    --eval-every/--save-every past the run's end this is pure training. The
    first window carries the start-up (and torch.compile's compile), so it is
    also given apart.
    """
    from t5dialog import runlog

    rows = runlog.read_metrics(out / runlog.METRICS)
    windows = [r for r in rows if r.get("seconds") is not None]
    if not windows:
        raise RuntimeError(f"{out / runlog.METRICS} has no training rows")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"seconds": sum(r["seconds"] for r in windows), "real_tokens": sum(r["real_tokens"] for r in windows),
            "steps": windows[-1]["step"], "first_window_seconds": windows[0]["seconds"],
            "first_window_tokens": windows[0]["real_tokens"], "windows": len(windows),
            "final_train_loss": windows[-1]["loss"], "logged_val_loss": vals[-1] if vals else None}


def batches_run(train_ds, argv: list[str], steps: int) -> list[list[int]]:
    """The batches a run with these train.py flags took in its first `steps` steps (one process), from its own plan."""
    import train
    from t5dialog import flags

    args = flags.build_parser().parse_args(argv)
    done: list[list[int]] = []
    epoch, left = 0, steps
    while left > 0:
        plan = train.epoch_plan(train_ds, args, epoch, 1)
        done += [b for step in plan[:left] for b in step]
        left -= min(left, len(plan))
        epoch += 1
    return done


def final_checkpoint(out: Path) -> Path:
    from t5dialog import checkpoint

    return checkpoint.choose_checkpoint(None, output_dir=str(out))


def shared_val_loss(model, tokenizer, val_file, device) -> float:
    """The one validation loss every arm reports: train.py's (validation.validation_loss), fp32, dropout off, a fixed
    token budget."""
    import torch

    from dataset import DailyDialogDataset
    from t5dialog.validation import validation_loss

    if device.type == "cuda":  # strict fp32 whatever the arm's training left set
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ds = DailyDialogDataset(tokenizer, val_file)
    return validation_loss(model.to(device), ds, EVAL_MAX_TOKENS, device)


def load_model(model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForSeq2SeqLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


# ---------------------------------------------------------------- FLOPs and peaks


def model_flops(config, src_lengths, tgt_lengths) -> float:
    """Training FLOPs of these examples (real tokens only): 3 x forward.

    Forward per token: 2 x the weights it meets (encoder layers for input
    tokens; decoder layers + LM head for target tokens) plus attention
    score/value products (4 x length x inner dim per attention layer).
    """
    d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    gated = "gated" in getattr(config, "feed_forward_proj", "relu")
    ffn = d * ff * (3 if gated else 2)
    enc = config.num_layers * (4 * d * inner + ffn)
    dec = config.num_decoder_layers * (8 * d * inner + ffn) + d * config.vocab_size
    total = 0.0
    for s, t in zip(src_lengths, tgt_lengths, strict=True):
        fwd = 2 * (enc * s + dec * t)
        fwd += 4 * inner * (config.num_layers * s * s + config.num_decoder_layers * (t * t + t * s))
        total += 3 * fwd
    return total


def matmul_tflops(device, dtype, n: int, seconds: float) -> float:
    """Best torch.mm rate over `seconds` (TFLOP/s), after a warm-up."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b)
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        sync()
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def device_peak(device) -> dict:
    """The peak MFU is counted against: a CUDA card's dense bf16 data-sheet figure, else a measured torch.mm rate."""
    import torch

    if device.type != "cuda":
        return {"device": f"cpu ({torch.get_num_threads()} threads)", "tflops": matmul_tflops(device, torch.float32, 1024, 3.0),
                "source": "measured fp32 torch.mm 1024^3"}
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in GPU_PEAKS:
        if re.search(pattern, name) and tflops:
            return {"device": name, "tflops": tflops, "source": "data sheet, dense " + ("fp16" if tflops == 65.0 else "bf16")}
        if re.search(pattern, name):
            break
    return {"device": name, "tflops": matmul_tflops(device, torch.bfloat16, 8192, 5.0), "source": "measured bf16 torch.mm 8192^3"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


# ---------------------------------------------------------------- one process per arm


def run_arm(script: str, work: Path, name: str, *extra: str) -> dict:
    """Run `script --_arm name` in its own process; its result is the JSON it writes to work/<name>.json.

    The arm's output goes to work/<name>.log; a failed arm comes back as
    {"arm": name, "error": <last lines>} so the other arms still run.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result_file, log_file = work / f"{name}.json", work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    with open(log_file, "w") as log:
        code = subprocess.call([sys.executable, script, "--_arm", name, "--_work", str(work), *extra], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    if code == 0 and result_file.exists():
        return json.loads(result_file.read_text())
    tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"arm": name, "error": f"exit {code}: " + " | ".join(tail)[-600:]}


def write_result(work: Path, name: str, result: dict):
    (work / f"{name}.json").write_text(json.dumps(result))


def hf_rows_and_collator(ds, tokenizer, model):
    """Seq2SeqTrainer's view of our examples, and a collator that counts real and padded tokens as it goes."""
    from transformers import DataCollatorForSeq2Seq

    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
            for e in ds.examples]
    inner = DataCollatorForSeq2Seq(tokenizer, model=model)
    count = {"real": 0, "processed": 0}

    def collator(features):
        batch = inner(features)
        count["real"] += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        count["processed"] += batch["input_ids"].numel() + batch["labels"].numel()
        return batch

    return rows, collator, count
