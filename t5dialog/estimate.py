"""What a run will cost, said before its first step: the steps, and a time measured on a warm-up step.

`python train.py` online on a CPU means t5-small on the full corpus: hours.
A user should learn that before waiting, not from the progress bar an hour in.
"""

from __future__ import annotations

import time

import torch

from t5dialog import models
from t5dialog.checkpoint import rng_state, set_rng_state

SHORT_RUN_STEPS = 200  # what the note on a long CPU run suggests: enough to see the loss fall and a checkpoint saved
LONG_S = 3600  # a run past an hour on a CPU with a pretrained model gets that note


def seconds_per_step(model, batches: list[dict], device, precision: str, passes: int = 3) -> float:
    """Seconds of forward and backward over one step's micro-batches: the fastest of ``passes`` after the first.

    The first pass pays one-time costs (memory, kernel choice), and the
    fastest of the rest is the least disturbed by other work on the machine.
    The run's random state and gradients are left as they were, so a resumed
    run stays bit-exact; the optimizer step is not timed, as it must not be taken.
    """
    saved = rng_state()
    times = []
    try:
        for _ in range(passes):
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                with models.autocast(device, precision):
                    loss = models.token_loss_sum(model, models.to_device(batch, device))
                loss.backward()
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        model.zero_grad(set_to_none=True)
        set_rng_state(saved)
    return min(times[1:] or times)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def duration(seconds: float) -> str:
    """'2 h 05 min', '14 min', '40 s': as precise as a guess from one step deserves."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{max(1, round(seconds))} s"


def cost_lines(steps_left: int, step_s: float, device, model_name: str, fresh: bool) -> list[str]:
    """The banner's cost line, and on a CPU a pointer to a short run when a pretrained model would take hours."""
    total = steps_left * step_s
    steps = f"{steps_left:,} step{'s' * (steps_left != 1)}"
    lines = [f"cost: {steps}, about {duration(total)} on {device} ({step_s:.3g} s a step, timed on warm-up passes; "
             "validation and checkpoints add to it)"]
    if torch.device(device).type == "cpu" and model_name != "scratch" and fresh and total > LONG_S:
        lines.append(f"note: that is long for a CPU: add --max-steps {SHORT_RUN_STEPS} for a short run (about "
                     f"{duration(SHORT_RUN_STEPS * step_s)}) that shows the loss falling and a checkpoint saved; "
                     "a GPU is much faster")
    return lines
