"""Shared fixtures: a tiny T5 and tokenizer built here, small data, CLI runner.

Nothing is downloaded: the tokenizer is trained on the project's own sample
dialogues and the model is a randomly initialised T5 a few thousand
parameters big, so every test runs offline on a CPU in seconds.
"""

from pathlib import Path

import pytest
import torch
from launcher import ROOT, run_cli, run_fresh, script_env  # noqa: F401  (the tests import them from here)

# Like OMP_NUM_THREADS=1 for the scripts: the tiny models gain nothing from a second thread, and beside another
# test process on 2 cores a second thread only waits for a core.
torch.set_num_threads(1)

SAMPLE = ROOT / "data" / "sample"
# Real DailyDialog text, which the project may not commit (CC BY-NC-SA 4.0): the developers' sample kept beside
# the checkout, else the corpus data/download.py writes; None when neither is here.
REAL_DAILYDIALOG = next((d for d in (ROOT.parent / "shared" / "dailydialog", ROOT / "data" / "dailydialog")
                         if (d / "train.txt").is_file() and (d / "validation.txt").is_file()), None)
NO_REAL_DAILYDIALOG = "needs real DailyDialog text: run `python data/download.py` (writes data/dailydialog/)"

# Small enough that an optimizer step takes milliseconds.
TINY_CONFIG = dict(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2, dropout_rate=0.1)
# Flags that keep train.py runs on the tiny model short.
TINY_FLAGS = ["--max-length", "64", "--max-target-length", "24", "--max-tokens", "512", "--log-every", "1",
              "--eval-every", "4", "--save-every", "4"]


def train_argv(model, data, out, *extra, flags=TINY_FLAGS) -> list[str]:
    """train.py's arguments for ``model`` on ``data``/train.txt and validation.txt into ``out``: ``flags``
    (each test file's settings for a short run), then ``extra`` (later flags win, as on a command line)."""
    return [str(a) for a in ("--model", model, "--train-file", Path(data) / "train.txt", "--val-file",
                             Path(data) / "validation.txt", "--output-dir", out, *flags, *extra)]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The first dialogues of the project's sample, as train.txt/validation.txt."""
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text("".join(SAMPLE.joinpath("train.txt").read_text().splitlines(True)[:24]))
    (d / "validation.txt").write_text("".join(SAMPLE.joinpath("validation.txt").read_text().splitlines(True)[:6]))
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder holding a random-init tiny T5 and a tokenizer trained on sample text."""
    from t5dialog import models

    d = tmp_path_factory.mktemp("tiny-t5")
    model, tokenizer = models.build_scratch(SAMPLE / "train.txt", vocab_size=400, seed=0, **TINY_CONFIG)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """(model, tokenizer) of tiny_model on the CPU, as infer.py loads a checkpoint; one per test module."""
    from t5dialog.generation import load

    return load(tiny_model, torch.device("cpu"))


def assert_user_error(result, *words):
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


# ---------------------------------------------------------------- stand-in hub
# tests/hub_server.py: a local Hugging Face hub and proxy, so the download and
# model-loading paths run for real without the internet.

import functools  # noqa: E402

STAND_IN_HOST = "http://hub.invalid"  # a name no resolver knows: only fake_proxy can reach it


@functools.cache
def hub_corpus() -> dict[str, list[str]]:
    """What fake_hub's dataset holds: as many tiny dialogues per split as the real corpus has;
    train's last one also occurs in test (what --dedupe drops)."""
    from t5dialog import corpus_download as corpus

    made = {split: [f"{split} line {i} . __eou__ Fine , thanks . __eou__ " for i in range(n)]
            for split, n in corpus.EXPECTED_COUNTS.items()}
    made["train"][-1] = made["test"][0]
    return made


DATASET_PATH = "/datasets/roskoN/dailydialog/resolve/main"  # where the stand-in hub serves the corpus' zips


def assert_corpus_written(out, commit):
    """out holds hub_corpus() as download.py writes it, complete, from that commit."""
    import json

    from t5dialog import corpus_download as corpus

    for split in corpus.SPLITS:
        assert (out / f"{split}.txt").read_text(encoding="utf-8").splitlines() == hub_corpus()[split]
    assert json.loads((out / corpus.MANIFEST).read_text())["commit"] == commit
    assert corpus.available(out) and not [p for p in out.iterdir() if p.name.endswith(".part")]


def damage_cached(hf_home, name):
    """Cut in half the blob a download of the corpus' ``name`` left in the Hugging Face cache under hf_home."""
    blobs = {p.resolve() for p in Path(hf_home).rglob(name) if "snapshots" in p.parts}
    assert len(blobs) == 1, blobs
    blob = blobs.pop()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])


@pytest.fixture(scope="session")
def hub_repos(tiny_model, tmp_path_factory):
    """What the stand-in hub serves: the tiny T5 as google-t5/t5-small (t5-small redirects to it, as on the
    real hub) and roskoN/dailydialog's train/validation/test zips holding hub_corpus()."""
    from hub_server import Repo, make_zip

    from t5dialog import corpus_download as corpus

    d = tmp_path_factory.mktemp("hub-zips")
    zips = {f"{s}.zip": make_zip(d / f"{s}.zip", s, hub_corpus()[s]).read_bytes() for s in corpus.SPLITS}
    repos = {("models", "google-t5/t5-small"): Repo.from_folder(tiny_model),
             ("datasets", corpus.REPO_ID): Repo({**zips, "README.md": b"# DailyDialog\n"})}
    return repos, {("models", "t5-small"): "google-t5/t5-small"}


@pytest.fixture
def fake_hub(hub_repos):
    """A running stand-in hub: .url, .requests [(method, path)], .env(cache_dir) for a subprocess."""
    from hub_server import FakeHub

    repos, aliases = hub_repos
    with FakeHub(repos, aliases) as hub:
        yield hub


@pytest.fixture
def fake_proxy(fake_hub):
    """A forward proxy that alone can reach fake_hub under the name hub.invalid (STAND_IN_HOST):
    .url, .requests [(method, target)], .connections, .env() with HTTP(S)_PROXY set."""
    from proxy_server import FakeProxy

    with FakeProxy({"hub.invalid": ("127.0.0.1", fake_hub.port)}) as proxy:
        yield proxy


# What the user may have exported that changes where the hub is, whether it is asked, how long it is waited
# for and through which proxy: HF_HUB_OFFLINE=1 is common on clusters, a proxy in companies.
HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN",
                 "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_VERBOSITY",
                 "HUB_PROBE_TIMEOUT",
                 *(n for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY") for n in (name, name.lower())))


@pytest.fixture
def hermetic(monkeypatch, tmp_path):
    """None of the user's hub variables (HUB_VARIABLES): each test sets exactly what it needs, and its
    subprocesses inherit the same. huggingface_hub reads some of them once, at import, into `constants`:
    those are reset too, and whatever the product changes there (hub.bound_waits) is undone afterwards."""
    from huggingface_hub import constants

    for name in HUB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never the user's own cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", constants._HF_DEFAULT_ENDPOINT)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        constants._HF_DEFAULT_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", constants.DEFAULT_ETAG_TIMEOUT)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", constants.DEFAULT_DOWNLOAD_TIMEOUT)
    return monkeypatch
