"""Downloading the DailyDialog corpus from the Hugging Face hub: fetch, verify, extract into data/dailydialog.

training_files.py picks which files a training run uses; dataset.py reads one into examples.

Source: the Hugging Face dataset repo roskoN/dailydialog, which holds the
original files of Li et al. (IJCNLP 2017) as train.zip / validation.zip /
test.zip, each containing {split}/dialogues_{split}.txt plus the per-turn
labels dialogues_act_{split}.txt and dialogues_emotion_{split}.txt.
(yanran.li's original download is dead; script-based hub datasets no longer
load.) License: CC BY-NC-SA 4.0 -- the project downloads the corpus, it never
ships it.

Result: OUT/{train,validation,test}.txt, the dialogues_{split}.txt content
unchanged (one dialogue per line, every turn followed by __eou__), plus
OUT/download_info.json, which records source, options and checksums.

Guarantees:
- Everything is verified before anything is written: layout, dialogue counts
  (11,118 / 1,000 / 1,000), and for every dialogue as many act and emotion
  labels as turns. A failed check writes nothing.
- Each file is written under a temporary name and renamed into place; the
  old manifest is removed first and the new one written last, so a run that
  was interrupted (Ctrl-C, kill, a full disk) never looks complete: the next
  run redoes it. Data already there (manifest present) is left alone unless
  force.
- A zip from the Hugging Face cache that turns out damaged is downloaded
  again, once: neither download.py nor train.py (which has no --force) stays
  stuck on it.
- dedupe drops training dialogues that also occur in the test split, where
  "occur" means identical after whitespace normalisation (runs of whitespace
  collapsed to one space, ends stripped; case and punctuation kept).
- Every problem the user can fix is a `cli.UserError` with a one-line
  message naming the fix; `dataset.DataError` when an archive is damaged.
  `HubUnreachable` (which lets train.py fall back to its sample) only when
  there is no connection to the hub or HF_HUB_OFFLINE=1 leaves a zip out of
  reach: a hub that answers 500 or 429, or stalls, is an error naming its
  status or "timed out" (see hub.py). Fixes are named as commands that work
  from train.py too (`python data/download.py ...`).
"""

from __future__ import annotations

import json
import warnings
import zipfile
import zlib
from pathlib import Path

from t5dialog import hub
from t5dialog.cli import UserError
from t5dialog.dialogues import EOU, DataError, split_lines
from t5dialog.files import describe_os_error, is_disk_full, read_json, remove_stale_parts, sha256, write_atomic
from t5dialog.hub import HubUnreachable

REPO_ID = "roskoN/dailydialog"
# The branch, not a commit sha: the project trusts the content, which every download verifies
# (layout, dialogue counts, labels per turn) whatever commit "main" is; each run prints, and records
# in download_info.json, the commit it resolved to, and `data/download.py --revision` pins one.
REVISION = "main"
SPLITS = ("train", "validation", "test")
EXPECTED_COUNTS = {"train": 11_118, "validation": 1_000, "test": 1_000}
LICENSE = ("DailyDialog (Li et al., IJCNLP 2017) is licensed CC BY-NC-SA 4.0: "
           "non-commercial use, attribution, share-alike.")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "dailydialog"
MANIFEST = "download_info.json"
ACT_LABELS = {"1", "2", "3", "4"}
EMOTION_LABELS = {"0", "1", "2", "3", "4", "5", "6"}


# --- reading and verifying -------------------------------------------------

class DamagedArchive(DataError):
    """The zip's bytes are broken (not its content unexpected): a fresh download may mend it.

    Its message names no fix, because the fix depends on where the zip came
    from; `download` adds it (or downloads the zip again).
    """


def _member(zf: zipfile.ZipFile, basename: str, zip_path: Path) -> str:
    # Match by basename under any folder, so a different top-level folder in
    # the archive does not break us; macOS resource forks are not data.
    names = [n for n in zf.namelist()
             if n.rsplit("/", 1)[-1] == basename and not n.startswith("__MACOSX/")]
    if not names:
        raise DataError(f"{zip_path}: {basename} is missing from the archive (not DailyDialog's layout)")
    if len(names) > 1:
        raise DataError(f"{zip_path}: {basename} occurs {len(names)} times "
                        f"({', '.join(names)}); cannot tell which one to use")
    return names[0]


