"""Faults on request, for the tests of crash safety: a kill, a signal or a full disk at a named place.

The writers (checkpoint saving, write_atomic, the training loop) call `fault` at the places a crash would hurt
most; with FAULT unset it does nothing.
"""

from __future__ import annotations

import errno
import os
import signal

SIGNALS = {"": signal.SIGKILL, "kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT,
           "hup": signal.SIGHUP, "quit": signal.SIGQUIT, "usr1": signal.SIGUSR1, "usr2": signal.SIGUSR2,
           "stop": signal.SIGSTOP}


def fault(stage: str, at):
    """Test hook: FAULT="[action:]stage@at,..." acts when ``stage`` is reached at ``at`` (a step, a file name).

    action: kill (SIGKILL, the default), term (SIGTERM), int (SIGINT), hup
    (SIGHUP), quit (SIGQUIT), usr1/usr2, stop (SIGSTOP: the process freezes there, holding what
    it holds, until killed or continued) or enospc (a write that fails as on a
    full disk). Stages: mid_step, mid_save, before_commit, before_prune (at a
    step), write (at a file name), startup@loaded (train.py's data and model are loaded) and
    finish@plotted (after the last step, loss.png drawn). Unset, this does nothing.
    """
    for item in filter(None, os.environ.get("FAULT", "").split(",")):
        where, _, when = item.partition("@")
        action, _, where = where.rpartition(":")
        if where == stage and when == str(at):
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), SIGNALS[action])
