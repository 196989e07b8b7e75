"""Is the Hugging Face hub there, and what went wrong when it was not? Shared by every script.

`probe` asks the hub one real HTTP question (``HEAD`` of the endpoint) with
a short timeout, through huggingface_hub's own HTTP module (``huggingface_hub.utils.httpx``)
and therefore the same proxy rules (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``;
behind a proxy it is the proxy that must answer), at ``HF_ENDPOINT``, and
not at all with ``HF_HUB_OFFLINE=1``. The answer is one of:

- ANSWERED: any HTTP status. The hub is there; what a download then meets
  (a 500, a 429, a stall) is an error to report, not a reason to go offline.
- OFFLINE: ``HF_HUB_OFFLINE=1``; nothing was asked.
- UNREACHABLE: no connection: refused, no route, a name that does not
  resolve, a connection attempt nobody answers (a firewall dropping it).
  Only this and OFFLINE let a caller fall back to what it has locally.
- NO_ANSWER: connected, then nothing within the timeout (a hung hub or
  proxy), or the connection dropped: an error, never "offline".

`pin_revision` is how a model load asks instead: its first question is the
one the load needs anyway (which commit the model's revision is), and its
failure is sorted the same way. `classify` and `failure` sort an exception
out of huggingface_hub, and `bound_waits` keeps its waits for a download in
seconds rather than minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

from t5dialog.cli import UserError
from t5dialog.files import first_line

ANSWERED, OFFLINE, UNREACHABLE, NO_ANSWER, ERROR = "answered", "offline", "unreachable", "no answer", "error"

PROBE_TIMEOUT_S = 3.0  # HUB_PROBE_TIMEOUT overrides it; the real hub answers a HEAD in well under a second
# Seconds without a byte before huggingface_hub gives up on a read (HF_HUB_DOWNLOAD_TIMEOUT overrides it). It
# resumes a broken download up to 5 times, so a stalled file ends in an error after about 6 x (5 + 1) s.
DOWNLOAD_TIMEOUT_S = 5


class HubUnreachable(UserError):
    """The hub cannot be reached (or HF_HUB_OFFLINE=1) and the cache cannot stand in for it.

    Its own type so that a caller can fall back (e.g. to the project's sample
    dialogues) where a server error, a stall or a damaged archive must still stop it.
    """


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """HF_HUB_OFFLINE=1: use the local cache only, never the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def probe_timeout() -> float:
    raw = os.environ.get("HUB_PROBE_TIMEOUT", "")
    try:
        value = float(raw) if raw.strip() else PROBE_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"HUB_PROBE_TIMEOUT={raw} is not a number of seconds; unset it or set e.g. HUB_PROBE_TIMEOUT=3")
    return value


def bound_waits() -> None:
    """A download that stops sending gives up after DOWNLOAD_TIMEOUT_S, unless the user exported HF_HUB_DOWNLOAD_TIMEOUT.

    huggingface_hub reads that variable into ``constants.HF_HUB_DOWNLOAD_TIMEOUT``
    when it is imported and looks the constant up on every download, so it
    is set there (its default, 10 s, times its 6 attempts, is a minute of
    silence). HF_HUB_ETAG_TIMEOUT (its metadata requests) is the user's.
    A metadata request that fails with nothing cached is retried with a
    timeout of the library's own that no setting reaches: a hung hub is
    caught by `probe` or `pin_revision` before a download starts.
    """
    from huggingface_hub import constants

    if not os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"):
        constants.HF_HUB_DOWNLOAD_TIMEOUT = DOWNLOAD_TIMEOUT_S


