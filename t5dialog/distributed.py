"""Running under torchrun, and stopping cleanly: ranks, barriers, signals, seeds.

One process (plain ``python train.py``) is world size 1 and none of this
communicates. Under ``torchrun`` every rank runs the same loop on its share of
each step's batches; rank 0 alone writes files. What each signal does during
training: see `StopFlag`.
"""

from __future__ import annotations

import datetime
import os
import signal

import torch
import torch.distributed as dist

from t5dialog.cli import UserError, pick_device
from t5dialog.files import first_line


def is_main_process() -> bool:
    """Rank 0 (or no torchrun), known before `setup`: the output dir is locked before anything is loaded."""
    return os.environ.get("RANK", "0") == "0"


def setup(device_flag: str):
    """(rank, world_size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_flag)
    if not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise UserError("WORLD_SIZE is set but RANK/MASTER_ADDR/MASTER_PORT are not; launch with torchrun (see README)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device_flag}: under torchrun use auto, cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    use_cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # How long a rank waits for the others (start-up, barriers, collectives)
    # before it gives up with an error instead of hanging.
    timeout = float(os.environ.get("TRAIN_DIST_TIMEOUT", "1800"))
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    except dist.DistError as e:
        raise UserError(f"rank {rank} of {world}: the other processes did not join within {timeout:g}s ({first_line(e)}); "
                        f"start every rank with torchrun and the same rendezvous endpoint (see README)") from None
    global _host_group
    # The ranks agree on signals at every step through gloo, on the CPU: with NCCL the flags would travel through
    # the GPU, and reading them back would make the host wait for every queued kernel at every step.
    _host_group = dist.new_group(backend="gloo") if use_cuda else None  # None: the default group, gloo already
    return rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


_host_group = None  # the process group for flags that live on the host (see `setup`)


def barrier(world: int):
    if world > 1:
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_same_everywhere(what: str, value, world: int):
    """Every rank must train the same model on the same data, or the collectives hang: compare once at the start."""
    if world == 1:
        return
    values = [None] * world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise UserError(f"the {world} processes disagree on the {what} (rank 0: {values[0]}, rank {dist.get_rank()}: {value}); "
                        "give every machine the same --model and data files (a shared folder), or pass them explicitly")


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of a rank starting (or, for ranks > 0, resuming) at ``step``.

    Rank 0 of a fresh run uses ``seed`` itself; other ranks draw their own
    dropout noise. A resumed rank 0 restores its saved RNG state instead, which
    is what makes one-process resume bit-exact.
    """
    return seed + 7919 * rank + 1_000_003 * step


class Stopped(BaseException):
    """A stopping signal before the first step or after the last: nothing is left unsaved, so the run ends at once.

    A BaseException, like KeyboardInterrupt, so that no library's ``except Exception`` swallows it.
    """

    def __init__(self, signum: int, when: str):
        super().__init__(signum, when)
        self.signum, self.when = signum, when


class StopFlag:
    """What each signal does, from the first line of train.py's `run` to its exit.

    | signal  | what train.py does                                                     | exit code |
    |---------|------------------------------------------------------------------------|-----------|
    | SIGTERM | save a checkpoint at the next step boundary, print one line, stop      | 143       |
    | SIGINT  | the same (Ctrl-C); a second Ctrl-C stops at once, without saving       | 130       |
    | SIGHUP  | the same (a closed terminal or dropped ssh session: terminal output is | 129       |
    |         | sent to /dev/null first, so writing to the lost terminal cannot crash) |           |
    | SIGQUIT | the same                                                               | 131       |
    | SIGUSR1 | the same (SLURM's --signal=USR1@120 before a time limit: the job ends  | 138       |
    |         | saved instead of killed; --resume continues it)                        |           |
    | SIGUSR2 | save a checkpoint at the next step boundary and go on training         | (runs on) |

    Before the first step (loading, minutes on the full corpus) and after the
    last (the plot, --eval-generate) there is nothing unsaved: a stopping signal
    ends the run at once (`Stopped`, same exit code), SIGUSR2 before the first
    step is served at the first step boundary, and after the last it is ignored
    (the last step's checkpoint is saved; eval.py, started then, ignores it too).
    Under torchrun a signal to any rank acts on all of them at the same step (`poll` agrees, every step).
    """

    STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
    SNAPSHOT = signal.SIGUSR2

    def __init__(self):
        self.signum = None  # the stopping signal received in the loop, if any
        # USR2 requests counted, not flagged: one that lands while the loop reads the count is served next time.
        self.requests = self.served = 0
        self.when = "before the first step"  # then "training", then "after the last step"
        # After a hangup isatty() fails on the lost terminal (EIO): learn now which descriptors are terminals.
        self.ttys = [fd for fd in (0, 1, 2) if _isatty(fd)]
        self.previous = {sig: signal.signal(sig, self) for sig in (*self.STOP, self.SNAPSHOT)}

    def start_training(self):
        self.when = "training"

    def end_training(self):
        """After the last step: a stop ends the run at once, and SIGUSR2 is ignored by train.py and its children."""
        self.when = "after the last step"
        signal.signal(self.SNAPSHOT, signal.SIG_IGN)

    def restore(self):
        """At exit, signals act as they did before (train.main called in-process, e.g. by the tests)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame):
        if signum == signal.SIGHUP:  # before anything else writes: the terminal is gone, writing to it fails (EIO)
            detach_terminal(self.ttys)
        if signum == self.SNAPSHOT:
            self.requests += 1
            return
        if self.when != "training":
            raise Stopped(signum, self.when)
        self.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name

    def poll(self, world: int) -> tuple[int | None, bool]:
        """(the signal to stop for or None, whether to save a snapshot now), the same on every rank.

        Under torchrun every rank calls it at every step: a tiny all-reduce on
        the host (gloo), so a signal is acted on at the next step boundary
        whatever --log-every is (torchrun kills its workers 30 s after
        forwarding SIGTERM). bench/bench_stop_poll.py measures what it costs.
        """
        requests = self.requests
        flags = [self.signum or 0, int(requests > self.served)]
        if world > 1:  # all ranks stop, or save, together (or the others would hang): the max of the flags
            agreed = torch.tensor(flags)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=_host_group)
            flags = agreed.tolist()
        self.signum, self.served = flags[0] or None, requests
        return self.signum, bool(flags[1])


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def detach_terminal(fds):
    """Point the descriptors that were a terminal at /dev/null: a lost terminal's writes fail, /dev/null's do not."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    for fd in fds:
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)
