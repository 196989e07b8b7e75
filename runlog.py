"""The run's log: ``metrics.jsonl`` (one JSON object per line) and ``loss.png``.

Rows carry ``step`` and either training figures (``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``) or validation ones (``val_loss``,
``val_ppl``). Every line is strict JSON: a non-finite number is written as
null, so any JSON parser reads the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from files import strict, write_atomic

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


def plot_losses(out: Path):
    """metrics.jsonl -> loss.png with training and validation loss curves.

    Redrawn at every validation while training runs, so it is written under a
    temporary name and renamed: an image viewer never opens half a PNG.
    """
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
    fig.tight_layout()
    tmp = out / ".tmp-loss.png"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out / "loss.png")
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
