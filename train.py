"""Fine-tune T5 on DailyDialog with a plain PyTorch loop.

    python train.py                               # t5-small on the default data
    python train.py --model scratch --epochs 1    # a small T5 from scratch (offline)
    python train.py --resume                      # continue after a crash or Ctrl-C
    torchrun --nproc_per_node 2 train.py ...      # data parallel, same checkpoints

The story, top to bottom: flags -> output dir checks -> model and tokenizer ->
data -> the loop (AdamW, warmup then linear decay, clipping, accumulation) ->
evaluation -> crash-safe checkpoints (checkpoint.py) -> loss plot.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint as ckpt
import fast_dropout
from dataset import SEPARATOR, DailyDialogDataset, DataError, collate, read_dialogues, token_budget_batches
from cli import UserError as InferError, pick_device

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "t5-small"
FULL_DATA = ROOT / "data" / "dailydialog"  # written by `python data/download.py`
SAMPLE_DATA = ROOT / "data" / "sample"  # the project's own small demo dialogues
# A T5 sized for a laptop CPU when t5-small cannot be had (about 12M parameters
# with an 8k vocabulary): same architecture, 4 encoder + 4 decoder layers.
SCRATCH_CONFIG = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4, dropout_rate=0.1)
METRICS = "metrics.jsonl"


class UsageError(ValueError):
    """A flag or environment problem the user can fix; printed in one line."""


# ---------------------------------------------------------------- flags


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=DEFAULT_MODEL, help="hub name or local folder of a seq2seq model; 'scratch' trains a small T5 from scratch")
    a("--train-file", default=None, help="DailyDialog training file (default: data/dailydialog/train.txt, else the demo sample)")
    a("--val-file", default=None, help="DailyDialog validation file (default: beside the training data)")
    a("--output-dir", default="checkpoints", help="where checkpoints, metrics.jsonl and the loss plot go")
    a("--resume", action="store_true", help="continue from the newest good checkpoint in --output-dir")
    a("--epochs", type=int, default=3, help="passes over the training data")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--lr", type=float, default=5e-4, help="peak learning rate of AdamW")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not applied to biases and layer norms)")
    a("--warmup-ratio", type=float, default=0.05, help="share of all steps spent warming the learning rate up from 0")
    a("--max-tokens", type=int, default=2048, help="token budget of a batch: rows x (longest input + longest target)")
    a("--grad-accum", type=int, default=1, help="batches whose gradients are summed before one optimizer step")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this value (0 disables)")
    a("--max-length", type=int, default=512, help="input tokens; older turns are dropped first")
    a("--max-target-length", type=int, default=128, help="target tokens; longer responses are cut")
    a("--eval-every", type=int, default=500, help="validation loss every N steps (and at each epoch end)")
    a("--save-every", type=int, default=500, help="checkpoint every N steps (and at each epoch end)")
    a("--keep", type=int, default=2, help="keep the newest K checkpoints (the best is kept too)")
    a("--log-every", type=int, default=10, help="log loss, lr, grad norm and tokens/s every N steps")
    a("--seed", type=int, default=42, help="seed of initialisation, data order and dropout")
    a("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    a("--fast-dropout", action=argparse.BooleanOptionalAction, default=True,
      help="on CPU, draw dropout masks 64 bits per 4 elements instead of one call each (fast_dropout.py; measured 1.3x faster training here)")
    a("--scratch-vocab-size", type=int, default=8000, help="vocabulary of the tokenizer trained for --model scratch")
    a("--eval-generate", type=int, default=0, help="at the end, generate for the first N validation pairs and write eval metrics")
    a("--log-examples", action="store_true", help="debug: record each step's example indices in metrics.jsonl")
    return p


def explicit_flags(argv) -> set[str]:
    """The flags the user actually typed (so --resume can reuse the others)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def check_args(args):
    """Refuse contradictory or impossible settings before any work starts."""
    positive = {"--lr": args.lr, "--epochs": args.epochs, "--max-tokens": args.max_tokens, "--grad-accum": args.grad_accum,
                "--eval-every": args.eval_every, "--save-every": args.save_every, "--keep": args.keep,
                "--log-every": args.log_every, "--max-length": args.max_length, "--max-target-length": args.max_target_length}
    if args.max_steps is not None:
        positive["--max-steps"] = args.max_steps
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if not 0 <= args.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.max_grad_norm < 0 or args.weight_decay < 0 or args.eval_generate < 0:
        raise UsageError("--max-grad-norm, --weight-decay and --eval-generate cannot be negative")
    if args.max_tokens < args.max_length + args.max_target_length:
        raise UsageError(f"--max-tokens {args.max_tokens} cannot hold one example of --max-length + --max-target-length "
                         f"({args.max_length + args.max_target_length}); raise --max-tokens or lower the lengths")


