"""Signals during training (distributed.StopFlag), each a real signal delivered at a known step.

Stopping signals (TERM, INT, HUP, QUIT, USR1) save a checkpoint at the next
step boundary, print one line and exit 128 + the signal; USR2 saves and goes
on. --save-every is far off, so every checkpoint here is the signal's doing.
Each test starts train.py as a process, so they are few: one run stopped and
resumed once per signal, and two signals that come from outside. Under
torchrun: tests/test_distributed.py.
"""

import fcntl
import functools
import json
import os
import select
import signal
import subprocess
import sys
import termios

import pytest
from conftest import ROOT, TINY_FLAGS, run_cli, script_env, train_argv

from t5dialog import checkpoint as ckpt

pytestmark = pytest.mark.slow  # every test here starts train.py as a process


# 10 steps; --save-every and --eval-every far off, so every checkpoint here is a signal's doing.
argv = functools.partial(train_argv, flags=[*TINY_FLAGS, "--max-steps", "10", "--save-every", "1000", "--eval-every", "1000",
                                            "--keep", "10"])


def saved_steps(out):
    found = ckpt.list_checkpoints(out)
    assert all(ckpt.verify(p) is None for p in found)
    return [ckpt.step_of(p) for p in found]


def train_steps(out):
    rows = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in rows if "loss" in r]


def lines_naming(text: str, sig: signal.Signals) -> list[str]:
    return [line for line in text.splitlines() if sig.name in line]


STOPPING = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1]


def test_each_signal_saves_at_its_step_and_resume_goes_on(tiny_model, data_dir, tmp_path):
    """One run stopped by each stopping signal in turn, each time resumed: TERM at step 2, INT at 3, HUP at 4,
    QUIT at 5, USR1 at 6; the last resume gets USR2 at 7 and 9 and trains on to its end at 10."""
    out, resume = tmp_path / "out", []
    for step, sig in enumerate(STOPPING, start=2):
        action = sig.name.removeprefix("SIG").lower()  # files.fault's name for it
        result = run_cli("train.py", *argv(tiny_model, data_dir, out, *resume), env={"FAULT": f"{action}:mid_step@{step}"})
        assert result.returncode == 128 + sig, (sig.name, result.returncode, result.stderr[-3000:])
        assert saved_steps(out) == list(range(2, step + 1)), sig.name  # saved at the step the signal came in
        named = lines_naming(result.stdout + result.stderr, sig)
        assert len(named) == 1 and f"step {step}" in named[0] and "--resume" in named[0], result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        if resume:
            assert f"resuming from {ckpt.checkpoint_name(step - 1)}: step {step - 1}" in result.stdout
        resume = ["--resume"]
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, *resume), env={"FAULT": "usr2:mid_step@7,usr2:mid_step@9"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-00000006: step 6" in result.stdout
    assert saved_steps(out) == [2, 3, 4, 5, 6, 7, 9, 10]  # one snapshot per USR2, then the end of the run
    named = lines_naming(result.stdout + result.stderr, signal.SIGUSR2)
    assert len(named) == 2 and "checkpoint-00000007" in named[0] and "checkpoint-00000009" in named[1], named
    assert train_steps(out) == list(range(1, 11))  # each step once: none lost, none twice


def start_frozen_at_step_5(model, data, out, **popen):
    """train.py that freezes (SIGSTOP) in the middle of step 5; returns it stopped."""
    return subprocess.Popen([sys.executable, "train.py", *argv(model, data, out)], cwd=ROOT,
                            env=script_env({"FAULT": "stop:mid_step@5"}), **popen)


def test_sigusr1_sent_from_outside_saves_and_exits_138(tiny_model, data_dir, tmp_path):
    """As SLURM's --signal=USR1@120 does before a time limit: kill -USR1 PID."""
    out = tmp_path / "out"
    run = start_frozen_at_step_5(tiny_model, data_dir, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(run.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        os.kill(run.pid, signal.SIGUSR1)
        os.kill(run.pid, signal.SIGCONT)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 138, stderr[-3000:]
    assert saved_steps(out) == [5]
    named = lines_naming(stdout + stderr, signal.SIGUSR1)
    assert len(named) == 1 and "step 5" in named[0] and "--resume" in named[0], stdout + stderr


def test_a_terminal_that_hangs_up_gets_a_saved_run_not_a_crash(tiny_model, data_dir, tmp_path):
    """A closed terminal or a dropped ssh session: the kernel sends SIGHUP, and writing to the terminal fails
    from then on (EIO). The progress bar's next write must not crash the run before it saves."""
    out = tmp_path / "out"
    controller, terminal = os.openpty()

    def own_terminal():  # in the child, after setsid: the pseudo-terminal becomes its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    run = start_frozen_at_step_5(tiny_model, data_dir, out, stdin=terminal, stdout=terminal, stderr=terminal,
                                 start_new_session=True, preexec_fn=own_terminal)
    os.close(terminal)
    shown = b""
    try:
        while True:  # read what the run shows until it freezes in step 5
            if select.select([controller], [], [], 0.2)[0]:
                shown += os.read(controller, 1 << 16)
            pid, status = os.waitpid(run.pid, os.WNOHANG | os.WUNTRACED)
            if pid:
                assert os.WIFSTOPPED(status), shown[-3000:]
                break
    finally:
        os.close(controller)  # the terminal is gone: the kernel sends the run SIGHUP and SIGCONT
    try:
        assert run.wait(timeout=300) == 128 + signal.SIGHUP, shown[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert b"device: cpu" in shown  # the run did write to the terminal before
    assert saved_steps(out) == [5]


def test_outside_the_loop_sigusr2_is_served_at_the_first_step_and_a_stop_ends_the_run_at_once(tiny_model, data_dir,
                                                                                             tmp_path):
    """Start-up takes minutes on the full corpus, and after the last step come the plot and --eval-generate.
    SIGUSR2 during start-up is served at the first step boundary (its default action would end the process);
    SIGTERM after the last step ends the run at once, in one line, with every checkpoint kept."""
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--max-steps", "3"),
                     env={"FAULT": "usr2:startup@loaded,term:finish@plotted"})
    assert result.returncode == 143, result.stderr[-3000:]
    assert saved_steps(out) == [1, 3]  # the early request, served at the first step boundary; then the end
    said = result.stdout + result.stderr
    assert "SIGUSR2: saved checkpoint-00000001; training goes on" in said
    named = lines_naming(said, signal.SIGTERM)
    assert len(named) == 1 and "after the last step" in named[0] and "Traceback" not in said, said


def test_a_stopping_signal_before_the_first_step_ends_the_run_at_once_in_one_line(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--max-steps", "3"), env={"FAULT": "term:startup@loaded"})
    assert result.returncode == 143, result.stderr[-3000:]
    named = lines_naming(result.stdout + result.stderr, signal.SIGTERM)
    assert len(named) == 1 and "before the first step" in named[0], result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert saved_steps(out) == []


def test_after_the_last_step_sigusr2_is_ignored_by_train_py_and_the_eval_it_starts():
    """The --eval-generate child inherits the ignored SIGUSR2 (an ignored signal survives exec; a handler does not)."""
    from t5dialog import distributed

    stop = distributed.StopFlag()
    try:
        stop.end_training()
        child = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGUSR2); "
                                "print('still here')"], capture_output=True, text=True, timeout=60)
    finally:
        stop.restore()
    assert child.returncode == 0 and child.stdout == "still here\n", child