def read_split(zip_path: Path, split: str) -> tuple[list[str], list[str], list[str]]:
    """Return the (dialogue, act, emotion) lines of one split's zip."""
    kinds = ("", "_act", "_emotion")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [_member(zf, f"dialogues{k}_{split}.txt", zip_path) for k in kinds]
            texts = [zf.read(m).decode("utf-8") for m in members]
    except FileNotFoundError:
        raise DataError(f"{zip_path} does not exist") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DamagedArchive(f"{zip_path} is corrupted ({e})") from None
    except UnicodeDecodeError as e:
        raise DamagedArchive(f"{zip_path}: a file is not UTF-8 ({e.reason} at byte {e.start})") from None
    dialogues, acts, emotions = (split_lines(t) for t in texts)
    return dialogues, acts, emotions


def verify_split(split: str, dialogues: list[str], acts: list[str],
                 emotions: list[str], expected: int | None = None) -> None:
    """Raise DataError unless the three files form a well-formed split."""
    if not len(dialogues) == len(acts) == len(emotions):
        raise DataError(f"{split}: {len(dialogues)} dialogues but {len(acts)} act "
                        f"and {len(emotions)} emotion lines; the archive is damaged")
    if expected is not None and len(dialogues) != expected:
        raise DataError(f"{split}: {len(dialogues)} dialogues, expected {expected}; "
                        f"the archive is incomplete or a different version")
    for i, (dialogue, act, emotion) in enumerate(zip(dialogues, acts, emotions, strict=True), 1):
        turns = dialogue.count(EOU)
        if turns == 0 or dialogue.rsplit(EOU, 1)[1].strip():
            raise DataError(f"{split} dialogue {i}: a turn is not followed by {EOU}")
        act, emotion = act.split(), emotion.split()
        if len(act) != turns or len(emotion) != turns:
            raise DataError(f"{split} dialogue {i}: {turns} turns but {len(act)} act "
                            f"and {len(emotion)} emotion labels")
        if not set(act) <= ACT_LABELS or not set(emotion) <= EMOTION_LABELS:
            raise DataError(f"{split} dialogue {i}: unknown act or emotion label")


def normalise(dialogue: str) -> str:
    """The dedupe key: whitespace runs collapsed, ends stripped."""
    return " ".join(dialogue.split())


def dedupe(train: list[str], test: list[str]) -> tuple[list[str], int]:
    """Drop training dialogues that also occur in test; return (kept, dropped)."""
    in_test = {normalise(d) for d in test}
    kept = [d for d in train if normalise(d) not in in_test]
    return kept, len(train) - len(kept)


_dedupe = dedupe  # download() has a flag of the same name


# --- writing ---------------------------------------------------------------

def _cannot_write(path: Path, e: OSError) -> UserError:
    if is_disk_full(e):
        return UserError(f"{describe_os_error(e, path)}; nothing half-written was kept: free some space "
                         f"(or choose another --out) and re-run")
    return UserError(f"cannot write {path} ({describe_os_error(e)}); check that --out is writable")


