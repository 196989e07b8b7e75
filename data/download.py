#!/usr/bin/env python3
"""Fetch, verify and extract the DailyDialog corpus (see t5dialog/corpus_download.py for what is checked).

    python data/download.py [--out DIR] [--revision REV] [--dedupe] [--force]
                            [--from-dir DIR]

Writes DIR/{train,validation,test}.txt and DIR/download_info.json. Offline,
hub unreachable, a hub that answers an error (500, 429...) or stalls, a
damaged archive or a full disk: one line on stderr, exit code 2, nothing
half-written left (a zip found damaged in the Hugging Face cache is first
downloaded again, once). With HF_HUB_OFFLINE=1 only the local Hugging Face
cache is used. Progress: a bar per file on a terminal, else a line per file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from t5dialog import corpus_download  # noqa: E402
from t5dialog.cli import OneLineParser, run_script  # noqa: E402


def build_parser():
    p = OneLineParser(prog="download.py",
                      description="Download DailyDialog (roskoN/dailydialog on the Hugging Face hub), verify it "
                                  "and extract {train,validation,test}.txt. " + corpus_download.LICENSE)
    p.add_argument("--out", type=Path, default=corpus_download.DEFAULT_OUT, help="output directory")
    p.add_argument("--revision", default=corpus_download.REVISION, help="revision of the dataset repo")
    p.add_argument("--dedupe", action="store_true",
                   help="drop training dialogues that also occur in the test split "
                        "(identical after whitespace normalisation)")
    p.add_argument("--force", action="store_true",
                   help="re-download and rewrite even if the data is already there")
    p.add_argument("--from-dir", type=Path, metavar="DIR",
                   help="use train.zip, validation.zip and test.zip from DIR instead of "
                        "the hub (e.g. copied to a machine without internet)")
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    corpus_download.download(args.out, revision=args.revision, dedupe=args.dedupe, force=args.force, from_dir=args.from_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script("download.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
