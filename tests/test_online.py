"""The run most users make: `python train.py` with no flags, online.

The internet is the stand-in hub of tests/hub_server.py (HF_ENDPOINT on
127.0.0.1): it serves a tiny T5 as "t5-small" and DailyDialog's zips. The
project is copied into a fresh folder first, so the corpus lands in that
copy's data/dailydialog as it would in a user's clone.
"""

import json
import shutil

import pytest
from conftest import ROOT, STAND_IN_HOST, assert_user_error, damage_cached, hub_corpus, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hermetic")]  # hermetic: none of the user's hub variables


@pytest.fixture
def clone(tmp_path):
    """The project as a fresh clone has it: scripts, the t5dialog package and data/ (sample and download.py)."""
    d = tmp_path / "clone"
    d.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy(path, d)
    shutil.copytree(ROOT / "t5dialog", d / "t5dialog", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data", d / "data", ignore=shutil.ignore_patterns("dailydialog", "__pycache__"))
    return d


def run_in(clone, *args, env):
    return run_cli(*args, env=env, cwd=clone)


def test_plain_train_py_downloads_the_corpus_loads_t5_small_trains_and_infer_answers(clone, fake_hub, tmp_path):
    env = fake_hub.env(tmp_path / "hf")
    result = run_in(clone, "train.py", env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    data = clone / "data" / "dailydialog"
    assert (data / "train.txt").read_text().splitlines() == hub_corpus()["train"]  # downloaded and verified
    assert "data: the full DailyDialog corpus" in result.stdout and "CC BY-NC-SA" in result.stdout
    assert "model: t5-small" in result.stdout and "FROM SCRATCH" not in result.stdout
    assert any(path.endswith("/train.zip") for path in fake_hub.paths("HEAD"))  # the corpus came from the hub
    assert any("t5-small" in path and path.endswith("model.safetensors") for path in fake_hub.paths())

    out = clone / "checkpoints"
    index = json.loads((out / "checkpoints.json").read_text())
    assert index["best"] and index["best_val_loss"] is not None
    config = json.loads((out / index["best"] / "run_config.json").read_text())
    assert config["model"] == "t5-small" and config["train_file"] == str(data / "train.txt")
    card = (out / index["best"] / "README.md").read_text()
    assert "cc-by-nc-sa-4.0" in card and "base_model: t5-small" in card

    reply = run_in(clone, "infer.py", "How are you?", env=env)
    assert reply.returncode == 0, reply.stderr[-2000:]
    assert len(reply.stdout.splitlines()) == 1 and reply.stdout.strip()


def test_behind_a_proxy_train_py_downloads_and_loads_through_it(clone, fake_hub, fake_proxy, tmp_path):
    """HF_ENDPOINT names a host only the proxy can reach: a direct connection would mean 'offline'."""
    env = {**fake_hub.env(tmp_path / "hf", endpoint=STAND_IN_HOST), **fake_proxy.env()}
    result = run_in(clone, "train.py", "--max-steps", "3", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: t5-small" in result.stdout and "FROM SCRATCH" not in result.stdout
    assert (clone / "data" / "dailydialog" / "download_info.json").exists()
    assert fake_proxy.requests  # everything went through the proxy


@pytest.mark.parametrize("offline", [
    {"HF_HUB_OFFLINE": "1"},
    {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # connection refused: nothing listens there
])
def test_offline_plain_train_py_uses_the_demo_sample_and_says_so(clone, tmp_path, offline):
    result = run_in(clone, "train.py", "--max-steps", "2", env={**offline, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo sample" in result.stdout and "FROM SCRATCH" in result.stdout
    assert not (clone / "data" / "dailydialog").exists()


def test_no_download_keeps_the_sample_even_online(clone, fake_hub, tmp_path):
    result = run_in(clone, "train.py", "--no-download", "--max-steps", "2", env=fake_hub.env(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--no-download" in result.stdout and not (clone / "data" / "dailydialog").exists()
    assert not any(path.endswith(".zip") for path in fake_hub.paths())


def test_a_hub_answering_500_stops_train_py_instead_of_training_on_the_sample(clone, fake_hub, tmp_path):
    """The hub is there (it would serve t5-small): a server error is an error, not "offline"."""
    fake_hub.faults["train.zip"] = 500
    result = run_in(clone, "train.py", "--max-steps", "2", env=fake_hub.env(tmp_path / "hf"))
    assert_user_error(result, "the hub answered 500 Internal Server Error for train.zip", "re-run later")
    assert "demo sample" not in result.stdout
    assert not (clone / "data" / "dailydialog").exists() and not (clone / "checkpoints" / "checkpoints.json").exists()


def test_train_py_mends_a_damaged_zip_in_the_hub_cache(clone, fake_hub, tmp_path):
    """train.py has no --force: it downloads a damaged cached zip again by itself; offline, its one line names a fix
    that works from train.py, which is then done."""
    env = fake_hub.env(tmp_path / "hf")
    assert run_in(clone, "data/download.py", "--out", tmp_path / "first", env=env).returncode == 0  # fills the cache
    damage_cached(tmp_path / "hf", "train.zip")

    result = run_in(clone, "train.py", "--max-steps", "2", env={**env, "HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "train.zip", "corrupted", "unset HF_HUB_OFFLINE and re-run")
    result = run_in(clone, "train.py", "--max-steps", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.zip in the Hugging Face cache is damaged" in result.stdout and "downloading it again" in result.stdout
    assert "data: the full DailyDialog corpus" in result.stdout
    assert (clone / "data" / "dailydialog" / "train.txt").read_text().splitlines() == hub_corpus()["train"]