def _write_outputs(out: Path, dialogues: dict[str, list[str]], manifest: dict, log) -> None:
    """The three split files, then the manifest that marks them complete."""
    path = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(out)
        (out / MANIFEST).unlink(missing_ok=True)  # the data is incomplete until rewritten
        for split in SPLITS:
            path = out / f"{split}.txt"
            write_atomic(path, (line + "\n" for line in dialogues[split]))
            log(f"  wrote {path} ({len(dialogues[split])} dialogues)")
        path = out / MANIFEST
        write_atomic(path, json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise _cannot_write(path, e) from None


# --- fetching --------------------------------------------------------------

DOWNLOAD_SCRIPT = "python data/download.py"  # named in fixes, so they work from train.py as well


def _download_one(split: str, revision: str, force: bool, offline: bool, log=print) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    where, name = f"{REPO_ID}@{revision}", f"{split}.zip"
    try:
        # A full disk is reported below, in one line, if it really happens.
        with warnings.catch_warnings(), hub.warnings_to(log):
            warnings.filterwarnings("ignore", message="Not enough free disk space", category=UserWarning)
            return Path(hf_hub_download(REPO_ID, name, repo_type="dataset", revision=revision,
                                        force_download=force and not offline, local_files_only=offline,
                                        tqdm_class=hub.progress_bars(name, log)))
    except LocalEntryNotFoundError as e:
        if offline:
            raise HubUnreachable(f"HF_HUB_OFFLINE=1 and {name} of {where} is not in the local Hugging Face "
                                 f"cache; unset HF_HUB_OFFLINE and run with internet, or pass --from-dir") from None
        raise hub.download_error(e, name, where) from None
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} does not exist in {REPO_ID}; check --revision") from None
    except RepositoryNotFoundError:
        raise UserError(f"dataset repo {REPO_ID} not found (moved or made private?); download the zips by hand "
                        f"and run `{DOWNLOAD_SCRIPT} --from-dir DIR`") from None
    except EntryNotFoundError:
        raise UserError(f"{name} not found in {where}; the repo layout changed: try another revision "
                        f"(`{DOWNLOAD_SCRIPT} --revision REV`)") from None
    except Exception as e:  # network stacks raise many types; report, don't trace
        if is_disk_full(e):
            raise UserError(f"disk full while downloading {name} into the Hugging Face cache "
                            f"{constants.HF_HUB_CACHE}; free some space there (or point HF_HUB_CACHE at "
                            f"another disk) and re-run") from None
        raise hub.download_error(e, name, where) from None


def fetch_zips(revision: str, force: bool, log=print) -> dict[str, Path]:
    """Download (or take from the HF cache) the three split zips."""
    state, words = hub.probe()
    if state == hub.UNREACHABLE:
        raise HubUnreachable(f"cannot reach {hub.endpoint()} ({words}; offline?); connect to the internet, set "
                             f"HF_HUB_OFFLINE=1 to use the local Hugging Face cache, or pass --from-dir "
                             f"with the three zips")
    if state == hub.NO_ANSWER:
        raise UserError(f"{hub.endpoint()} took the connection but then {words}; the hub or a proxy in between "
                        f"hangs: re-run later, or set HF_HUB_OFFLINE=1 to use the local Hugging Face cache")
    offline = state == hub.OFFLINE
    if not offline:
        log(f"Fetching {', '.join(f'{s}.zip' for s in SPLITS)} of {REPO_ID}@{revision} from {hub.endpoint()} "
            f"(kept in the Hugging Face cache)")
    return {split: _download_one(split, revision, force, offline, log) for split in SPLITS}


def _not_the_corpus(from_dir: Path | None) -> str:
    """The fix for a zip whose content is not the corpus this project knows."""
    if from_dir:
        return f"put the three original DailyDialog zips in {from_dir}"
    return (f"the hub's copy differs from the corpus this project knows: try another revision "
            f"(`{DOWNLOAD_SCRIPT} --revision REV`) or the original zips (`{DOWNLOAD_SCRIPT} --from-dir DIR`)")


def _verified_split(zips: dict[str, Path], split: str, revision: str, from_dir: Path | None, log) -> list[str]:
    """The split's dialogues, read and verified; a damaged copy in the Hugging Face cache is downloaded again, once.

    huggingface_hub never checks a cached file again after its download, so a
    truncated or bit-flipped one would otherwise fail every later run; this is
    also how train.py, which has no --force, gets past it.
    """
    try:
        return _read_and_verify(zips[split], split, from_dir)
    except DamagedArchive as e:
        if from_dir:
            raise DataError(f"{e}; copy an intact {split}.zip into {from_dir}") from None
        if hub.offline():
            raise DataError(f"{e}: the Hugging Face cache's copy, which HF_HUB_OFFLINE=1 forbids downloading "
                            f"again; unset HF_HUB_OFFLINE and re-run") from None
        log(f"  {split}.zip in the Hugging Face cache is damaged ({e}); downloading it again")
    zips[split] = _download_one(split, revision, force=True, offline=False, log=log)
    try:
        return _read_and_verify(zips[split], split, from_dir)
    except DamagedArchive as e:
        raise DataError(f"{e}, also as downloaded again from {REPO_ID}@{revision}: the hub's copy is damaged; "
                        f"re-run later, or get the zips elsewhere and run `{DOWNLOAD_SCRIPT} --from-dir DIR`") from None


