#!/usr/bin/env python3
"""Fetch, verify and extract the DailyDialog corpus.

    python data/download.py [--out DIR] [--revision REV] [--dedupe] [--force]
                            [--from-dir DIR]

Source: the Hugging Face dataset repo roskoN/dailydialog, which holds the
original files of Li et al. (IJCNLP 2017) as train.zip / validation.zip /
test.zip, each containing {split}/dialogues_{split}.txt plus the per-turn
labels dialogues_act_{split}.txt and dialogues_emotion_{split}.txt.
(yanran.li's original download is dead; script-based hub datasets no longer
load.) License: CC BY-NC-SA 4.0 -- the project downloads the corpus, it never
ships it.

Result: DIR/{train,validation,test}.txt, the dialogues_{split}.txt content
unchanged (one dialogue per line, every turn followed by __eou__), plus
DIR/download_info.json, which records source, options and checksums.

Guarantees:
- Everything is verified before anything is written: layout, dialogue counts
  (11,118 / 1,000 / 1,000), and for every dialogue as many act and emotion
  labels as turns. A failed check writes nothing.
- Each file is written under a temporary name and renamed into place; the
  manifest is written last, so a run that was interrupted is redone by the
  next run, and data already there (manifest present) is left alone unless
  --force.
- --dedupe drops training dialogues that also occur in the test split, where
  "occur" means identical after whitespace normalisation (runs of whitespace
  collapsed to one space, ends stripped; case and punctuation kept).
- Offline or hub unreachable: one line on stderr, exit code 2. With
  HF_HUB_OFFLINE=1 only the local Hugging Face cache is used.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

REPO_ID = "roskoN/dailydialog"
# Should be pinned to a commit sha of roskoN/dailydialog once verified: every
# run prints (and records in download_info.json) the commit "main" resolved to.
REVISION = "main"
SPLITS = ("train", "validation", "test")
EXPECTED_COUNTS = {"train": 11_118, "validation": 1_000, "test": 1_000}
LICENSE = ("DailyDialog (Li et al., IJCNLP 2017) is licensed CC BY-NC-SA 4.0: "
           "non-commercial use, attribution, share-alike.")
DEFAULT_OUT = Path(__file__).resolve().parent / "dailydialog"
MANIFEST = "download_info.json"
EOU = "__eou__"
ACT_LABELS = {"1", "2", "3", "4"}
EMOTION_LABELS = {"0", "1", "2", "3", "4", "5", "6"}
PROBE_TIMEOUT_S = 3.0


class DataError(Exception):
    """A problem the user has to fix; main() prints it as one line, exit 2."""


# --- reading and verifying -------------------------------------------------

def _member(zf: zipfile.ZipFile, basename: str, zip_path: Path) -> str:
    # Match by basename under any folder, so a different top-level folder in
    # the archive does not break us; macOS resource forks are not data.
    names = [n for n in zf.namelist()
             if n.rsplit("/", 1)[-1] == basename and not n.startswith("__MACOSX/")]
    if not names:
        raise DataError(f"{zip_path}: {basename} is missing from the archive "
                        f"(unexpected layout); re-download it with --force")
    if len(names) > 1:
        raise DataError(f"{zip_path}: {basename} occurs {len(names)} times "
                        f"({', '.join(names)}); cannot tell which one to use")
    return names[0]


def _lines(text: str) -> list[str]:
    # Split on "\n" only: str.splitlines() would also split on characters
    # such as U+2028 that may occur inside a dialogue.
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


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
        raise DataError(f"{zip_path} is corrupted ({e}); "
                        f"re-download it with --force") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{zip_path}: a file is not UTF-8 ({e.reason} at byte "
                        f"{e.start}); re-download it with --force") from None
    dialogues, acts, emotions = (_lines(t) for t in texts)
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
    for i, (dialogue, act, emotion) in enumerate(zip(dialogues, acts, emotions), 1):
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


# --- writing ---------------------------------------------------------------

def write_atomic(path: Path, lines) -> None:
    """Write lines to path via a temporary file in the same directory and a
    rename, so path is either absent, the old file, or the complete new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:  # incl. KeyboardInterrupt: never leave the .part
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_stale_parts(out: Path) -> None:
    # A hard kill (SIGKILL, power loss) skips write_atomic's cleanup.
    for part in out.glob(".*.part"):
        with contextlib.suppress(OSError):
            part.unlink()


# --- fetching --------------------------------------------------------------

