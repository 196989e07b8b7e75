"""The run's log: what train.py says as it starts (`banner`), ``metrics.jsonl`` (one JSON
object per line) and ``loss.png``.

Rows carry ``step`` and either training figures (``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``) or validation ones (``val_loss``,
``val_ppl``). Every line is strict JSON: a non-finite number is written as
null, so any JSON parser reads the file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from t5dialog.files import strict, write_atomic

METRICS = "metrics.jsonl"


def append(out: Path, row: dict):
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(strict(row), allow_nan=False) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_metrics(out: Path, step: int):
    """Drop metric rows past the checkpoint we resume from (they will be redone)."""
    path = out / METRICS
    if path.exists():
        write_atomic(path, [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step])


PLOT_EVERY_S = 10.0  # while training, loss.png is redrawn at a validation at most this often (drawing takes ~0.5 s)
_last_drawn: dict[Path, float] = {}  # output dir -> time.monotonic() of its last drawing in this process


def plot_title(out: Path) -> str:
    """What loss.png shows: the run (its output dir), then the model and data its newest checkpoint records.

    The drawings before the first checkpoint name the run only: nothing in the output dir records its
    flags until then.
    """
    from t5dialog.checkpoint import list_checkpoints, read_run_config

    saved = list_checkpoints(out)
    config = read_run_config(saved[-1]) if saved else {}
    title = f"run {Path(out).resolve().name}"
    model, train_file, val_file, share = (config.get(k) for k in ("model", "train_file", "val_file", "val_share"))
    if isinstance(model, str) and isinstance(train_file, str):
        validation = (short_name(val_file) if isinstance(val_file, str) else
                      f"{share:.0%} of its dialogues held out" if isinstance(share, float) else "held-out dialogues")
        title += f"\nmodel {short_name(model)}, trained on {short_name(train_file)}, validated on {validation}"
    return title


def short_name(recorded: str) -> str:
    """A recorded path as its folder and file (``dailydialog/train.txt``: every split is a train.txt somewhere);
    a hub name or 'scratch' as is."""
    return "/".join(Path(recorded).parts[-2:]) if Path(recorded).is_absolute() else recorded


def plot_losses(out: Path, at_most_every: float = 0.0):
    """metrics.jsonl -> loss.png with training and validation loss curves, titled with `plot_title`.

    Redrawn while training runs, at most every ``at_most_every`` seconds (a
    small model validates several times a second, and each drawing costs more
    than its steps), so it is written under a temporary name and renamed: an
    image viewer never opens half a PNG. The end of a run draws it always.
    """
    now = time.monotonic()
    if now - _last_drawn.get(out, -math.inf) < at_most_every:
        return
    _last_drawn[out] = now
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out / METRICS)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    title = plot_title(out)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.88)  # fixed margins: tight_layout cost a third
    tmp = out / ".tmp-loss.png"
    try:
        fig.savefig(tmp, dpi=120, metadata={"Title": title})  # also for whoever reads the file, not the picture
        os.replace(tmp, out / "loss.png")
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def banner(settings, model):
    """What a run says before its first step: device, model, data, length, and two examples (train.Settings)."""
    from t5dialog.models import precision_note

    args, world, log, steps = settings.args, settings.world, settings.log, settings.total_steps
    params = sum(p.numel() for p in model.parameters())
    notes = [f"{world} processes"] if world > 1 else []
    notes.append(precision_note(settings.precision, settings.device))
    if args.fast_dropout and settings.device.type == "cpu" and args.attention != "sdpa":
        notes.append("fast dropout masks")
    log(f"device: {settings.device} ({'; '.join(notes)})")
    log(f"model: {args.model} ({params / 1e6:.1f}M parameters, vocabulary {len(settings.tokenizer):,})")
    log(f"train: {settings.train_ds.path}: {settings.train_ds.stats.summary()}")
    log(f"valid: {settings.val_ds.path}{' (held-out dialogues)' if not args.val_file else ''}: {settings.val_ds.stats.summary()}")
    epochs = f"{args.epochs} epochs" if not args.max_steps else f"--max-steps {args.max_steps}"
    log(f"steps: {steps:,} ({epochs}; batch token budget {args.max_tokens:,} x {args.grad_accum} accumulation"
        f"{f' x {world} ranks' if world > 1 else ''}; lr {args.lr:g}, warmup {args.warmup_ratio:.0%})")
    decode = settings.tokenizer.decode
    for i in (0, len(settings.train_ds) // 2):
        e = settings.train_ds.examples[i]
        log(f"example {i}:\n  input : {decode(e['input_ids'])}\n  target: {decode(e['labels'])}")