def _read_and_verify(zip_path: Path, split: str, from_dir: Path | None) -> list[str]:
    """read_split, then verify_split; content that is not the corpus names its fix (`DamagedArchive` passes as is)."""
    try:
        dialogues, acts, emotions = read_split(zip_path, split)
        verify_split(split, dialogues, acts, emotions, EXPECTED_COUNTS.get(split))
    except DamagedArchive:
        raise
    except DataError as e:
        raise DataError(f"{e}; {_not_the_corpus(from_dir)}") from None
    return dialogues


def _commit_of(zip_path: Path) -> str | None:
    # The HF cache stores files under .../snapshots/<commit sha>/<file>.
    return zip_path.parent.name if zip_path.parent.parent.name == "snapshots" else None


# --- the whole job ---------------------------------------------------------

def _manifest(out: Path) -> dict | None:
    info = read_json(out / MANIFEST)  # {} when absent: never finished
    if not info or not all((out / f"{s}.txt").is_file() for s in SPLITS):
        return None
    return info


def available(out: Path = DEFAULT_OUT) -> bool:
    """True if out holds a complete extraction (all splits and the manifest written last)."""
    return _manifest(Path(out)) is not None


def _already_done(out: Path, wanted: dict) -> bool:
    """True if out holds a complete extraction made with the wanted options."""
    info = _manifest(out)
    if info is None:
        return False  # never finished, so (re)do it
    made = {k: info.get(k) for k in wanted}
    if made != wanted:
        raise UserError(f"{out} already holds data made with {made}, not {wanted}; "
                        f"re-run with --force to rebuild it")
    return True


def download(out: Path = DEFAULT_OUT, revision: str = REVISION, dedupe: bool = False, force: bool = False,
             from_dir: Path | None = None, log=print) -> Path:
    """Fetch (or take from from_dir), verify and extract the corpus into out; return out.

    Does nothing when out already holds it (unless force). Raises a
    `cli.UserError` (`HubUnreachable`, `dataset.DataError`, ...) for every
    problem the user can fix.
    """
    out = Path(out)
    source = f"local:{Path(from_dir).resolve()}" if from_dir else f"{REPO_ID}@{revision}"
    wanted = {"source": source, "dedupe": dedupe}
    if not force and _already_done(out, wanted):
        log(f"DailyDialog is already in {out}; nothing to do (--force to redo).")
        log(LICENSE)
        return out

    zips = {s: Path(from_dir) / f"{s}.zip" for s in SPLITS} if from_dir else fetch_zips(revision, force, log)
    commit = _commit_of(zips["train"])
    log(f"Source: {source}" + (f" (commit {commit})" if commit else ""))

    # Read and verify all splits before writing any, so a bad archive
    # leaves the output directory untouched.
    dialogues = {}
    for split in SPLITS:
        dialogues[split] = _verified_split(zips, split, revision, from_dir, log)
        log(f"  {split}: {len(dialogues[split])} dialogues verified (layout, count, act/emotion labels per turn)")

    dropped = None
    if dedupe:
        dialogues["train"], dropped = _dedupe(dialogues["train"], dialogues["test"])
        log(f"  --dedupe: dropped {dropped} training dialogues that also occur in test "
            f"(identical after whitespace normalisation)")

    manifest = {**wanted, "commit": commit, "dropped_by_dedupe": dropped,
                "counts": {s: len(d) for s, d in dialogues.items()},
                "zip_sha256": {s: sha256(z) for s, z in zips.items()},
                "license": "CC BY-NC-SA 4.0"}
    _write_outputs(out, dialogues, manifest, log)
    log(LICENSE + " It is downloaded for your use; do not redistribute it with this project.")
    return out
