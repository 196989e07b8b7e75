"""Crash safety: kill -9 anywhere, resume, and get the very same run.

Faults are injected with FAULT (see files.fault): a SIGKILL in the
middle of a step, in the middle of a save, just before the commit rename,
or between the commit and the deletion of old checkpoints.
"""

import functools
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import assert_user_error, run_cli, script_env, train_argv
from safetensors.torch import load_file

import train
from t5dialog import checkpoint as ckpt
from t5dialog import files, runlog

pytestmark = pytest.mark.slow  # every test here starts train.py (or torchrun) as a process

# 2 epochs of the tiny data, a checkpoint every 3 steps, keep 1 (+ the best).
FLAGS = ["--max-length", "64", "--max-target-length", "24", "--max-tokens", "384", "--log-every", "1",
         "--eval-every", "3", "--save-every", "3", "--keep", "1", "--epochs", "2", "--log-examples", "--seed", "5"]


argv = functools.partial(train_argv, flags=FLAGS)


def step_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def final_weights(out):
    latest = json.loads((out / "checkpoints.json").read_text())["latest"]
    return load_file(out / latest / "model.safetensors")


def assert_same_run(out, reference):
    ref_rows, rows = step_rows(reference), step_rows(out)
    assert sorted(rows) == sorted(ref_rows)
    for step in ref_rows:
        assert rows[step]["loss"] == ref_rows[step]["loss"], step  # bit for bit
        assert rows[step]["examples"] == ref_rows[step]["examples"], step  # same data, same order
    ref_w, w = final_weights(reference), final_weights(out)
    assert ref_w.keys() == w.keys()
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A dozen sample dialogues: about 14 steps an epoch, so each run takes seconds."""
    from conftest import SAMPLE

    d = tmp_path_factory.mktemp("crash-data")
    (d / "train.txt").write_text("".join(SAMPLE.joinpath("train.txt").read_text().splitlines(True)[:12]))
    (d / "validation.txt").write_text("".join(SAMPLE.joinpath("validation.txt").read_text().splitlines(True)[:4]))
    return d


@pytest.fixture(scope="module")
def reference(tiny_model, data_dir, tmp_path_factory):
    """One uninterrupted run: the standard every interrupted run must meet."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def steps_per_epoch(out):
    rows = step_rows(out)
    return sum(1 for r in rows.values() if r["epoch"] == 0) + 1  # the epoch counter turns at the last step


def all_checkpoints_verify(out):
    found = ckpt.list_checkpoints(out)
    return bool(found) and all(ckpt.verify(p) is None for p in found)


def test_kill_9_at_random_points_then_resume_is_bit_exact(reference, tiny_model, data_dir, tmp_path):
    total = max(step_rows(reference))
    per_epoch = steps_per_epoch(reference)
    rng = random.Random(1234)
    # Seeded random points in every stage, plus one mid-epoch in epoch 2+.
    stages = ["mid_step", "mid_save", "before_commit", "before_prune"]
    saves = [s for s in range(3, total + 1) if s % 3 == 0]
    faults = [("mid_step", per_epoch + rng.randrange(2, per_epoch - 1))]
    for stage in stages:
        faults.append((stage, rng.choice(saves) if stage != "mid_step" else rng.randrange(4, total)))
    faults = sorted(set(faults), key=lambda f: (f[1], stages.index(f[0])))
    out = tmp_path / "out"
    extra, kills = [], 0
    for stage, step in faults:
        result = run_cli("train.py", *argv(tiny_model, data_dir, out, *extra), env={"FAULT": f"kill:{stage}@{step}"})
        if result.returncode == 0:  # resumed past this point already
            continue
        assert result.returncode == -9, (stage, step, result.stderr[-2000:])
        kills += 1
        # At no moment is there a checkpoint folder that does not verify.
        assert all_checkpoints_verify(out) or not ckpt.list_checkpoints(out)
        extra = ["--resume"] if ckpt.list_checkpoints(out) else []
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert kills >= 4
    assert not [p for p in out.iterdir() if p.name.startswith((ckpt.TMP_PREFIX, ckpt.TRASH_PREFIX))]
    assert_same_run(out, reference)


def test_resume_mid_epoch_in_a_later_epoch_sees_the_same_examples(reference, tiny_model, data_dir, tmp_path):
    per_epoch = steps_per_epoch(reference)
    kill_at = per_epoch + 5  # inside the second epoch, a few steps after a save
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out), env={"FAULT": f"mid_step@{kill_at}"})
    assert result.returncode == -9
    state = torch.load(ckpt.newest_valid(out) / ckpt.STATE, weights_only=True)
    assert state["epoch"] >= 1 and state["batch"] > 0  # really mid-epoch, in epoch 2 or later
    assert run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume")).returncode == 0
    assert_same_run(out, reference)