def default_data(args) -> str:
    """Fill in --train-file/--val-file; returns a note about which data it is."""
    if args.train_file is None:
        base = FULL_DATA if (FULL_DATA / "train.txt").exists() else SAMPLE_DATA
        args.train_file = str(base / "train.txt")
        if args.val_file is None:
            args.val_file = str(base / "validation.txt")
        if base == SAMPLE_DATA:
            return ("note: training on the project's small demo sample (data/sample); for real results run "
                    "`python data/download.py` to get the full DailyDialog corpus")
        return "data: the full DailyDialog corpus in data/dailydialog"
    if args.val_file is None:
        candidate = Path(args.train_file).with_name("validation.txt")
        if not candidate.exists() or candidate == Path(args.train_file):
            raise UsageError(f"no --val-file given and no validation.txt beside {args.train_file}; pass --val-file FILE")
        args.val_file = str(candidate)
    return f"data: {args.train_file} (validation: {args.val_file})"


# ---------------------------------------------------------------- output dir


def prepare_output_dir(out: Path, resume: bool, is_main: bool):
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is an existing file; pass a folder path")
    has_run = bool(ckpt.list_checkpoints(out)) or (out / ckpt.INDEX).exists()
    if resume and not ckpt.list_checkpoints(out):
        raise UsageError(f"--resume: no checkpoint in {out}; run without --resume to start training, or pass the right --output-dir")
    if has_run and not resume:
        raise UsageError(f"{out} already holds a training run; add --resume to continue it, or pass another --output-dir")
    if not is_main:
        return
    try:
        ckpt.make_writable_dir(out)
    except OSError as e:
        raise UsageError(f"--output-dir {out} is not writable ({e.strerror}); fix its permissions or pass another folder") from None
    removed = ckpt.remove_leftovers(out)
    if removed:
        print(f"removed unfinished temporary files of an interrupted run: {', '.join(removed)}")


