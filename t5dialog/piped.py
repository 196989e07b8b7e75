"""Lines read from a pipe in batches: as many as are already there, up to a limit.

`echo lines | python infer.py` answers a batch of lines with one `generate`
call (about 5x faster per line than one call each on a CPU), yet a line
typed into a pipe that stays open must be answered at once, not after 31
more. So a batch takes whatever lines have arrived and waits only a few
milliseconds for more before it goes.
"""

from __future__ import annotations

import os
import re
import select

BATCH = 32  # lines per generate call; what the 5x above was measured with
WAIT_S = 0.005  # how long a started batch waits for the next line to arrive
LINE_END = re.compile(rb"\r\n|\r|\n")  # what dialogues.split_lines takes in a data file: old Macs end lines with a CR


def line_batches(fd: int, size: int = BATCH, wait: float = WAIT_S, chunk: int = 1 << 16):
    """Yield lists of lines (bytes, line end dropped) read from file descriptor ``fd``, in order.

    A line ends with LF, CRLF or a CR alone. The first line of a batch is
    waited for as long as it takes; later ones only if they arrive within
    ``wait`` seconds. The last line may lack its line end. Reading ``fd``
    directly (not through ``sys.stdin``'s buffer) is what lets `select` tell
    whether more input is already there.
    """
    buffer, batch, eof = b"", [], False
    # A CR that ended the input so far ends its line at once (a prompt typed into an open pipe is answered);
    # when the next read starts with an LF, that LF was the rest of a CRLF and ends no second line.
    after_cr = False
    while True:
        if after_cr and buffer:
            buffer, after_cr = buffer[buffer.startswith(b"\n"):], False
        start = 0
        while len(batch) < size and (end := LINE_END.search(buffer, start)):
            batch.append(buffer[start:end.start()])
            start = end.end()
            after_cr = end.group() == b"\r" and start == len(buffer)
        buffer = buffer[start:]
        if eof and buffer and len(batch) < size:  # a last line without its line end
            batch.append(buffer)
            buffer = b""
        if batch and (len(batch) >= size or eof or not select.select([fd], [], [], wait)[0]):
            yield batch
            batch = []
            continue
        if eof:
            return
        data = os.read(fd, chunk)  # blocks only when no batch has started
        eof = not data
        buffer += data
