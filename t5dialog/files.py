"""Files that survive crashes: the small helpers every writer shares.

A file is written under a temporary name in its own folder, flushed to disk,
then renamed over the old one, so a reader (or the next run after a kill)
sees the old file or the complete new one, never half of one. A full disk is
named as such ("disk full while writing FILE"), whatever library hit it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from t5dialog.faults import fault

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def sha256(path) -> str:
    """Streamed by hashlib, so a model of gigabytes is never read into memory at once."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path):
    """Flush a file or a folder entry to disk (so a rename after it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strict(value):
    """JSON has no NaN or Infinity: write them as null, which every parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def to_json(data, **kwargs) -> str:
    return json.dumps(strict(data), allow_nan=False, indent=2, **kwargs)


def write_atomic(path, text):
    """``path`` is afterwards the old file or all of ``text``; no ``.part`` is left, whatever stops us.

    ``text``: a string, or an iterable of strings written one after another (a large file never held whole).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for chunk in [text] if isinstance(text, str) else text:
                f.write(chunk)
            fault("write", path.name)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp creates 0600, whatever the umask
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:  # incl. KeyboardInterrupt and a full disk
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def umask() -> int:
    """The process's umask, read without changing it: ``os.umask`` can only read by setting, and a file
    another thread (a data loader, the hub client) created in between would get the wrong mode."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):  # Linux 4.7 and later
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # elsewhere: a file made in between is at worst private
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open`` gives a new file under the user's umask: 0644 under 022, 0600 under 077."""
    return 0o666 & ~umask()


def write_json_atomic(path, data):
    write_atomic(path, to_json(data) + "\n")


def read_json(path) -> dict:
    """A JSON object from ``path``; {} when the file is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def make_writable_dir(path):
    """Create ``path`` and prove a file can be written there (raises OSError)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".tmp-write-test"
    probe.write_text("ok")
    probe.unlink()


def remove_stale_parts(folder):
    """A hard kill (SIGKILL, power loss) skips write_atomic's cleanup: remove what it left."""
    for part in Path(folder).glob(".tmp-*.part"):
        with contextlib.suppress(OSError):
            part.unlink()


def is_disk_full(e: BaseException | None) -> bool:
    """Also through wrappers: the hub client, torch and safetensors carry the OSError inside their own error."""
    seen = 0
    while e is not None and seen < 10:
        text = str(e)
        if getattr(e, "errno", None) in DISK_FULL or "No space left" in text or "unexpected pos" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def describe_os_error(e: BaseException, path=None) -> str:
    """'disk full while writing FILE' rather than torch's or safetensors' own words for it."""
    name = getattr(e, "filename", None) or path
    if is_disk_full(e):
        return f"disk full while writing {name or 'a file'}"
    reason = getattr(e, "strerror", None) or first_line(e)
    return f"{name}: {reason}" if name else reason


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception in a few words: its message's first line, or its type when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
