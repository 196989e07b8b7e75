"""Fine-tune T5 on DailyDialog with a plain PyTorch loop.

    python train.py                               # t5-small on the full corpus (downloaded once)
    python train.py --model scratch --epochs 1    # a small T5 from scratch (offline)
    python train.py --resume                      # continue after a crash or Ctrl-C
    torchrun --nproc_per_node 2 train.py ...      # data parallel, same checkpoints

Top to bottom: `run`, a table of contents (output dir, data, model, state,
restore, fit, finish) -> `fit`, the loop, with `train_step`, `validate`,
logging and `save` beside it. The flags live in flags.py, the batch plan and
learning-rate schedule in plan.py, checkpoints in checkpoint.py (atomic,
verified), the validation loss in validation.py. A
checkpoint saves the loop's counters (`TrainingState`, SAVED) with the
optimizer and RNG states; `--resume` loads them in `restore`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dataset import collated_steps, dialogue_file, load_datasets
from t5dialog import checkpoint as ckpt
from t5dialog import distributed, estimate, flags, modelcard, models, outdir, runlog, training_files
from t5dialog.cli import UserError, run_script
from t5dialog.faults import fault
from t5dialog.plan import epoch_plan, lr_at, plan_key, schedule_position, total_steps
from t5dialog.validation import validation_loss, validation_set_id

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    stop = distributed.StopFlag()  # the README's signal table holds from here to exit
    try:
        return run_script("train.py", functools.partial(run, stop=stop), argv,
                          rerun="rerun with --resume (the last checkpoint is intact)",
                          out_of_memory="lower --max-tokens (and raise --grad-accum to keep the step size), "
                                        "then rerun with --resume")
    except distributed.Stopped as e:  # before the first step or after the last: nothing unsaved
        print(f"train.py: stopped by {stop.name(e.signum)} {e.when}; every checkpoint written is kept", file=sys.stderr)
        return 128 + e.signum
    finally:
        stop.restore()
        distributed.shutdown()


def run(argv, stop) -> int:
    args, typed = flags.parse(argv)
    out, lock, resume_from, damaged = outdir.open_run_dir(args.output_dir, args.resume, distributed.is_main_process())
    if resume_from:
        flags.merge_resumed_flags(args, typed, ckpt.read_run_config(resume_from), resume_from)
    flags.check_args(args)
    rank, world, device = distributed.setup(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    for message in damaged:
        log(message)
    precision = models.resolve_precision(args.precision, device)
    data_note, train_file, val_file = pick_data(args, rank, world, log)
    model, tokenizer, saved = load_model(args, typed, resume_from, train_file, log)
    log(data_note)
    train_ds, val_ds = load_datasets(args, tokenizer, train_file, val_file)
    fault("startup", "loaded")
    distributed.check_same_everywhere("model and data", (args.model, len(tokenizer), plan_key(args, train_ds)), world)
    if rank == 0:  # only now, when nothing is left to refuse, does the run create or change files
        lock = outdir.lock_output_dir(out, args.resume, lock, log)
    settings, state = setup(args, out, device, rank, world, log, precision, model, tokenizer, train_ds, val_ds)
    last_step = total_steps(args, train_ds, world)
    if saved is not None:
        last_step = restore(state, saved, settings, resume_from, last_step)
    settings = replace(settings, total_steps=last_step)
    if rank == 0:
        runlog.truncate_metrics(out, state.step)  # rows past the checkpoint (or all, starting over) are redone
        outdir.write_lock_holder(lock)
    runlog.banner(settings, model)
    log_cost(state, settings, fresh=saved is None)
    stop.start_training()
    code = fit(state, settings, stop)
    if code == 0:
        stop.end_training()
    if code == 0 and rank == 0:
        finish(state, settings)
    return code


def pick_data(args, rank: int, world: int, log):
    """--train-file/--val-file as chosen (rank 0 may download first), each read once (a `DialogueFile`, or
    None for no validation file); returns (the line saying what the data is, training file, validation file)."""
    if rank == 0:
        choice = training_files.choose_data(args.train_file, args.val_file, args.no_download, may_download=True, log=log)
    distributed.barrier(world)  # rank 0 may have downloaded the corpus; the others now find it
    if rank > 0:
        choice = training_files.choose_data(args.train_file, args.val_file, args.no_download, may_download=False, log=log)
    args.train_file, args.val_file = choice.train_file, choice.val_file  # recorded in run_config.json as chosen
    # Read now, so a bad data file fails before the model loads; parsed from the bytes that are hashed.
    train_file, val_file = (dialogue_file(path) if path else None for path in (args.train_file, args.val_file))
    return choice.note(args.val_share, args.seed), train_file, val_file


def load_model(args, typed: set[str], resume_from: Path | None, train_file, log):
    """(model, tokenizer, saved training state or None): the checkpoint resumed, else --model."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library's loading and saving bars would drown ours...
    enable_progress_bars()  # ...but a model downloaded from the hub shows how far it got
    if resume_from:
        return (*models.load_checkpoint(resume_from), ckpt.load_training_state(resume_from))
    model, tokenizer, args.model = models.choose_model(args.model, "model" in typed, train_file,
                                                       args.scratch_vocab_size, args.seed, log)
    return model, tokenizer, None


