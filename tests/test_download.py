"""Tests for corpus.py and its CLI data/download.py. No test touches the real
hub: the extraction and verification run on small zips built here in the
corpus' layout, the offline path runs the real CLI with the hub made
unreachable, and the download path runs it against a stand-in hub
(tests/hub_server.py)."""
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import corpus as dl

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


def labels(dialogue, label="1"):
    return " ".join([label] * dialogue.count("__eou__")) + " "


def make_zip(path, split, dialogues=None, acts=None, emotions=None,
             folder=None, omit=None):
    """Build {split}.zip like the corpus: {folder}/dialogues{,_act,_emotion}_{split}.txt."""
    dialogues = DIALOGUES[split] if dialogues is None else dialogues
    files = {
        f"dialogues_{split}.txt": dialogues,
        f"dialogues_act_{split}.txt": acts or [labels(d, "2") for d in dialogues],
        f"dialogues_emotion_{split}.txt": emotions or [labels(d, "0") for d in dialogues],
    }
    folder = split if folder is None else folder
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, lines in files.items():
            if name != omit:
                zf.writestr(f"{folder}/{name}" if folder else name, "\n".join(lines) + "\n")
    return path


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
    dl.write_atomic(target, ["a __eou__ ", "b __eou__ "])
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
