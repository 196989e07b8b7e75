"""Is the Hugging Face hub there, and what went wrong when it was not? Shared by every script.

`probe` asks the hub one real HTTP question (``HEAD`` of the endpoint) with
a short timeout, through the same HTTP client and therefore the same proxy
rules as huggingface_hub (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``;
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

`failure` sorts an exception out of huggingface_hub the same way, and
`bound_waits` keeps its waits in tens of seconds: its defaults retry a hung
request for minutes before saying anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

from t5dialog.cli import UserError

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
    """Cap huggingface_hub's waits, unless the user set them (HF_HUB_DOWNLOAD_TIMEOUT, HF_HUB_ETAG_TIMEOUT).

    Without this a file whose metadata request hangs is retried five times
    with a 60 s timeout each (file_download._ETAG_RETRY_TIMEOUT): over six
    minutes of silence. The retries keep the metadata timeout instead.
    """
    from huggingface_hub import constants, file_download

    if not os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"):
        constants.HF_HUB_DOWNLOAD_TIMEOUT = DOWNLOAD_TIMEOUT_S
    if hasattr(file_download, "_ETAG_RETRY_TIMEOUT"):  # a private name: set it only where it exists
        file_download._ETAG_RETRY_TIMEOUT = constants.HF_HUB_ETAG_TIMEOUT


def _sort(e: BaseException, timeout: float | None = None) -> tuple[str, str] | None:
    """(state, words) for one exception of the HTTP stack, or None if it is none of its."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return OFFLINE, "HF_HUB_OFFLINE=1"
    if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
        return ERROR, f"the hub answered {e.response.status_code} {e.response.reason_phrase}".rstrip()
    # A connection attempt that times out is a dropped one (a firewall), so it counts as unreachable.
    if isinstance(e, httpx2.ConnectTimeout):
        return UNREACHABLE, "the connection attempt timed out"
    if isinstance(e, httpx2.ConnectError | httpx2.ProxyError):
        return UNREACHABLE, _words(e)
    if isinstance(e, httpx2.TimeoutException):
        with contextlib.suppress(RuntimeError, KeyError, TypeError):  # the request (and its timeouts) when attached
            timeout = timeout or e.request.extensions["timeout"]["read"]
        return NO_ANSWER, f"timed out (nothing received for {timeout:g} s)" if timeout else "timed out"
    if isinstance(e, httpx2.TransportError):
        return NO_ANSWER, f"the connection broke ({_words(e)})"
    return None


def _words(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


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
        found = _sort(chain)
        if found:
            return found
        chain = chain.__cause__ or chain.__context__
    return ERROR, _words(e)


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


def probe(url: str | None = None, timeout: float | None = None) -> tuple[str, str]:
    """(ANSWERED | OFFLINE | UNREACHABLE | NO_ANSWER, words): one HEAD request to the hub, bounded in time.

    Also caps huggingface_hub's own waits (`bound_waits`): every script
    probes before it downloads. Runs in a thread because name resolution
    has no timeout of its own.
    """
    import httpx2

    bound_waits()
    if offline():
        return OFFLINE, "HF_HUB_OFFLINE=1"
    timeout = probe_timeout() if timeout is None else timeout
    target = url or endpoint()
    outcome: list[tuple[str, str]] = []

    def ask() -> None:
        try:
            # trust_env (the default): the same proxy variables huggingface_hub's client obeys.
            with httpx2.Client(timeout=timeout, follow_redirects=False) as client:
                client.head(target)
            outcome.append((ANSWERED, "answered"))
        except (httpx2.InvalidURL, httpx2.UnsupportedProtocol) as e:
            outcome.append((ERROR, f"{target!r} is not an http(s) URL ({_words(e)})"))
        except Exception as e:  # reported, never raised from a thread
            outcome.append(_sort(e, timeout) or (NO_ANSWER, _words(e)))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(2 * timeout + 1)  # connecting and reading each get `timeout`; more means resolving the name hangs
    if not outcome:
        return UNREACHABLE, f"no connection within {2 * timeout + 1:g} s (the host name does not resolve in time)"
    state, words = outcome[0]
    if state == ERROR:
        raise UserError(f"HF_ENDPOINT: {words}; set it to the hub's address, e.g. https://huggingface.co")
    return state, words


def hub_reachable(url: str | None = None, timeout: float | None = None) -> bool:
    """Does the hub (or the proxy in front of it) answer an HTTP request? False offline."""
    return probe(url, timeout)[0] == ANSWERED


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
