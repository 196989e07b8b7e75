"""The chat page (page.html) filled in with what this server runs: the checkpoint, its decoding defaults, its limits.

The configuration is embedded as JSON inside a <script>; every ``<`` in it is
written as ``\\u003c``, so no checkpoint name (``a<!--<script>``) can end or
reopen the script, and JavaScript reads the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

from t5dialog.checkpoint import read_run_config
from t5dialog.modelcard import CARD

PAGE = Path(__file__).with_name("page.html")


def notice(checkpoint: Path) -> str | None:
    """Words for the page's header when the checkpoint is a demo, so that "I I I ." is not taken for a bug."""
    card = checkpoint / CARD
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if read_run_config(checkpoint).get("model") == "scratch" or "trained from scratch" in text:
        return "from-scratch demo model: expect odd replies"
    if "project-demo-sample" in text:
        return "demo model trained on the small sample: expect odd replies"
    return None


def render(checkpoint: Path, options: dict, limits: dict, max_body: int) -> bytes:
    config = {"checkpoint": checkpoint.name, "notice": notice(checkpoint), "options": options, "limits": limits,
              "max_body": max_body}
    embedded = json.dumps(config).replace("<", "\\u003c")
    return PAGE.read_text(encoding="utf-8").replace("__CONFIG__", embedded).encode()