def classify(e: BaseException, timeout: float | None = None) -> tuple[str, str] | None:
    """(state, words) for one exception of the HTTP stack, or None if it is none of its."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx  # huggingface_hub's HTTP module, by this name in 1.x and 2.x

    if isinstance(e, OfflineModeIsEnabled):
        return OFFLINE, "HF_HUB_OFFLINE=1"
    if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
        return ERROR, f"the hub answered {e.response.status_code} {e.response.reason_phrase}".rstrip()
    # A connection attempt that times out is a dropped one (a firewall), so it counts as unreachable.
    if isinstance(e, httpx.ConnectTimeout):
        return UNREACHABLE, "the connection attempt timed out"
    if isinstance(e, httpx.ConnectError | httpx.ProxyError):
        return UNREACHABLE, first_line(e)
    if isinstance(e, httpx.TimeoutException):
        with contextlib.suppress(RuntimeError, KeyError, TypeError):  # the request (and its timeouts) when attached
            timeout = timeout or e.request.extensions["timeout"]["read"]
        return NO_ANSWER, f"timed out (nothing received for {timeout:g} s)" if timeout else "timed out"
    if isinstance(e, httpx.TransportError):
        return NO_ANSWER, f"the connection broke ({first_line(e)})"
    return None


def failure(e: BaseException) -> tuple[str, str]:
    """What a failed huggingface_hub call met: (UNREACHABLE | NO_ANSWER | ERROR | OFFLINE, words).

    huggingface_hub wraps the network's error (LocalEntryNotFoundError "from"
    an HTTP 500, ValueError "from" a timeout), so the whole chain is read.
    Anything unknown is an ERROR: only a missing connection may pass for offline.
    """
    seen: set[int] = set()
    chain: BaseException | None = e
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        found = classify(chain)
        if found:
            return found
        chain = chain.__cause__ or chain.__context__
    return ERROR, first_line(e)


def download_error(e: BaseException, name: str, where: str) -> UserError:
    """One line for a download of ``name`` from ``where`` that failed on the way; HubUnreachable only without a connection."""
    state, words = failure(e)
    if state in (UNREACHABLE, OFFLINE):
        return HubUnreachable(f"could not download {name} from {where}: cannot reach {endpoint()} ({words}); "
                              f"check your connection")
    if state == NO_ANSWER:
        return UserError(f"downloading {name} from {where}: {words}, after huggingface_hub's retries; the hub or "
                         f"the network stalls: re-run later (the download resumes where it stopped)")
    if words.startswith("the hub answered 429"):
        return UserError(f"{words} for {name} of {where}, after huggingface_hub's retries (rate limit); "
                         f"wait a few minutes and re-run")
    if words.startswith("the hub answered"):
        return UserError(f"{words} for {name} of {where}, after huggingface_hub's retries; "
                         f"the hub has a problem on its side: re-run later")
    return UserError(f"could not download {name} from {where} ({words}); re-run later")


def within(seconds: float, call) -> tuple[object, BaseException | None] | None:
    """(what ``call()`` returned, None) or (None, what it raised); None if it has not returned within ``seconds``.

    In a thread, because some waits have no timeout of their own: resolving a
    host name, and huggingface_hub's API calls (its ``timeout=None``). A call
    still hanging is left to its daemon thread.
    """
    outcome: list[tuple[object, BaseException | None]] = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except Exception as e:  # handed to the caller, never raised in the thread
            outcome.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else None


def probe(url: str | None = None, timeout: float | None = None) -> tuple[str, str]:
    """(ANSWERED | OFFLINE | UNREACHABLE | NO_ANSWER, words): one HEAD request to the hub, bounded in time.

    Also caps huggingface_hub's own waits (`bound_waits`): every script
    probes or pins a revision before it downloads.
    """
    from huggingface_hub.utils import httpx

    bound_waits()
    if offline():
        return OFFLINE, "HF_HUB_OFFLINE=1"
    timeout = probe_timeout() if timeout is None else timeout
    target = url or endpoint()

    def ask() -> None:
        # trust_env (the default): the same proxy variables huggingface_hub's client obeys, read now.
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            client.head(target)

    wait = 2 * timeout + 1  # connecting and reading each get `timeout`; more means resolving the name hangs
    outcome = within(wait, ask)
    if outcome is None:
        return UNREACHABLE, f"no connection within {wait:g} s (the host name does not resolve in time)"
    _, e = outcome
    if e is None:
        return ANSWERED, "answered"
    if isinstance(e, httpx.InvalidURL | httpx.UnsupportedProtocol):
        raise UserError(f"HF_ENDPOINT: {target!r} is not an http(s) URL ({first_line(e)}); "
                        f"set it to the hub's address, e.g. https://huggingface.co")
    return classify(e, timeout) or (NO_ANSWER, first_line(e))


def hub_reachable(url: str | None = None, timeout: float | None = None) -> bool:
    """Does the hub (or the proxy in front of it) answer an HTTP request? False offline."""
    return probe(url, timeout)[0] == ANSWERED


def pin_revision(repo_id: str, log=print):
    """(revision, cache_only) for loading the model ``repo_id``: the question a load asks the hub first, asked once.

    huggingface_hub's ``resolve_revision`` says which commit the model's main
    branch is (or, unreachable, the one its cache recorded); passed on as
    ``revision`` it pins every later file of the load to that commit and
    spares each its own question. No answer within the probe's time, no
    connection, or HF_HUB_OFFLINE=1: (None, True), the load uses the cache.
    Any other failure (a bad name, a missing repo, a server error): (None,
    False), the load meets it again and reports it in the library's words.
    """
    from huggingface_hub import resolve_revision

    bound_waits()
    if offline():
        return None, True
    with warnings_to(log):  # "Could not reach the Hub ... Using cached commit hash": a note, not an error
        outcome = within(2 * probe_timeout() + 1, lambda: resolve_revision(repo_id))
    if outcome is None:
        return None, True
    revision, e = outcome
    if e is None:
        return revision, False
    return None, failure(e)[0] in (UNREACHABLE, NO_ANSWER, OFFLINE)


@contextlib.contextmanager
def warnings_to(log):
    """huggingface_hub's warnings (each retry: "HTTP Error 500 ...", "Retrying in 2s ...") as lines of ``log``.

    They say why a download takes long, so they are kept, but on stdout with
    the rest of the run's account: stderr is for the one-line error.
    """
    class Forward(logging.Handler):
        def emit(self, record):
            text = record.getMessage().strip()
            if text:
                log(f"  huggingface_hub: {text.splitlines()[0][:200]}")

    logger = logging.getLogger("huggingface_hub")
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [Forward()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved


def progress_bars(name: str, log=print):
    """A tqdm class for hf_hub_download: a bar on a terminal; elsewhere (a log, CI) one line per file with its size.

    Also the line where bars are switched off (HF_HUB_DISABLE_PROGRESS_BARS), so
    a slow download never runs in silence.
    """
    from huggingface_hub.utils import are_progress_bars_disabled
    from tqdm import tqdm

    class Progress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's bar group; plain tqdm rejects it
            kwargs["desc"] = name  # rather than the URL's last 40 characters (a CDN's hash)
            total, start = kwargs.get("total"), kwargs.get("initial") or 0
            if are_progress_bars_disabled() or not sys.stderr.isatty():
                size = tqdm.format_sizeof(total, "B", 1000) if total else "size unknown"
                resumed = f", resuming at {tqdm.format_sizeof(start, 'B', 1000)}" if start else ""
                log(f"  downloading {name} ({size}{resumed})")
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Progress
