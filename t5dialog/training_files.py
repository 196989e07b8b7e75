"""Which files a training run uses: --train-file/--val-file, the downloaded corpus or the demo sample.

corpus_download.py fetches the corpus; dataset.py reads a file into examples.

No --train-file: the full corpus in data/dailydialog (downloaded first when
the hub can be reached), else the project's demo sample, with a note saying
so. A training file without a validation file beside it gets a seeded share
of its dialogues held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from t5dialog.cli import UserError
from t5dialog.corpus_download import DEFAULT_OUT, available, download
from t5dialog.hub import HubUnreachable

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample"  # the project's own small demo dialogues


def absolute(path):
    """Paths are recorded absolute, so --resume works from any directory."""
    return str(Path(path).resolve()) if path else path


@dataclass(frozen=True)
class DataChoice:
    """The files a run trains and validates on; no validation file means a held-out share of the training file."""

    train_file: str
    val_file: str | None
    why_sample: str | None = None  # set when the demo sample stands in for the corpus

    def note(self, val_share: float, seed: int) -> str:
        """One line for the banner saying what the data is."""
        if self.why_sample:
            return (f"note: training on the project's small demo sample (data/sample; {self.why_sample}); for real results "
                    "run `python data/download.py` or train with a connection to get the full DailyDialog corpus")
        if Path(self.train_file).parent == DEFAULT_OUT:
            return "data: the full DailyDialog corpus in data/dailydialog"
        if self.val_file is None:
            return f"data: {self.train_file}, {val_share:.0%} of its dialogues held out for validation (seed {seed})"
        return f"data: {self.train_file} (validation: {self.val_file})"


def choose_data(train_file, val_file, no_download: bool, may_download: bool, log) -> DataChoice:
    """The data train.py uses for its --train-file/--val-file.

    No --train-file: the corpus in data/dailydialog, downloaded first when the
    hub answers (unless --no-download), else the demo sample. A training file
    with no validation.txt beside it gets no validation file: the run then holds
    out --val-share of its dialogues (`dataset.load_datasets`). Paths come back absolute.
    """
    why_sample = None
    if train_file is None:
        if not available(DEFAULT_OUT) and may_download and not no_download:
            try:
                download(DEFAULT_OUT, log=log)
            except HubUnreachable:
                pass  # offline: the demo sample, with the note
        base = DEFAULT_OUT if available(DEFAULT_OUT) else SAMPLE_DATA
        if base == SAMPLE_DATA:
            why_sample = "--no-download" if no_download else "the Hugging Face hub cannot be reached"
        train_file, val_file = base / "train.txt", val_file or base / "validation.txt"
    elif val_file is None:
        candidate = Path(train_file).with_name("validation.txt")
        if candidate.exists() and candidate.resolve() != Path(train_file).resolve():
            val_file = candidate
    train_file, val_file = absolute(train_file), absolute(val_file)
    if val_file == train_file:
        raise UserError(f"--val-file is the training file ({train_file}): validation would measure memorisation; "
                        "pass another --val-file, or none to hold out --val-share of the dialogues")
    return DataChoice(train_file, val_file, why_sample)