# ---------------------------------------------------------------- model


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection instead of the hub client's minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(name: str):
    """Model and tokenizer from a local folder or the hub (or its cache when offline)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    local = Path(name).is_dir()
    offline = not local and not hub_reachable()
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, use_safetensors=True, local_files_only=offline)
    return model, tokenizer


def train_tokenizer(texts, vocab_size: int):
    """A SentencePiece-style (Unigram) T5 tokenizer trained on our own text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    raw = Tokenizer(models.Unigram())
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    # T5's convention: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    raw.train_from_iterator(texts, trainer)
    vocab = [tuple(piece) for piece in json.loads(raw.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_scratch(train_file, vocab_size: int, seed: int, **config_overrides):
    """A randomly initialised T5 (SCRATCH_CONFIG) and a tokenizer trained on the training text."""
    from transformers import T5Config, T5ForConditionalGeneration

    dialogues, _ = read_dialogues(train_file)
    # Train on the text as the model sees it, separator included, so that
    # __eou__ gets tokens of its own instead of <unk>.
    tokenizer = train_tokenizer([SEPARATOR.join(d) for d in dialogues], vocab_size)
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, **{**SCRATCH_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config), tokenizer


def choose_model(args, explicit: set[str], log):
    """The model to start from: --model, or scratch when the default can't be had."""
    if args.model == "scratch":
        return build_scratch(args.train_file, args.scratch_vocab_size, args.seed)
    try:
        return load_pretrained(args.model)
    except (OSError, ValueError) as e:
        if "model" in explicit:  # the user named it: never swap in something else
            reason = str(e).strip().splitlines()[0][:200]
            raise UsageError(f"cannot load --model {args.model} ({reason}); check the name or folder, or use --model scratch") from None
    bar = "!" * 78
    log(f"{bar}\nWARNING: the default model '{DEFAULT_MODEL}' is not available (no connection to the Hugging Face hub\n"
        f"and not in its cache). Training a SMALL T5 FROM SCRATCH instead (see SCRATCH_CONFIG in train.py).\n"
        f"Its replies will be far worse than a fine-tuned t5-small. Pass --model scratch to silence this.\n{bar}")
    args.model = "scratch"
    return build_scratch(args.train_file, args.scratch_vocab_size, args.seed)


def resume_model(path: Path, args, explicit: set[str]):
    """Model and tokenizer of a checkpoint, after checking it fits this run."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    recorded = ckpt.read_run_config(path)
    if "model" in explicit and recorded.get("model") not in (None, args.model):
        raise UsageError(f"{path} was trained from --model {recorded['model']}, not {args.model}; "
                         f"resume with --model {recorded['model']}, or start a new run with another --output-dir")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path} cannot be loaded ({str(e).splitlines()[0][:160]}); "
                                   "delete it to fall back to an older checkpoint, or start a new run") from None
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(f"{path}: its tokenizer ({len(tokenizer)} tokens) does not fit its model "
                         f"({model.config.vocab_size}); this checkpoint mixes a model and a tokenizer of different runs")
    return model, tokenizer


# ---------------------------------------------------------------- distributed


def setup_distributed(device_flag: str):
    """(rank, world_size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
            raise UsageError("WORLD_SIZE is set but RANK/MASTER_ADDR/MASTER_PORT are not; launch with torchrun (see README)")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        import datetime

        # How long a rank waits for the others (start-up, barriers, collectives)
        # before it gives up with an error instead of hanging.
        timeout = float(os.environ.get("TRAIN_DIST_TIMEOUT", "1800"))
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
        except dist.DistError as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UsageError(f"rank {rank} of {world}: the other processes did not join within {timeout:g}s ({reason}); "
                             f"start every rank with torchrun and the same rendezvous endpoint (see README)") from None
        return rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return 0, 1, pick_device(device_flag)


def barrier(world: int):
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------- the loop pieces


def make_optimizer(model, args):
    """AdamW; no weight decay on biases and layer-norm weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, foreach=True)


def warmup_then_linear(warmup_steps: int, total_steps: int):
    """LR multiplier: 0 -> 1 over the warmup, then linearly back to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def token_loss_sum(model, batch):
    """Summed cross-entropy over the non-pad target tokens of a batch.

    ``model`` may be wrapped in DistributedDataParallel; the decoder input is
    the labels shifted right, as the model itself would build them.
    """
    decoder_input_ids = getattr(model, "module", model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1), ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate(model, dataset, max_tokens: int, device, rank: int = 0, world: int = 1) -> float:
    """Validation loss per target token, summed over ranks before dividing."""
    model.eval()
    batches = token_budget_batches(dataset.src_lengths, dataset.tgt_lengths, max_tokens, seed=0, epoch=0)[rank::world]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        batch = to_device(collate([dataset[i] for i in b], dataset.pad_id), device)
        totals[0] += token_loss_sum(model, batch).double()
        totals[1] += (batch["labels"] != -100).sum()
    if world > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_plan(train_ds, args, epoch: int, world: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps, each a list of batches for all ranks.

    A pure function of (seed, epoch): ranks agree without talking, and a
    resumed run recomputes it. With several ranks the tail that does not
    divide evenly is dropped so every rank takes the same number of steps.
    """
    batches = token_budget_batches(train_ds.src_lengths, train_ds.tgt_lengths, args.max_tokens, args.seed, epoch)
    batches = batches[: len(batches) - len(batches) % world]
    per_step = args.grad_accum * world
    return [batches[i : i + per_step] for i in range(0, len(batches), per_step)]


class StopFlag:
    """SIGTERM/SIGINT only set a flag; the loop saves at the next step boundary."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """After the loop, signals act as usual again (plotting and eval stay interruptible)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once

    def agree(self, device):
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item()) or None


def fault(stage: str, step: int):
    """Test hook: TRAIN_FAULT="[action:]stage@step,..." acts at that point.

    action: kill (SIGKILL, the default), term (SIGTERM), int (SIGINT) or
    enospc (a write that fails as on a full disk). Stages: mid_step,
    mid_save, before_commit, before_prune. Unset, this does nothing.
    """
    for item in filter(None, os.environ.get("TRAIN_FAULT", "").split(",")):
        where, _, at = item.partition("@")
        action, _, where = where.rpartition(":")
        if where == stage and int(at) == step:
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), {"": signal.SIGKILL, "kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action])


# ---------------------------------------------------------------- training


class Trainer:
    """The state of one run and the few things done with it; the loop is `fit`."""

    def __init__(self, args, model, tokenizer, train_ds, val_ds, device, rank, world, out: Path, log):
        self.args, self.tokenizer, self.train_ds, self.val_ds = args, tokenizer, train_ds, val_ds
        self.device, self.rank, self.world, self.out, self.log = device, rank, world, out, log
        self.model = model.to(device)
        if args.fast_dropout:
            fast_dropout.install(model, device)  # before DDP wraps it; a no-op on GPUs
        self.ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
        self.optimizer = make_optimizer(model, args)
        # Epochs differ slightly in length (batches are filled greedily after a
        # shuffle), so count each epoch's steps from its own plan.
        per_epoch = [len(epoch_plan(train_ds, args, e, world)) for e in range(args.epochs)]
        self.total_steps = args.max_steps or sum(per_epoch)
        warmup = int(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_then_linear(warmup, self.total_steps))
        self.step = self.epoch = self.position = 0
        self.best_loss, self.best_step, self.saved_step = None, None, None
        self.val_at = {}  # step -> validation loss measured at that step

    # -- checkpoints

    def training_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "position": self.position,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "best_val_loss": self.best_loss, "best_step": self.best_step, "world_size": self.world,
                "batches_per_step": self.args.grad_accum * self.world}

    def load_state(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.saved_step = self.step
        before, now = state.get("batches_per_step"), self.args.grad_accum * self.world
        if before and before != now:  # another world size or --grad-accum: go on at the same batch of the epoch
            self.position = -(-self.position * before // now)
            self.log(f"the checkpoint took {before} batches per step, this run takes {now}: continuing at batch "
                     f"{self.position * now} of epoch {self.epoch + 1}")
        if self.position >= len(epoch_plan(self.train_ds, self.args, self.epoch, self.world)):
            self.epoch, self.position = self.epoch + 1, 0
        set_rng_state(state["rng"])
        if self.world > 1 and self.rank > 0:  # other ranks: their own dropout noise
            torch.manual_seed(self.args.seed * 1000 + self.rank * 7919 + self.step)

    def save(self):
        if self.saved_step == self.step:
            return
        if self.rank == 0:
            hooks = {"mid_save": lambda: fault("mid_save", self.step), "before_commit": lambda: fault("before_commit", self.step),
                     "before_prune": lambda: fault("before_prune", self.step)}
            val = self.val_at.get(self.step)
            if val is not None and (self.best_loss is None or val < self.best_loss):
                self.best_loss, self.best_step = val, self.step
            path = ckpt.save_checkpoint(self.out, self.step, self.model, self.tokenizer, self.training_state(),
                                        vars(self.args), hooks=hooks)
            best = self.out / f"{ckpt.PREFIX}{self.best_step:08d}" if self.best_step is not None else None
            ckpt.update_index_and_prune(self.out, path, best, self.best_loss, self.args.keep, hooks=hooks)
        self.saved_step = self.step
        barrier(self.world)  # nobody reads a half-written checkpoint

    # -- metrics

    def record(self, row: dict):
        if self.rank == 0:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    def validate(self, bar):
        if self.step in self.val_at:
            return
        loss = evaluate(self.model, self.val_ds, self.args.max_tokens, self.device, self.rank, self.world)
        self.val_at[self.step] = loss
        self.record({"step": self.step, "epoch": self.epoch, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        if self.rank == 0:
            bar.write(f"step {self.step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}")

    # -- one optimizer step

    def train_step(self, step_batches: list[list[int]]):
        """Forward/backward over this rank's micro-batches, then one AdamW step.

        The loss is normalised by the number of target tokens of the whole
        step on all ranks (known from the plan, no communication needed), so
        accumulation and data parallelism give the gradient of one big batch.
        """
        ds, model = self.train_ds, self.ddp or self.model
        step_tokens = sum(ds.tgt_lengths[i] for b in step_batches for i in b)
        mine = step_batches[self.rank :: self.world]
        loss_sum = torch.zeros((), device=self.device)
        real_tokens = sum(ds.src_lengths[i] + ds.tgt_lengths[i] for b in step_batches for i in b)  # all ranks
        for k, b in enumerate(mine):
            batch = to_device(collate([ds[i] for i in b], ds.pad_id), self.device)
            sync = k == len(mine) - 1 or self.ddp is None
            with (model.no_sync() if not sync else contextlib.nullcontext()):
                loss = token_loss_sum(model, batch)
                (loss * self.world / step_tokens).backward()  # DDP averages over ranks
            loss_sum += loss.detach()
        fault("mid_step", self.step + 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, step_tokens, grad_norm, real_tokens

    def fit(self, stop: StopFlag) -> int:
        from tqdm import tqdm

        args = self.args
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", disable=self.rank != 0, dynamic_ncols=True)
        self.model.train()
        window = {"loss": torch.zeros((), device=self.device), "real": 0, "start": time.perf_counter(), "n": 0}
        while self.step < self.total_steps:
            epoch, plan = self.epoch, epoch_plan(self.train_ds, args, self.epoch, self.world)
            while self.epoch == epoch and self.step < self.total_steps:
                step_batches = plan[self.position]
                loss_sum, tokens, grad_norm, real = self.train_step(step_batches)
                self.step += 1
                self.position += 1
                if self.position == len(plan):  # a finished epoch resumes at the next one
                    self.epoch, self.position = self.epoch + 1, 0
                window["loss"] += loss_sum / tokens  # this rank's share of the step's mean token loss
                window["real"] += real
                window["n"] += 1
                bar.update(1)
                if self.step % args.log_every == 0 or self.step == self.total_steps:
                    self.log_window(window, grad_norm, bar, step_batches)
                elif args.log_examples:
                    self.record({"step": self.step, "examples": [i for b in step_batches for i in b]})
                if self.step % args.eval_every == 0:
                    self.validate(bar)
                if self.position == 0:  # end of an epoch
                    self.validate(bar)
                if self.world > 1:  # all ranks stop together, or the others would hang
                    stop.agree(self.device)
                if self.step % args.save_every == 0 or self.position == 0 or stop.signum:
                    self.save()
                if stop.signum:
                    bar.close()
                    self.log(f"stopped by {signal.Signals(stop.signum).name} at step {self.step}; checkpoint saved, continue with --resume")
                    return 128 + stop.signum
        self.validate(bar)
        self.save()
        bar.close()
        return 0

    def log_window(self, window, grad_norm, bar, step_batches):
        """The only place the loop waits for the device (.item())."""
        elapsed = time.perf_counter() - window["start"]
        total = window["loss"].clone()
        if self.world > 1:
            dist.all_reduce(total)  # add up the ranks' shares
        loss = total.item() / window["n"]
        lr = self.scheduler.get_last_lr()[0]
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": window["real"] / max(elapsed, 1e-9)}
        if self.args.log_examples:
            row["examples"] = [i for b in step_batches for i in b]
        self.record(row)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        window.update(loss=torch.zeros((), device=self.device), real=0, start=time.perf_counter(), n=0)


# ---------------------------------------------------------------- reporting


def plot_losses(out: Path):
    """metrics.jsonl -> loss.png with training and validation loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out / METRICS)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def banner(args, model, train_ds, val_ds, device, world, steps, tokenizer, log):
    params = sum(p.numel() for p in model.parameters())
    fast = args.fast_dropout and device.type == "cpu"
    log(f"device: {device}{f' x {world} processes' if world > 1 else ''}{'; fast dropout masks' if fast else ''}")
    log(f"model: {args.model} ({params / 1e6:.1f}M parameters, vocabulary {len(tokenizer):,})")
    log(f"train: {train_ds.path}: {train_ds.stats.summary()}")
    log(f"valid: {val_ds.path}: {val_ds.stats.summary()}")
    epochs = f"{args.epochs} epochs" if not args.max_steps else f"--max-steps {args.max_steps}"
    log(f"steps: {steps:,} ({epochs}; batch token budget {args.max_tokens:,} x {args.grad_accum} accumulation"
        f"{f' x {world} ranks' if world > 1 else ''}; lr {args.lr:g}, warmup {args.warmup_ratio:.0%})")
    for i in (0, len(train_ds) // 2):
        e = train_ds[i]
        log(f"example {i}:\n  input : {tokenizer.decode(e['input_ids'])}\n  target: {tokenizer.decode(e['labels'])}")


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
        keep = [json.dumps(r) for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_name(ckpt.TMP_PREFIX + METRICS)
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


# ---------------------------------------------------------------- main


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(argv)
    out = Path(args.output_dir)
    damaged: list[str] = []  # reported once we know which rank logs
    resume_from = ckpt.newest_valid(out, warn=damaged.append) if args.resume else None
    if resume_from:
        # Flags not typed now come from the run being resumed (but the device is this machine's).
        recorded = ckpt.read_run_config(resume_from)
        for key, value in recorded.items():
            if key not in explicit and key not in ("resume", "output_dir", "device") and hasattr(args, key):
                setattr(args, key, value)
    check_args(args)
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    prepare_output_dir(out, args.resume, rank == 0)

    for message in damaged:
        log(message)
    state = None
    if args.resume and resume_from is None:
        raise UsageError(f"--resume: no checkpoint in {out} verifies (all damaged); start a new run with another --output-dir")
    data_note = default_data(args)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library's "writing shards" bars would drown ours
    if resume_from:
        model, tokenizer = resume_model(resume_from, args, explicit)
        state = ckpt.load_training_state(resume_from)
    else:
        model, tokenizer = choose_model(args, explicit, log)
    log(data_note)
    train_ds = DailyDialogDataset(tokenizer, args.train_file, args.max_length, args.max_target_length)
    val_ds = DailyDialogDataset(tokenizer, args.val_file, args.max_length, args.max_target_length)

    torch.manual_seed(args.seed + rank)  # dropout noise; each rank its own
    random.seed(args.seed)
    trainer = Trainer(args, model, tokenizer, train_ds, val_ds, device, rank, world, out, log)
    if rank == 0:  # rows past the resumed step (or all, when starting over) are stale
        truncate_metrics(out, state["step"] if state else 0)
    if state is not None:
        trainer.load_state(state)
        log(f"resuming from {resume_from.name}: step {trainer.step}, epoch {trainer.epoch + 1}, "
            f"{trainer.position} steps into it")
    banner(args, model, train_ds, val_ds, device, world, trainer.total_steps, tokenizer, log)
    stop = StopFlag()
    try:
        code = trainer.fit(stop)
    finally:
        stop.restore()
    if code == 0 and rank == 0:
        plot_losses(out)
        index = ckpt.read_index(out)
        log(f"done: {trainer.step} steps; best validation loss {index.get('best_val_loss')} in {out / str(index.get('best'))}; "
            f"latest {out / str(index.get('latest'))}; curves in {out / 'loss.png'}")
        if args.eval_generate:
            run_generation_eval(args, out / index["best" if index.get("best") else "latest"], log)
    return code


def run_generation_eval(args, checkpoint_dir: Path, log):
    import eval as evaluation  # noqa

    report = evaluation.main(["--checkpoint", str(checkpoint_dir), "--data", args.val_file,
                              "--max-examples", str(args.eval_generate), "--out", str(checkpoint_dir / "eval"),
                              "--device", args.device])
    if report:
        log(f"generation eval failed with exit code {report}")


def main(argv=None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (UsageError, DataError, InferError, ckpt.CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while appending metrics or drawing the plot
        print(f"train.py: error: {e.filename or 'a file'}: {e.strerror or e}; the last checkpoint is intact: "
              "free space or fix permissions, then rerun with --resume", file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: another rank died or stopped answering
        if not (dist.is_available() and dist.is_initialized()) or not (
                isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "Connection"))):
            raise
        reason = str(e).strip().splitlines()[0].split(". ")[0][:200]
        print("\n" * (dist.get_rank() == 0) + f"train.py: error: rank {dist.get_rank()}: lost contact with the other processes ({reason}); "
              f"another rank probably failed first: see its message (torchrun names it under 'Root Cause')", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