def test_negative_control_resume_without_rng_restore_differs(reference, tiny_model, data_dir, tmp_path, monkeypatch):
    """Shows the equality above can fail: skip restoring RNG and dropout differs."""
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out), env={"FAULT": "mid_step@8"})
    assert result.returncode == -9
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    assert train.main(argv(tiny_model, data_dir, out, "--resume")) == 0
    ref, rows = step_rows(reference), step_rows(out)
    assert any(rows[s]["loss"] != ref[s]["loss"] for s in ref if s > 6)


@pytest.mark.parametrize("action, code", [("term", 143), ("int", 130)])
def test_sigterm_and_sigint_save_at_the_step_and_exit(action, code, reference, tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out), env={"FAULT": f"{action}:mid_step@5"})
    assert result.returncode == code, result.stderr[-2000:]
    assert (out / "checkpoint-00000005").is_dir() and ckpt.verify(out / "checkpoint-00000005") is None
    assert "--resume" in result.stdout
    assert run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume")).returncode == 0
    assert_same_run(out, reference)


def test_a_failed_write_keeps_the_previous_checkpoint(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out), env={"FAULT": "enospc:mid_save@6"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "disk full while writing" in result.stderr
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000003"]
    assert ckpt.verify(out / "checkpoint-00000003") is None
    assert not [p for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]  # no partial checkpoint
    assert run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume", "--max-steps", "7")).returncode == 0


def test_leftover_temporary_folders_are_removed_at_start(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("train.py", *argv(tiny_model, data_dir, out), env={"FAULT": "before_commit@6"})
    assert result.returncode == -9
    assert [p for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]  # the crash left one
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume", "--max-steps", "7"))
    assert result.returncode == 0 and "removed unfinished temporary files" in result.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def test_retention_keeps_the_best_and_never_zero(reference):
    index = json.loads((reference / "checkpoints.json").read_text())
    names = {p.name for p in ckpt.list_checkpoints(reference)}
    assert index["best"] in names and index["latest"] in names
    assert len(names) <= 2


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("train.py", *argv(tiny_model, data_dir, out, "--keep", "2", "--max-steps", "6")).returncode == 0
    found = ckpt.list_checkpoints(out)
    assert [p.name for p in found] == ["checkpoint-00000003", "checkpoint-00000006"]
    weights = found[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume", "--max-steps", "7"))
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if "skipping damaged" in line]
    assert len(warnings) == 1 and found[-1].name in warnings[0]
    assert "resuming from checkpoint-00000003" in result.stdout


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_a_malicious_training_state_is_refused_and_never_runs(reference, tiny_model, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    for path in ckpt.list_checkpoints(out):
        (path / ckpt.STATE).write_bytes(pickle.dumps({"step": 1, "evil": Payload()}, protocol=2))
        # An attacker controls the whole folder, manifest included.
        manifest = json.loads((path / ckpt.MANIFEST).read_text())
        manifest["files"][ckpt.STATE] = files.sha256(path / ckpt.STATE)
        (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume"))
    assert_user_error(result, "refused", "system")  # names what it would have run
    assert not marker.exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_training_state(ckpt.list_checkpoints(out)[-1])
    assert not marker.exists()


def test_output_dir_that_is_not_writable(tiny_model, data_dir, tmp_path):
    if os.geteuid() == 0:
        target = "/sys/t5-dailydialog-out"  # even root may not create folders here
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = str(locked / "out")
    result = run_cli("train.py", *argv(tiny_model, data_dir, target)[:-len(FLAGS)], *FLAGS)
    assert_user_error(result, "not writable")


def test_a_save_that_fails_in_torch_save_is_a_checkpoint_error(tiny_model, tmp_path, monkeypatch):
    """A full disk inside torch.save raises RuntimeError, not OSError: still one clean error."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tok = AutoModelForSeq2SeqLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)

    def full_disk(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="PytorchStreamWriter failed"):
        ckpt.save_checkpoint(tmp_path, 3, model, tok, {"step": 3}, {})
    assert list(tmp_path.iterdir()) == []  # no partial folder left behind


def test_a_metrics_line_cut_short_by_a_crash_does_not_block_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    runlog.truncate_metrics(tmp_path, 2)
    assert runlog.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


# ---------------------------------------------------------------- one writer per output dir


@pytest.mark.slow
def test_a_second_train_py_on_a_busy_output_dir_is_refused_and_a_killed_holder_leaves_no_lock(tiny_model, data_dir,
                                                                                              tmp_path):
    from conftest import ROOT

    out = tmp_path / "out"
    env = script_env({"FAULT": "stop:mid_step@5"})
    # A real run that freezes (SIGSTOP) in the middle of step 5, after its save at step 3: it holds the lock.
    holder = subprocess.Popen([sys.executable, "train.py", *argv(tiny_model, data_dir, out)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(holder.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
        assert "checkpoint-00000003" in {p.name for p in ckpt.list_checkpoints(out)}
        for extra in (["--resume"], []):  # resuming it, or starting over in it
            result = run_cli("train.py", *argv(tiny_model, data_dir, out, *extra))
            assert_user_error(result, f"pid {holder.pid} on {socket.gethostname()}", "in use", "--output-dir")
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
        # Reading a checkpoint needs no lock: infer.py answers while the run is busy.
        result = run_cli("infer.py", "--checkpoint", out, "hello there")
        assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
    finally:
        holder.kill()  # kill -9; a stopped process dies too
        holder.wait()
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--resume", "--max-steps", "6"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint-00000003" in result.stdout
    assert ckpt.verify(out / "checkpoint-00000006") is None


# ---------------------------------------------------------------- messages


@pytest.mark.slow
def test_disk_full_is_an_error_line_of_its_own_naming_the_checkpoint(tiny_model, data_dir, tmp_path):
    result = run_cli("train.py", *argv(tiny_model, data_dir, tmp_path / "out"), env={"FAULT": "enospc:mid_save@6"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.split("\n") if "error:" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("train.py: error: ")  # not after the progress bar's text on the same line
    assert "disk full" in errors[0] and "checkpoint-00000006" in errors[0] and "--resume" in errors[0]


# ---------------------------------------------------------------- bf16


@pytest.mark.slow
def test_bf16_resume_after_kill_9_is_bit_exact(tiny_model, data_dir, tmp_path):
    bf16 = ["--precision", "bf16", "--device", "cpu", "--max-steps", "10"]
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert run_cli("train.py", *argv(tiny_model, data_dir, straight, *bf16)).returncode == 0
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, *bf16), env={"FAULT": "kill:mid_step@8"})
    assert result.returncode == -9
    # The same command line with --resume (a typed --epochs alone would replace the recorded --max-steps);
    # --precision is not retyped: the recorded bf16 must apply.
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, "--max-steps", "10", "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint-00000006" in result.stdout and "bf16" in result.stdout
    assert_same_run(out, straight)
    assert {t.dtype for t in final_weights(out).values()} == {torch.float32}


# ---------------------------------------------------------------- kill storm

STORM_FLAGS = ["--save-every", "2", "--eval-every", "2"]  # after FLAGS: about 28 steps in 2 epochs, a save every 2


@pytest.mark.slow
@pytest.mark.soak
def test_a_storm_of_20_kills_then_resume_gives_the_uninterrupted_run(tiny_model, data_dir, tmp_path):
    straight = tmp_path / "straight"
    assert run_cli("train.py", *argv(tiny_model, data_dir, straight, *STORM_FLAGS)).returncode == 0
    total, per_epoch = max(step_rows(straight)), steps_per_epoch(straight)
    saves = {s for s in range(1, total + 1) if s % 2 == 0 or s in (per_epoch, total)}
    rng = random.Random(20)
    stages = ["mid_step", "mid_save", "before_commit", "before_prune"]
    moments = sorted((rng.randint(1, total), rng.choice(stages)) for _ in range(20))
    out, done, kills = tmp_path / "out", 0, []
    for step, stage in moments:
        # The first step at or after the drawn one that the run still has ahead and that has this stage
        # (saves only at save steps; a before_prune at the last step would leave nothing to resume).
        ahead = [s for s in range(max(step, done + 1), total + 1)
                 if stage == "mid_step" or (s in saves and not (stage == "before_prune" and s == total))]
        fault = f"kill:{stage}@{ahead[0]}" if ahead else f"kill:mid_step@{max(step, done + 1)}"
        resume = ["--resume"] if ckpt.list_checkpoints(out) else []
        result = run_cli("train.py", *argv(tiny_model, data_dir, out, *STORM_FLAGS, *resume), env={"FAULT": fault})
        assert result.returncode == -9, (fault, result.stderr[-2000:])
        kills.append(fault)
        assert not ckpt.list_checkpoints(out) or all_checkpoints_verify(out), fault
        newest = ckpt.newest_valid(out)
        done = ckpt.step_of(newest) if newest else 0
    assert {k.split(":")[1].split("@")[0] for k in kills} == set(stages)
    result = run_cli("train.py", *argv(tiny_model, data_dir, out, *STORM_FLAGS, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, total + 1))  # each training step exactly once
    assert_same_run(out, straight)