@dataclass(frozen=True)
class Settings:
    """What stays fixed while `fit` runs: flags, data, device, ranks, and the model as the loop calls it."""

    args: object
    out: Path
    device: torch.device
    rank: int
    world: int
    log: object
    precision: str
    tokenizer: object
    train_ds: object
    val_ds: object
    forward: object  # the model, DDP-wrapped and/or compiled
    val_set_id: str  # validation.validation_set_id: "best" compares losses measured on this set only
    total_steps: int = 0


SAVED = ("step", "epoch", "batch", "best_val_loss", "best_step")  # the counters a checkpoint carries


@dataclass
class TrainingState:
    """What changes while `fit` runs: the SAVED counters, which checkpoints carry, and bookkeeping never saved."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    # Saved (SAVED):
    step: int = 0  # optimizer steps taken; a resumed run counts on
    epoch: int = 0  # the epoch under way, from 0
    batch: int = 0  # that epoch's batches done, all ranks together
    best_val_loss: float | None = None
    best_step: int | None = None
    # Never saved:
    step_offset: int = 0  # step number - the schedule's step (an epoch run resumed with another step size)
    saved_step: int | None = None  # the step of the last checkpoint this process wrote or resumed from
    val_at: dict[int, float] = field(default_factory=dict)  # step -> validation loss measured at that step
    first_bad_step: torch.Tensor | None = None  # on the device: the first step with a non-finite loss or gradient, or inf


def setup(args, out, device, rank, world, log, precision, model, tokenizer, train_ds, val_ds):
    """The fixed `Settings` and a fresh `state`: the model on its device, wrapped for DDP and compile, and its optimizer."""
    torch.manual_seed(distributed.dropout_seed(args.seed, rank, 0))
    random.seed(args.seed)
    model = models.prepare_for_training(model, device, precision, args.attention, args.fast_dropout)
    forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.compile:  # after DDP, so gradient all-reduce overlaps the compiled backward
        forward = torch.compile(forward)
    settings = Settings(args, out, device, rank, world, log, precision, tokenizer, train_ds, val_ds, forward,
                        validation_set_id(val_ds))
    state = TrainingState(model, make_optimizer(model, args, device), first_bad_step=torch.full((), math.inf, device=device))
    return settings, state


# ---------------------------------------------------------------- optimizer, resume (the plan and schedule: plan.py)


def make_optimizer(model, args, device):
    """AdamW; no weight decay on biases and layer-norm weights (1-d tensors). Fused on CUDA: one kernel per step."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused, foreach=not fused)