def hub_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub (or the HTTPS proxy) quickly?

    huggingface_hub retries for about a minute when the network is down; this
    probe lets us fail in seconds instead. It runs in a thread because name
    resolution has no timeout of its own.
    """
    hub = urlparse(endpoint)
    proxy = None if proxy_bypass(hub.hostname or "") else getproxies().get(hub.scheme)
    url = urlparse(proxy) if proxy else hub
    if not url.hostname:
        return True  # cannot tell; let huggingface_hub try
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError, ValueError):
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def fetch_zips(revision: str, force: bool) -> dict[str, Path]:
    """Download (or take from the HF cache) the three split zips."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE
    where = f"{REPO_ID}@{revision}"
    if not offline and not hub_reachable(constants.ENDPOINT):
        raise DataError(f"cannot reach {constants.ENDPOINT} (offline?); connect to the "
                        f"internet, set HF_HUB_OFFLINE=1 to use the local Hugging Face "
                        f"cache, or pass --from-dir with the three zips")
    zips = {}
    for split in SPLITS:
        try:
            zips[split] = Path(hf_hub_download(
                REPO_ID, f"{split}.zip", repo_type="dataset", revision=revision,
                force_download=force and not offline, local_files_only=offline))
        except LocalEntryNotFoundError as e:
            if offline:
                raise DataError(f"HF_HUB_OFFLINE=1 and {split}.zip of {where} is not in "
                                f"the local Hugging Face cache; unset HF_HUB_OFFLINE and "
                                f"run with internet, or pass --from-dir") from None
            raise DataError(f"could not download {split}.zip from {where} "
                            f"({_first_line(e)}); check your connection") from None
        except RevisionNotFoundError:
            raise DataError(f"revision {revision!r} does not exist in {REPO_ID}; "
                            f"check --revision") from None
        except RepositoryNotFoundError:
            raise DataError(f"dataset repo {REPO_ID} not found (moved or made private?); "
                            f"download the zips by hand and pass --from-dir") from None
        except EntryNotFoundError:
            raise DataError(f"{split}.zip not found in {where}; the repo layout changed, "
                            f"try another --revision") from None
        except Exception as e:  # network stacks raise many types; report, don't trace
            raise DataError(f"could not download {split}.zip from {where} "
                            f"({_first_line(e)}); check your connection and retry") from None
    return zips


def _commit_of(zip_path: Path) -> str | None:
    # The HF cache stores files under .../snapshots/<commit sha>/<file>.
    return zip_path.parent.name if zip_path.parent.parent.name == "snapshots" else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # the zips are ~2 MB


# --- command line ----------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Download DailyDialog (roskoN/dailydialog on the Hugging Face hub), "
                    "verify it and extract {train,validation,test}.txt. " + LICENSE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory (default: %(default)s)")
    p.add_argument("--revision", default=REVISION,
                   help="revision of the dataset repo (default: %(default)s)")
    p.add_argument("--dedupe", action="store_true",
                   help="drop training dialogues that also occur in the test split "
                        "(identical after whitespace normalisation)")
    p.add_argument("--force", action="store_true",
                   help="re-download and rewrite even if the data is already there")
    p.add_argument("--from-dir", type=Path, metavar="DIR",
                   help="use train.zip, validation.zip and test.zip from DIR instead of "
                        "the hub (e.g. copied to a machine without internet)")
    return p.parse_args(argv)


def _already_done(out: Path, wanted: dict) -> bool:
    """True if out holds a complete extraction made with the wanted options."""
    try:
        info = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no manifest: never finished, so (re)do it
    if not all((out / f"{s}.txt").is_file() for s in SPLITS):
        return False
    made = {k: info.get(k) for k in wanted}
    if made != wanted:
        raise DataError(f"{out} already holds data made with {made}, not {wanted}; "
                        f"re-run with --force to rebuild it")
    return True


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    source = (f"local:{args.from_dir.resolve()}" if args.from_dir
              else f"{REPO_ID}@{args.revision}")
    wanted = {"source": source, "dedupe": args.dedupe}
    if not args.force and _already_done(out, wanted):
        print(f"DailyDialog is already in {out}; nothing to do (--force to redo).")
        print(LICENSE)
        return 0

    if args.from_dir:
        zips = {s: args.from_dir / f"{s}.zip" for s in SPLITS}
    else:
        zips = fetch_zips(args.revision, args.force)
    commit = _commit_of(zips["train"])
    print(f"Source: {source}" + (f" (commit {commit})" if commit else ""))

    # Read and verify all splits before writing any, so a bad archive
    # leaves the output directory untouched.
    dialogues = {}
    for split in SPLITS:
        lines, acts, emotions = read_split(zips[split], split)
        verify_split(split, lines, acts, emotions, EXPECTED_COUNTS.get(split))
        dialogues[split] = lines
        print(f"  {split}: {len(lines)} dialogues verified "
              f"(layout, count, act/emotion labels per turn)")

    dropped = None
    if args.dedupe:
        dialogues["train"], dropped = dedupe(dialogues["train"], dialogues["test"])
        print(f"  --dedupe: dropped {dropped} training dialogues that also occur in "
              f"test (identical after whitespace normalisation)")

    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(out)
    (out / MANIFEST).unlink(missing_ok=True)  # the data is incomplete until rewritten
    for split in SPLITS:
        write_atomic(out / f"{split}.txt", dialogues[split])
        print(f"  wrote {out / f'{split}.txt'} ({len(dialogues[split])} dialogues)")
    manifest = {**wanted, "commit": commit, "dropped_by_dedupe": dropped,
                "counts": {s: len(d) for s, d in dialogues.items()},
                "zip_sha256": {s: _sha256(z) for s, z in zips.items()},
                "license": "CC BY-NC-SA 4.0"}
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).splitlines())
    print(LICENSE + " It is downloaded for your use; do not redistribute it "
          "with this project.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # e.g. --out not writable
        print(f"error: {_first_line(e)}; check that --out is writable", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; no half-written file was left, re-run to finish",
              file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
