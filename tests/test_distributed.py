"""Data-parallel training under torchrun: CPU, gloo, two processes, tiny T5.

Two base runs of 8 steps are shared by the tests: 2 ranks x 1 batch per step
(torchrun) and 1 rank x 2 accumulated batches (plain python). With dropout
off they must see the same batches and end with the same weights, and each
checkpoint of one must resume in the other world size.
"""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, TINY_CONFIG, TINY_FLAGS, assert_user_error, run_cli, script_env, train_argv
from safetensors.torch import load_file

from t5dialog import checkpoint as ckpt
from t5dialog import models, outdir

pytestmark = pytest.mark.slow  # every test here starts train.py (or torchrun) as a process

STEPS = 8  # 16 of the tiny data's 20 batches per epoch: both runs stay in epoch 0
DIST_ENV = {"TRAIN_DIST_TIMEOUT": "60"}  # a bug fails in a minute instead of hanging for half an hour


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch(cmd, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run cmd in the project root, offline, with no torchrun variables but those in env."""
    full_env = {k: v for k, v in script_env({**DIST_ENV, **(env or {})}).items() if k not in TORCHRUN_VARS or k in (env or {})}
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def torchrun(*args, nproc=2, script="train.py", env=None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N train.py args`."""
    return launch(["-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_port", free_port(), script, *args], env)


def python(*args, env=None) -> subprocess.CompletedProcess:
    """`python script.py args`: one process (forked from the tests' preloaded server, see launcher.py)."""
    return run_cli(*args, env={**DIST_ENV, **(env or {})})


args_for = functools.partial(train_argv, flags=[*TINY_FLAGS, "--max-steps", str(STEPS), "--log-examples"])


def rows(out, key="loss"):
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(checkpoint_dir):
    return load_file(checkpoint_dir / "model.safetensors")


def step_dir(out, step):
    return out / f"{ckpt.PREFIX}{step:08d}"


@pytest.fixture(scope="module")
def nodrop_model(tmp_path_factory):
    """The tiny T5 without dropout: ranks draw different dropout noise, so exact comparisons need none."""
    
    d = tmp_path_factory.mktemp("tiny-t5-nodrop")
    model, tokenizer = models.build_scratch(SAMPLE / "train.txt", vocab_size=400, seed=0, **{**TINY_CONFIG, "dropout_rate": 0.0})
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def two_ranks(nodrop_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks") / "ckpts"
    result = torchrun(*args_for(nodrop_model, data_dir, out, "--grad-accum", "1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.fixture(scope="module")
def one_rank(nodrop_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank") / "ckpts"
    result = python("train.py", *args_for(nodrop_model, data_dir, out, "--grad-accum", "2"))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_torchrun_trains_and_only_rank_0_writes(two_ranks):
    out, result = two_ranks
    # One checkpoint set: the saves at steps 4 and 8, nothing half-written, no file per rank.
    assert {p.name for p in out.iterdir()} == {step_dir(out, 4).name, step_dir(out, 8).name, ckpt.INDEX, "metrics.jsonl",
                                               "loss.png", outdir.LOCK}
    for step in (4, 8):
        assert ckpt.verify(step_dir(out, step)) is None
    # One metrics row per step and per validation: rank 1 wrote none.
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows(out, "val_loss")] == [4, 8]
    assert all(len(r["examples"]) > 0 for r in rows(out))
    # Same format as a single process: no DDP `module.` prefixes, loadable as is.
    assert not [k for k in weights(step_dir(out, 8)) if k.startswith("module.")]
    state = ckpt.load_training_state(step_dir(out, 8))
    assert state["world_size"] == 2 and state["step"] == STEPS
    # What the user sees comes once, from rank 0.
    assert result.stdout.count("device: cpu (2 processes") == 1
    assert result.stdout.count("done: 8 steps") == 1
    assert result.stdout.count("step 8: validation loss") == 1


def test_two_ranks_equal_one_rank_with_twice_the_batch(two_ranks, one_rank):
    """2 ranks x 1 batch per step == 1 rank x 2 accumulated batches: same batches, losses, weights."""
    (out2, _), (out1, _) = two_ranks, one_rank
    r2, r1 = rows(out2), rows(out1)
    assert [r["examples"] for r in r2] == [r["examples"] for r in r1]  # each step, the same examples
    torch.testing.assert_close([r["loss"] for r in r2], [r["loss"] for r in r1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([r["grad_norm"] for r in r2], [r["grad_norm"] for r in r1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close([r["val_loss"] for r in rows(out2, "val_loss")], [r["val_loss"] for r in rows(out1, "val_loss")],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights(step_dir(out2, 8)), weights(step_dir(out1, 8)), rtol=1e-5, atol=1e-5)


def resume_copy(out, tmp_path):
    """A copy of a finished run with its last checkpoint gone: --resume restarts from step 4."""
    copy = tmp_path / "ckpts"
    shutil.copytree(out, copy)
    shutil.rmtree(step_dir(copy, 8))
    return copy


def assert_infer_loads(checkpoint_dir):
    result = python("infer.py", "--checkpoint", checkpoint_dir, "hello")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() and len(result.stdout.strip().splitlines()) == 1, result.stdout


def test_checkpoint_of_one_rank_resumes_with_two_ranks(one_rank, two_ranks, nodrop_model, data_dir, tmp_path):
    copy = resume_copy(one_rank[0], tmp_path)
    # 2 ranks x 1 batch takes the same batches per step as the 1 rank x 2 that wrote the checkpoint,
    # so the resumed run must end exactly where the uninterrupted 2-rank run did.
    result = torchrun(*args_for(nodrop_model, data_dir, copy, "--resume", "--grad-accum", "1"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from checkpoint-00000004" in result.stdout
    resumed, straight = rows(copy), rows(two_ranks[0])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step twice, none missing
    assert [r["examples"] for r in resumed] == [r["examples"] for r in straight]
    torch.testing.assert_close([r["loss"] for r in resumed], [r["loss"] for r in straight], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights(step_dir(copy, 8)), weights(step_dir(two_ranks[0], 8)), rtol=1e-5, atol=1e-5)
    assert ckpt.load_training_state(step_dir(copy, 8))["world_size"] == 2
    assert_infer_loads(step_dir(copy, 8))


def test_checkpoint_of_two_ranks_resumes_with_one(two_ranks, nodrop_model, data_dir, tmp_path):
    copy = resume_copy(two_ranks[0], tmp_path)
    # One rank with the recorded --grad-accum 1 takes 1 batch per step where the checkpoint took 2:
    # it goes on at batch 8 of the epoch (4 steps x 2), not at batch 4, and step numbers go on from 4
    # to --max-steps, the learning rate reaching 0 there.
    result = python("train.py", *args_for(nodrop_model, data_dir, copy, "--resume", "--max-steps", "10"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from checkpoint-00000004: step 4" in result.stdout and "continuing at batch 8" in result.stdout
    resumed, straight = rows(copy), rows(two_ranks[0])
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert resumed[:4] == straight[:4]  # rows of the 2-rank part kept as they were
    after = [r["examples"] for r in resumed[4:]]
    assert [after[i] + after[i + 1] for i in range(0, 6, 2)] == [r["examples"] for r in straight[4:7]]  # same data
    assert [r["lr"] for r in resumed[4:]] == pytest.approx([5e-4 * (10 - (s - 1)) / 10 for s in range(5, 11)])
    assert [p.name for p in ckpt.list_checkpoints(copy)][-1] == step_dir(copy, 10).name
    assert ckpt.load_training_state(step_dir(copy, 10))["world_size"] == 1
    assert_infer_loads(step_dir(copy, 10))


def test_checkpoint_of_one_rank_resumes_with_two_ranks_of_twice_the_step(one_rank, nodrop_model, data_dir, tmp_path):
    copy = resume_copy(one_rank[0], tmp_path)
    # 2 ranks with the recorded --grad-accum 2 take 4 batches a step where the checkpoint took 2: --max-steps 8
    # still ends at step 8, through the end of the epoch (its 20 batches) into the next.
    result = torchrun(*args_for(nodrop_model, data_dir, copy, "--resume"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from checkpoint-00000004: step 4" in result.stdout and "continuing at batch 8" in result.stdout
    resumed, straight = rows(copy), rows(one_rank[0])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["examples"] for r in resumed[4:6]] == [straight[i]["examples"] + straight[i + 1]["examples"]
                                                     for i in (4, 6)]  # the data goes on where it stopped
    assert [r["lr"] for r in resumed[4:]] == pytest.approx([r["lr"] for r in straight[4:]])  # by step number
    state = ckpt.load_training_state(step_dir(copy, STEPS))
    assert (state["world_size"], state["batches_per_step"], state["epoch"], state["batch"]) == (2, 4, 1, 4)


# ---------------------------------------------------------------- launch mistakes


def test_world_size_without_a_rendezvous_is_a_one_line_error(tiny_model, data_dir, tmp_path):
    result = python("train.py", *args_for(tiny_model, data_dir, tmp_path / "out"), env={"WORLD_SIZE": "2"})
    assert_user_error(result, "WORLD_SIZE", "RANK", "torchrun")
    assert not (tmp_path / "out").exists()


def test_ranks_that_never_join_end_with_a_one_line_error_not_a_hang(tiny_model, data_dir, tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TRAIN_DIST_TIMEOUT": "2"}
    start = time.perf_counter()
    result = python("train.py", *args_for(tiny_model, data_dir, tmp_path / "out"), env=env)
    assert_user_error(result, "rank 0 of 2", "did not join", "torchrun")
    assert time.perf_counter() - start < 60


def rank_1_only(tmp_path):
    """train.py, but FAULT acts on rank 1 only (rank 0 drops it)."""
    wrapper = tmp_path / "rank1_only.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "if os.environ['RANK'] != '1':\n"
        "    os.environ.pop('FAULT')\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"sys.argv[0] = {str(ROOT / 'train.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return wrapper


def test_a_rank_that_dies_ends_every_rank(tiny_model, data_dir, tmp_path):
    """Rank 1 is SIGKILLed at step 3: torchrun stops rank 0 too and names the rank that failed."""
    wrapper = rank_1_only(tmp_path)
    out = tmp_path / "out"
    start = time.perf_counter()
    result = torchrun(*args_for(tiny_model, data_dir, out), script=wrapper, env={"FAULT": "mid_step@3"})
    assert result.returncode != 0
    assert time.perf_counter() - start < 150  # not a hang: well under the subprocess timeout
    assert "Root Cause" in result.stderr and "SIGKILL" in result.stderr  # torchrun's summary names rank 1
    assert "[rank0]: Traceback" not in result.stderr  # rank 0 explains itself in one line instead
    assert "rank 0: lost contact with the other processes" in result.stderr
    assert not ckpt.list_checkpoints(out)  # nothing saved past the failure (first save is at step 4)


def test_a_signal_to_one_rank_acts_on_every_rank_at_the_same_step(tiny_model, data_dir, tmp_path):
    """SIGUSR2, then SIGUSR1, to rank 1 alone, between log points (--log-every 5): every rank saves at step 3
    and goes on, then saves at step 6 and stops (a rank that saved or stopped alone would leave the other
    waiting in a collective), and the stop logs the steps since the last row."""
    out = tmp_path / "out"
    result = torchrun(*args_for(tiny_model, data_dir, out, "--save-every", "1000", "--eval-every", "1000", "--log-every", "5"),
                      script=rank_1_only(tmp_path), env={"FAULT": "usr2:mid_step@3,usr1:mid_step@6"})
    assert "exitcode  : 138" in result.stderr, result.stderr[-4000:]  # torchrun's summary of the ranks' exits
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(out)] == [3, 6]
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(out))
    assert result.stdout.count("SIGUSR2: saved checkpoint-00000003; training goes on") == 1  # from rank 0 alone
    assert result.stdout.count("stopped by SIGUSR1 at step 6") == 1
    assert [r["step"] for r in rows(out)] == [5, 6]
    result = torchrun(*args_for(tiny_model, data_dir, out, "--resume"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from checkpoint-00000006: step 6" in result.stdout
    assert [r["step"] for r in rows(out)] == [5, 6, 7, 8]  # the resumed run logs every step again (--log-every 1)
    assert ckpt.verify(step_dir(out, STEPS)) is None


def children(pid: int) -> dict[int, str]:
    """{pid: state letter} of the processes whose parent is ``pid`` (from /proc: torchrun's workers)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found[int(stat.parent.name)] = fields[0]
    return found


def sigterm_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    pending = int(next(line for line in status.splitlines() if line.startswith("ShdPnd:")).split()[1], 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def test_sigterm_to_torchrun_saves_at_the_next_step_whatever_the_log_interval(tiny_model, data_dir, tmp_path):
    """torchrun forwards SIGTERM to its workers and kills them 30 s later: with --log-every 1000 the ranks must
    still agree to stop at the very next step. Both freeze inside step 2; torchrun gets SIGTERM and forwards it
    (it waits, pending, in each frozen worker); then they go on, save checkpoint 2 and stop."""
    out = tmp_path / "out"
    command = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "train.py",
               *args_for(tiny_model, data_dir, out, "--log-every", "1000", "--save-every", "1000", "--eval-every", "1000")]
    env = {k: v for k, v in script_env({**DIST_ENV, "FAULT": "stop:mid_step@2"}).items() if k not in TORCHRUN_VARS}
    run = subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(children(run.pid).values()) == ["T", "T"], "both ranks to freeze in step 2")
        ranks = list(children(run.pid))
        run.send_signal(signal.SIGTERM)
        wait_for(lambda: all(sigterm_pending(pid) for pid in ranks), "torchrun to forward SIGTERM")
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(out)] == [2], stderr[-4000:]
    assert ckpt.verify(step_dir(out, 2)) is None
    assert stdout.count("stopped by SIGTERM at step 2") == 1
    assert "forcefully exiting via 9" not in stderr  # the ranks ended themselves, within torchrun's 30 s
    assert [r["step"] for r in rows(out)] == [2]  # the two steps, logged at the stop


@pytest.mark.slow
def test_after_a_rank_is_killed_mid_epoch_resume_goes_on_with_one_or_two_processes(nodrop_model, data_dir, two_ranks,
                                                                                      tmp_path):
    """kill -9 of rank 1 in step 6, after the save at 4: both world sizes resume from checkpoint 4."""
    out = tmp_path / "out"
    result = torchrun(*args_for(nodrop_model, data_dir, out), script=rank_1_only(tmp_path), env={"FAULT": "mid_step@6"})
    assert result.returncode != 0 and "SIGKILL" in result.stderr
    errors = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and "rank 0: lost contact with the other processes" in errors[0], result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr
    assert [p.name for p in ckpt.list_checkpoints(out)] == [step_dir(out, 4).name]  # the last commit, intact
    assert ckpt.verify(step_dir(out, 4)) is None
    assert not [p for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]

    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(out, two)
    shutil.copytree(out, one)
    result = torchrun(*args_for(nodrop_model, data_dir, two, "--resume"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from checkpoint-00000004: step 4" in result.stdout
    resumed, straight = rows(two), rows(two_ranks[0])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["examples"] for r in resumed] == [r["examples"] for r in straight]
    torch.testing.assert_close(weights(step_dir(two, 8)), weights(step_dir(two_ranks[0], 8)), rtol=1e-5, atol=1e-5)

    # One process with the recorded --grad-accum 1 takes half a step of the checkpoint's, up to step 8 all the same.
    result = python("train.py", *args_for(nodrop_model, data_dir, one, "--resume"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from checkpoint-00000004: step 4" in result.stdout
    assert [r["step"] for r in rows(one)] == list(range(1, STEPS + 1))
    after = [r["examples"] for r in rows(one) if r["step"] > 4]
    assert [after[i] + after[i + 1] for i in range(0, 4, 2)] == [r["examples"] for r in straight[4:6]]  # same data
    assert [p.name for p in ckpt.list_checkpoints(one)][-1] == step_dir(one, STEPS).name
    assert ckpt.verify(step_dir(one, STEPS)) is None