def restore(state, saved: dict, settings: Settings, checkpoint: Path, planned: int) -> int:
    """Load a checkpoint's training state into ``state``; returns the run's last step number.

    Flags typed with --resume were merged by flags.py. The run goes on at the
    same batch of the same epoch, and step numbers go on from the checkpoint's,
    whatever the step size (--grad-accum x world size). --max-steps N counts
    those numbers: the run ends, and its learning rate reaches 0, at step N.
    An epoch run ends at the end of its data instead (``planned`` steps from
    the start at this step size): its schedule counts this run's steps to the
    same point of the data (``step_offset`` is the difference), so the rate at
    a given point of the data stays the same.
    """
    args, world = settings.args, settings.world
    state.optimizer.load_state_dict(saved["optimizer"])
    fused = settings.device.type == "cuda"
    for group, decay in zip(state.optimizer.param_groups, (args.weight_decay, 0.0), strict=True):
        group.update(weight_decay=decay, fused=fused, foreach=not fused)  # this run's settings, not the saved ones
    before, now = saved["batches_per_step"], args.grad_accum * world
    for k in SAVED:
        setattr(state, k, saved[k])
    state.saved_step = saved["step"]
    batch, recorded = saved["batch"], saved["plan"]
    if batch > 0 and recorded != plan_key(args, settings.train_ds):
        changed = ", ".join(k for k in recorded if recorded[k] != plan_key(args, settings.train_ds).get(k))
        raise UserError(f"{checkpoint.name} stopped mid-epoch and its batch plan no longer matches ({changed} changed): "
                        "resume with the same training file and --max-tokens/--max-length/--max-target-length, "
                        "or resume from a checkpoint saved at an epoch end")
    if not epoch_plan(settings.train_ds, args, state.epoch, world, start=batch):  # the epoch was done
        state.epoch, state.batch = state.epoch + 1, 0
    state.step_offset = 0
    if not args.max_steps:  # an epoch run: this run's steps to the same point of the data
        state.step_offset = state.step - schedule_position(settings.train_ds, args, state.epoch, state.batch, world)
    last_step = planned + state.step_offset
    if state.step >= last_step:
        raise UserError(f"{checkpoint.name} is already at step {state.step}, the end of this run: nothing to resume; "
                        "raise --epochs or --max-steps to train longer")
    if before != now:
        settings.log(f"the checkpoint took {before} batches per step, this run takes {now}: continuing at batch "
                     f"{state.batch} of epoch {state.epoch + 1}, step numbers going on from {state.step}")
    # Losses on different validation sets do not compare (a checkpoint from before the set was recorded: same set).
    if state.best_step is not None and saved.get("validation", settings.val_set_id) != settings.val_set_id:
        settings.log(f"the validation set differs from the one {checkpoint.name} was validated on: \"best\" starts "
                     f"afresh from this run's validation losses (the old best, step {state.best_step}, no longer counts; "
                     "--keep prunes it like any other)")
        state.best_val_loss = state.best_step = None
    ckpt.set_rng_state(saved["rng"])
    if settings.rank > 0:  # other ranks: their own dropout noise
        torch.manual_seed(distributed.dropout_seed(args.seed, settings.rank, state.step))
    settings.log(f"resuming from {checkpoint.name}: step {state.step}, epoch {state.epoch + 1}, "
                 f"batch {state.batch} of it")
    return last_step


# ---------------------------------------------------------------- the loop


def fit(state: TrainingState, settings: Settings, stop: distributed.StopFlag) -> int:
    """Train until settings.total_steps; returns the exit code (128 + signal when stopped by one)."""
    from tqdm import tqdm

    args = settings.args
    window = {"loss": torch.zeros((), device=settings.device), "real_tokens": 0, "start": time.perf_counter(), "steps": 0}
    state.model.train()
    with tqdm(total=settings.total_steps, initial=state.step, desc="training", unit="step", disable=settings.rank != 0,
              dynamic_ncols=True) as bar:
        while state.step < settings.total_steps:
            steps = epoch_plan(settings.train_ds, args, state.epoch, settings.world, start=state.batch)
            epoch_end = state.batch + sum(len(s) for s in steps)  # the epoch's batch count
            for step_batches, batches in collated_steps(steps, settings.train_ds, settings.rank, settings.world,
                                                        settings.device):
                loss_sum, step_tokens, real_tokens, grad_norm = train_step(state, settings, step_batches, batches)
                state.step += 1
                state.batch += len(step_batches)
                end_of_epoch = state.batch == epoch_end
                if end_of_epoch:  # a finished epoch resumes at the next one
                    state.epoch, state.batch = state.epoch + 1, 0
                last = state.step == settings.total_steps
                window["loss"] += loss_sum / step_tokens  # this rank's share of the step's mean token loss
                window["real_tokens"] += real_tokens
                window["steps"] += 1
                bar.update(1)
                signum, snapshot = stop.poll(settings.world)  # every step, on every rank: they stop or save together
                if state.step % args.log_every == 0 or last or signum:  # a stop logs the steps since the last row
                    log_window(state, settings, window, grad_norm, bar, step_batches)
                elif args.log_examples:
                    record(settings, {"step": state.step, "examples": [i for b in step_batches for i in b]})
                if state.step % args.eval_every == 0 or end_of_epoch or last:
                    validate(state, settings, bar)
                if state.step % args.save_every == 0 or end_of_epoch or last or signum or snapshot:
                    save(state, settings)
                if snapshot and not signum and settings.rank == 0:
                    bar.write(f"{stop.name(stop.SNAPSHOT)}: saved {ckpt.checkpoint_name(state.step)}; training goes on")
                if signum:
                    bar.close()
                    settings.log(f"stopped by {stop.name(signum)} at step {state.step}; checkpoint saved, "
                                 "continue with --resume")
                    return 128 + signum
                if end_of_epoch or last:
                    break
    return 0


