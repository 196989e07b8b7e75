"""Lines read from a pipe in batches: as many as are already there, up to a limit.

`echo lines | python infer.py` answers a batch of lines with one `generate`
call (about 5x faster per line than one call each on a CPU), yet a line
typed into a pipe that stays open must be answered at once, not after 31
more. So a batch takes whatever lines have arrived and waits only a few
milliseconds for more before it goes.
"""

from __future__ import annotations

import os
import select

BATCH = 32  # lines per generate call; what the 5x above was measured with
WAIT_S = 0.005  # how long a started batch waits for the next line to arrive


def line_batches(fd: int, size: int = BATCH, wait: float = WAIT_S, chunk: int = 1 << 16):
    """Yield lists of lines (bytes, newline dropped) read from file descriptor ``fd``, in order.

    The first line of a batch is waited for as long as it takes; later ones
    only if they arrive within ``wait`` seconds. The last line may lack its
    newline. Reading ``fd`` directly (not through ``sys.stdin``'s buffer)
    is what lets `select` tell whether more input is already there.
    """
    buffer, batch, eof = b"", [], False
    while True:
        while len(batch) < size and (cut := buffer.find(b"\n")) >= 0:
            batch.append(buffer[:cut])
            buffer = buffer[cut + 1:]
        if eof and buffer and len(batch) < size:  # a last line without its newline
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
