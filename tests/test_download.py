"""Tests for corpus_download.py and its CLI data/download.py. No test touches the real
hub: the extraction and verification run on small zips built here in the
corpus' layout, the offline path runs the real CLI with the hub made
unreachable, and the download path runs it against a stand-in hub
(tests/hub_server.py). The tests in tests/test_hub.py cover the hub itself:
reachability, server errors, stalls, damaged copies, proxies, progress."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import hub_server
import pytest
import torch
from conftest import DATASET_PATH, SAMPLE, TINY_CONFIG, assert_corpus_written, assert_user_error, hub_corpus, run_cli
from tqdm import tqdm

from t5dialog import corpus_download as dl

pytestmark = pytest.mark.usefixtures("hermetic")  # none of the user's hub, offline or proxy variables

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "download.py"
_spec = importlib.util.spec_from_file_location("dd_download", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

# Two or three small dialogues per split; train's second dialogue also occurs
# in test, with different spacing (what --dedupe must catch).
DIALOGUES = {
    "train": ["Hi . __eou__ Hello ! __eou__ ",
              "How are you ? __eou__ Fine , thanks . __eou__ ",
              "Bye . __eou__ "],
    "validation": ["Where to ? __eou__ Home . __eou__ ",
                   "Tea ? __eou__ Yes , please . __eou__ Here . __eou__ "],
    "test": ["How  are you ?  __eou__ Fine , thanks . __eou__",
             "What time is it ? __eou__ Six . __eou__ "],
}
COUNTS = {split: len(d) for split, d in DIALOGUES.items()}


def make_zip(path, split, dialogues=None, **kw):
    """Build {split}.zip like the corpus, from DIALOGUES unless told otherwise."""
    return hub_server.make_zip(path, split, DIALOGUES[split] if dialogues is None else dialogues, **kw)


@pytest.fixture
def zips(tmp_path, monkeypatch):
    """A --from-dir folder with the three fixture zips; counts made to match."""
    monkeypatch.setattr(dl, "EXPECTED_COUNTS", dict(COUNTS))
    src = tmp_path / "zips"
    src.mkdir()
    for split in dl.SPLITS:
        make_zip(src / f"{split}.zip", split)
    return src


def run_main(src, out, *extra):
    return script.main(["--from-dir", str(src), "--out", str(out), *extra])


# --- read_split / verify_split ----------------------------------------------

@pytest.mark.parametrize("folder", ["train", "ijcnlp_dailydialog/train", ""])
def test_read_split_finds_files_under_any_folder(tmp_path, folder):
    z = make_zip(tmp_path / "train.zip", "train", folder=folder)
    dialogues, acts, emotions = dl.read_split(z, "train")
    assert dialogues == DIALOGUES["train"]
    assert acts[0].split() == ["2", "2"] and emotions[2].split() == ["0"]
    dl.verify_split("train", dialogues, acts, emotions, expected=3)


def test_wrong_count_fails(tmp_path):
    z = make_zip(tmp_path / "train.zip", "train")
    with pytest.raises(dl.DataError, match="3 dialogues, expected 11118"):
        dl.verify_split("train", *dl.read_split(z, "train"), expected=11_118)


def test_missing_file_is_named(tmp_path):
    z = make_zip(tmp_path / "test.zip", "test", omit="dialogues_emotion_test.txt")
    with pytest.raises(dl.DataError, match="dialogues_emotion_test.txt is missing"):
        dl.read_split(z, "test")


def test_ambiguous_member_fails(tmp_path):
    z = make_zip(tmp_path / "test.zip", "test")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("copy/dialogues_test.txt", "x __eou__\n")
    with pytest.raises(dl.DataError, match="occurs 2 times"):
        dl.read_split(z, "test")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not_a_zip", "absent"])
def test_corrupted_zip_fails_cleanly(tmp_path, damage):
    z = make_zip(tmp_path / "train.zip", "train", dialogues=DIALOGUES["train"] * 50)
    data = z.read_bytes()
    if damage == "truncated":
        z.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # inside the first member's compressed data
        z.write_bytes(data[:60] + bytes([data[60] ^ 0xFF]) + data[61:])
    elif damage == "not_a_zip":
        z.write_text("<html>This domain may be for sale</html>")
    else:
        z.unlink()
    with pytest.raises(dl.DataError, match="corrupted|does not exist"):
        dl.read_split(z, "train")


@pytest.mark.parametrize("acts, emotions, message", [
    (["2 2 ", "2 ", "2 "], None, "dialogue 2: 2 turns but 1 act"),
    (None, ["0 0 ", "0 0 ", "0 0 "], "dialogue 3: 1 turns but 1 act and 2 emotion"),
    (["2 2 ", "2 2 "], None, "3 dialogues but 2 act"),
    (["2 9 ", "2 2 ", "2 "], None, "dialogue 1: unknown act"),
])
def test_label_mismatch_fails(tmp_path, acts, emotions, message):
    z = make_zip(tmp_path / "train.zip", "train", acts=acts, emotions=emotions)
    with pytest.raises(dl.DataError, match=message):
        dl.verify_split("train", *dl.read_split(z, "train"))


def test_turn_without_eou_fails():
    with pytest.raises(dl.DataError, match="dialogue 1: a turn is not followed"):
        dl.verify_split("test", ["Hi . __eou__ Hello !"], ["1 1"], ["0 0"])


def test_dedupe_uses_whitespace_normalisation():
    kept, dropped = dl.dedupe(DIALOGUES["train"], DIALOGUES["test"])
    assert dropped == 1
    assert kept == [DIALOGUES["train"][0], DIALOGUES["train"][2]]
    # Case and punctuation still count: these are different dialogues.
    assert dl.dedupe(["Hi . __eou__ "], ["hi . __eou__ ", "Hi __eou__ "]) == (["Hi . __eou__ "], 0)


# --- atomic writes -----------------------------------------------------------

def test_interrupted_write_leaves_old_file_and_no_part(tmp_path):
    target = tmp_path / "train.txt"
    target.write_text("old\n")

    def lines():
        yield "first __eou__ "
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        dl.write_atomic(target, lines())
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]
    dl.write_atomic(target, ["a __eou__ \n", "b __eou__ \n"])
    assert target.read_text() == "a __eou__ \nb __eou__ \n"


def test_interrupted_run_is_redone_next_time(zips, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = dl.write_atomic

    def dies_on_validation(path, lines):
        if path.name == "validation.txt":
            raise KeyboardInterrupt
        real_write(path, lines)

    monkeypatch.setattr(dl, "write_atomic", dies_on_validation)
    assert run_main(zips, out) == 130
    assert (out / "train.txt").exists() and not (out / "validation.txt").exists()
    assert not (out / dl.MANIFEST).exists()  # so the next run does not skip
    monkeypatch.setattr(dl, "write_atomic", real_write)
    assert run_main(zips, out) == 0
    assert (out / "validation.txt").read_text().splitlines() == DIALOGUES["validation"]


# --- main --------------------------------------------------------------------

def test_main_extracts_verifies_and_skips_when_done(zips, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(zips, out) == 0
    for split in dl.SPLITS:
        assert (out / f"{split}.txt").read_text(encoding="utf-8").splitlines() == DIALOGUES[split]
    info = json.loads((out / dl.MANIFEST).read_text())
    assert info["counts"] == COUNTS and info["dedupe"] is False
    printed = capsys.readouterr().out
    assert "train: 3 dialogues verified" in printed and "CC BY-NC-SA 4.0" in printed
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_main(zips, out) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "test.txt").write_text("tampered\n")
    assert run_main(zips, out, "--force") == 0
    assert (out / "test.txt").read_text().splitlines() == DIALOGUES["test"]


def test_main_dedupe(zips, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(zips, out) == 0
    # Data made without --dedupe: asking for it must not silently do nothing.
    assert run_main(zips, out, "--dedupe") == 2
    assert "--force" in capsys.readouterr().err
    assert run_main(zips, out, "--dedupe", "--force") == 0
    assert "dropped 1 training dialogues" in capsys.readouterr().out
    assert (out / "train.txt").read_text().splitlines() == [DIALOGUES["train"][0], DIALOGUES["train"][2]]
    assert json.loads((out / dl.MANIFEST).read_text())["dropped_by_dedupe"] == 1


def test_main_bad_archive_writes_nothing(zips, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (zips / "test.zip").write_bytes(b"PK\x03\x04 broken")
    assert run_main(zips, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("download.py: error: ") and err.count("\n") == 1 and "test.zip" in err
    assert f"copy an intact test.zip into {zips}" in err  # the user's own zips: nothing to download again
    assert not out.exists()

    make_zip(zips / "test.zip", "test")
    monkeypatch.setattr(dl, "EXPECTED_COUNTS", {**COUNTS, "train": 11_118})
    assert run_main(zips, out) == 2
    assert "3 dialogues, expected 11118" in capsys.readouterr().err
    assert not out.exists()


# --- offline: the real CLI, hub unreachable ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "1"},               # only the (empty) local cache may be used
    {"HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens on the discard port
])
def test_offline_cli_fails_fast_with_one_line(tmp_path, env):
    base = {k: v for k, v in os.environ.items()
            if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    full_env = {**base, "HF_HOME": str(tmp_path / "hf_home"), **env}
    # The timeout only stops a hang (e.g. hub retries); no timing is asserted.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")],
                          env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("download.py: error: ")
    assert not (tmp_path / "out").exists()


# --- the real CLI against the stand-in hub (tests/hub_server.py) -------------

def hub_env(fake_hub, tmp_path, **extra):
    return {**fake_hub.env(tmp_path / "hf"), **extra}


@pytest.mark.slow
def test_cli_downloads_verifies_and_writes_the_corpus(fake_hub, tmp_path):
    out, env = tmp_path / "out", hub_env(fake_hub, tmp_path)
    result = run_cli(SCRIPT, "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    commit = fake_hub.repos[("datasets", dl.REPO_ID)].commit
    assert_corpus_written(out, commit)
    assert f"(commit {commit})" in result.stdout and "CC BY-NC-SA 4.0" in result.stdout
    assert "train: 11118 dialogues verified" in result.stdout
    for split in dl.SPLITS:  # metadata from the hub, the bytes from its CDN (a 302 to another origin)
        assert ("HEAD", f"{DATASET_PATH}/{split}.zip") in fake_hub.requests
    assert len([p for p in fake_hub.paths("GET") if p.startswith("/cdn/")]) == 1  # only train.zip is that big
    # Not on a terminal (no progress bar): a line per file with its size.
    size = tqdm.format_sizeof(len(fake_hub.repos[("datasets", dl.REPO_ID)].files["train.zip"]), "B", 1000)
    assert f"  downloading train.zip ({size})\n" in result.stdout

    # Done already: no request at all. Offline, --force rebuilds from the Hugging Face cache alone.
    asked = len(fake_hub.requests)
    assert "nothing to do" in run_cli(SCRIPT, "--out", out, env=env).stdout
    (out / "test.txt").write_text("tampered\n")
    result = run_cli(SCRIPT, "--out", out, "--force", "--dedupe", env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(fake_hub.requests) == asked
    assert "dropped 1 training dialogues" in result.stdout
    assert (out / "test.txt").read_text().splitlines() == hub_corpus()["test"]


# --- a full disk -------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size (remounting resizes it); skips where mounting is not allowed."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = []

    def mount(size):
        opts = f"remount,size={size}" if mounted else f"size={size}"
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"no mount command here ({e})")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()})")
        mounted.append(size)
        return folder

    yield mount
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def full_size_zips(folder):
    folder.mkdir()
    for split in dl.SPLITS:
        hub_server.make_zip(folder / f"{split}.zip", split, hub_corpus()[split])
    return folder


def assert_clean_after_disk_full(out, capsys, name):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full" in err and str(out / name) in err, err
    assert not dl.available(out) and not (out / dl.MANIFEST).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("name", ["validation.txt", dl.MANIFEST])
def test_disk_full_while_writing_keeps_nothing_half_written(zips, tmp_path, capsys, monkeypatch, name):
    out = tmp_path / "out"
    assert run_main(zips, out) == 0
    monkeypatch.setenv("FAULT", f"enospc:write@{name}")  # where no small disk can be mounted
    assert run_main(zips, out, "--force") == 2
    assert_clean_after_disk_full(out, capsys, name)  # written files without a manifest never pass for complete
    monkeypatch.delenv("FAULT")
    assert run_main(zips, out) == 0 and dl.available(out)


def test_disk_full_for_real_then_the_next_run_starts_clean(small_disk, tmp_path, capsys):
    src, out = full_size_zips(tmp_path / "zips"), small_disk("64k") / "out"
    assert script.main(["--from-dir", str(src), "--out", str(out)]) == 2  # train.txt alone is 570 kB
    assert_clean_after_disk_full(out, capsys, "train.txt")
    small_disk("4m")  # the user frees space
    assert script.main(["--from-dir", str(src), "--out", str(out)]) == 0
    for split in dl.SPLITS:
        assert (out / f"{split}.txt").read_text().splitlines() == hub_corpus()[split]


@pytest.mark.slow
def test_disk_full_in_the_hub_cache_is_one_line_then_the_next_run_starts_clean(fake_hub, small_disk, tmp_path):
    cache, out = small_disk("16k"), tmp_path / "out"
    env = {**hub_env(fake_hub, tmp_path), "HF_HUB_CACHE": str(cache)}  # train.zip is 30 kB
    result = run_cli(SCRIPT, "--out", out, env=env)
    assert_user_error(result, "disk full", "train.zip", "Hugging Face cache", str(cache))
    assert not out.exists() and not [p for p in cache.rglob("*") if p.is_file() and "blobs" in p.parts]
    small_disk("4m")
    result = run_cli(SCRIPT, "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_corpus_written(out, fake_hub.repos[("datasets", dl.REPO_ID)].commit)


# --- a tokenizer folder that has only a raw spiece.model ---------------------

@pytest.fixture(scope="module")
def spiece_model_dir(tmp_path_factory):
    """A T5 folder as older hub repos have it: config, weights and a SentencePiece model, no tokenizer.json."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration

    from dataset import SEPARATOR, read_dialogues

    d = tmp_path_factory.mktemp("spiece-t5")
    dialogues, _ = read_dialogues(SAMPLE / "train.txt")
    proto = io.BytesIO()
    # T5's ids: <pad>=0, </s>=1, <unk>=2, no <s>.
    spm.SentencePieceTrainer.train(sentence_iterator=iter([SEPARATOR.join(t) for t in dialogues]), model_writer=proto,
                                   vocab_size=300, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (d / "spiece.model").write_bytes(proto.getvalue())
    extra_ids = 100  # the <extra_id_N> sentinels T5's tokenizer adds after the pieces
    config = T5Config(vocab_size=300 + extra_ids, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **TINY_CONFIG)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(d)
    return d


def test_a_raw_spiece_model_loads_tokenizes_and_round_trips(spiece_model_dir):
    import sentencepiece as spm

    from dataset import read_dialogues
    from t5dialog import models

    assert {p.name for p in spiece_model_dir.iterdir()} == {"spiece.model", "config.json", "generation_config.json",
                                                              "model.safetensors"}
    model, tokenizer = models.load_pretrained(str(spiece_model_dir))  # needs sentencepiece and protobuf
    assert len(tokenizer) <= model.config.vocab_size
    sp = spm.SentencePieceProcessor(model_file=str(spiece_model_dir / "spiece.model"))
    turns = [t for d in read_dialogues(SAMPLE / "train.txt")[0][:20] for t in d]  # every character is in its vocabulary
    for text in turns:
        ids = tokenizer(text).input_ids
        assert ids == sp.encode(text) + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[0]])).logits
    assert logits.shape[-1] == model.config.vocab_size
