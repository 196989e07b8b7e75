"""Is the Hugging Face hub there? One quick answer, shared by every script.

The hub client retries for about a minute when the network is down; this
probe answers in seconds. It honours what the client honours: ``HF_HUB_OFFLINE``
(offline, no probe), ``HF_ENDPOINT`` (another hub or a mirror) and the standard
proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``): behind a proxy
it is the proxy that must answer, since a direct connection would fail there.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

PROBE_TIMEOUT_S = 3.0


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """HF_HUB_OFFLINE=1: use the local cache only, never the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub (or to the proxy in front of it)?

    Runs in a thread because name resolution has no timeout of its own.
    """
    if offline():
        return False
    hub = urlparse(url or endpoint())
    proxy = None if proxy_bypass(hub.hostname or "") else getproxies().get(hub.scheme)
    target = urlparse(proxy if "://" in (proxy or "://") else f"http://{proxy}") if proxy else hub
    if not target.hostname:
        return True  # cannot tell; let huggingface_hub try
    port = target.port or (443 if target.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError, ValueError):
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            ok.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)