def train_step(state: TrainingState, settings: Settings, step_batches: list[list[int]], batches: list[dict]):
    """Forward/backward over this rank's micro-batches, then one AdamW step.

    The loss is normalised by the target tokens of the whole step on all
    ranks (known from the plan, no communication needed), so accumulation and
    data parallelism give the gradient of one big batch.
    """
    ds, optimizer = settings.train_ds, state.optimizer
    step_tokens = sum(ds.tgt_lengths[i] for b in step_batches for i in b)  # targets: what the loss averages over
    real_tokens = sum(ds.src_lengths[i] + ds.tgt_lengths[i] for b in step_batches for i in b)  # non-pad, all ranks
    loss_sum = torch.zeros((), device=settings.device)
    for k, batch in enumerate(batches):
        batch = models.to_device(batch, settings.device)
        sync = k == len(batches) - 1 or settings.world == 1  # DDP: all-reduce gradients on the last micro-batch only
        no_sync = settings.forward.no_sync() if not sync else contextlib.nullcontext()
        with no_sync, models.autocast(settings.device, settings.precision):
            loss = models.token_loss_sum(settings.forward, batch)
        (loss * settings.world / step_tokens).backward()  # DDP averages over ranks; we want the sum
        loss_sum += loss.detach()
    fault("mid_step", state.step + 1)
    # 0 disables clipping; the norm is still measured for the log.
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), settings.args.max_grad_norm or math.inf)
    # Remember the first step whose loss or gradient is not finite, without waiting for the device: a nan
    # gradient turns every weight nan at optimizer.step even when the loss itself was finite.
    first = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)) & torch.isinf(state.first_bad_step)
    state.first_bad_step = torch.where(first, float(state.step + 1), state.first_bad_step)
    lr = lr_at(state.step, state.step_offset, settings.args, settings.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, step_tokens, real_tokens, grad_norm


def log_cost(state: TrainingState, settings: Settings, fresh: bool):
    """The banner's last lines: steps left and a time measured on a warm-up of the first step (rank 0 only)."""
    if settings.rank != 0:
        return
    first = epoch_plan(settings.train_ds, settings.args, state.epoch, settings.world, start=state.batch)[:1]
    _, batches = next(collated_steps(first, settings.train_ds, 0, settings.world, settings.device))
    step_s = estimate.seconds_per_step(state.model, batches, settings.device, settings.precision)
    for line in estimate.cost_lines(settings.total_steps - state.step, step_s, settings.device, settings.args.model, fresh):
        settings.log(line)


def validate(state: TrainingState, settings: Settings, bar):
    step = state.step
    if step in state.val_at:
        return
    loss = validation_loss(state.model, settings.val_ds, settings.args.max_tokens, settings.device, settings.rank,
                           settings.world, settings.precision)
    state.val_at[step] = loss
    from t5dialog.metrics import perplexity  # here: its text metrics' imports cost half a second at every start
    record(settings, {"step": step, "epoch": state.epoch, "val_loss": loss, "val_ppl": perplexity(loss)})
    if settings.rank == 0:
        bar.write(f"step {step}: validation loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        runlog.plot_losses(settings.out, at_most_every=runlog.PLOT_EVERY_S)  # the curves so far, for whoever watches


def log_window(state: TrainingState, settings: Settings, window: dict, grad_norm, bar, step_batches):
    """The only place the loop waits for the device (.item()): once per --log-every steps."""
    total = window["loss"].clone()
    if settings.world > 1:
        torch.distributed.all_reduce(total)  # add up the ranks' shares
    loss = total.item() / window["steps"]  # waits for the queued steps, so the time below counts all of them
    elapsed = time.perf_counter() - window["start"]
    lr = lr_at(state.step - 1, state.step_offset, settings.args, settings.total_steps)  # the rate this step used
    row = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
           "tokens_per_s": window["real_tokens"] / max(elapsed, 1e-9), "real_tokens": window["real_tokens"],
           "seconds": elapsed}
    if settings.args.log_examples:
        row["examples"] = [i for b in step_batches for i in b]
    record(settings, row)
    check_finite(state, settings)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    window.update(loss=torch.zeros((), device=settings.device), real_tokens=0, start=time.perf_counter(), steps=0)


def check_finite(state: TrainingState, settings: Settings):
    """Stop at the first non-finite loss, before anything is saved from it (a host sync: logging and saving only)."""
    bad = state.first_bad_step.clone()
    if settings.world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    if math.isfinite(bad.item()):
        latest = ckpt.read_index(settings.out).get("latest")
        kept = f"the last good checkpoint ({latest}) is kept" if latest else "no checkpoint was saved"
        raise UserError(f"step {int(bad.item())}: the training loss or its gradient is not finite (nan or inf); {kept}: "
                        f"lower --lr (now {settings.args.lr:g}) or raise --warmup-ratio, and start again")


def record(settings: Settings, row: dict):
    if settings.rank == 0:
        runlog.append(settings.out, row)


def save(state: TrainingState, settings: Settings):
    """Commit checkpoint-<step> (rank 0 writes, everyone waits), then point checkpoints.json at it."""
    step = state.step
    if state.saved_step == step:
        return
    check_finite(state, settings)
    if settings.rank == 0:
        val = state.val_at.get(step)
        if val is not None and math.isfinite(val) and (state.best_val_loss is None or val < state.best_val_loss):
            state.best_val_loss, state.best_step = val, step
        saved = {k: getattr(state, k) for k in SAVED}
        saved.update(optimizer=state.optimizer.state_dict(), rng=ckpt.rng_state(), world_size=settings.world,
                     batches_per_step=settings.args.grad_accum * settings.world, plan=plan_key(settings.args, settings.train_ds),
                     validation=settings.val_set_id)
        metrics = {"step": step, "val_loss": val, "best_val_loss": state.best_val_loss}
        config = flags.run_config(settings.args, len(settings.tokenizer))
        path = ckpt.save_checkpoint(settings.out, step, state.model, settings.tokenizer, saved, config,
                                    modelcard.files_for(config, metrics, step))
        best = settings.out / ckpt.checkpoint_name(state.best_step) if state.best_step is not None else None
        ckpt.update_index_and_prune(settings.out, path, best, state.best_val_loss, settings.args.keep)
    state.saved_step = step
    distributed.barrier(settings.world)  # nobody reads a half-written checkpoint


# ---------------------------------------------------------------- reporting


def finish(state: TrainingState, settings: Settings):
    """The loss plot, a summary line, and --eval-generate (eval.py, in its own process)."""
    args, out, log = settings.args, settings.out, settings.log
    runlog.plot_losses(out)
    fault("finish", "plotted")
    index = ckpt.read_index(out)
    best = f"best validation loss {index['best_val_loss']:.4f} in {out / index['best']}" if index.get("best") else \
        "no validation loss recorded"
    log(f"done: {state.step} steps; {best}; latest {out / index['latest']}; curves in {out / 'loss.png'}")
    if args.eval_generate and not args.val_file:
        log("--eval-generate skipped: it needs a validation file (--val-file), not held-out dialogues")
    elif args.eval_generate:
        import subprocess

        checkpoint = out / (index.get("best") or index["latest"])
        command = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(checkpoint), "--data", args.val_file,
                   "--max-examples", str(args.eval_generate), "--device", str(settings.device), "--precision", settings.precision]
        code = subprocess.call(command)
        if code:
            log(f"generation eval failed with exit code {code}")


if __name__ == "__main__":
    sys.exit(main())
