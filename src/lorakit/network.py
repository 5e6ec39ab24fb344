"""Is the Hugging Face Hub reachable? A quick answer, so nothing waits on a missing network.

`hub_reachable()` says no at once when `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set, and
otherwise tries one TCP connection to the hub (or to `HF_ENDPOINT`'s host) within `timeout`
seconds, name lookup included. Data and model loaders raise `OfflineError` when it says no.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


class OfflineError(RuntimeError):
    """Something needs the Hugging Face Hub and the hub cannot be reached."""


def offline_by_environment() -> bool:
    """True when an HF offline variable is set to a truthy value (1, true, yes, on)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUTHY for name in OFFLINE_VARIABLES)


def _hub_address() -> tuple[str, int]:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    default_port = 80 if endpoint.scheme == "http" else 443
    return endpoint.hostname or "huggingface.co", endpoint.port or default_port


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when a TCP connection to the hub opens within `timeout` seconds."""
    if offline_by_environment():
        return False
    reached = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection(_hub_address(), timeout=timeout):
                reached.set()
        except OSError:
            pass

    # A thread bounds the whole attempt: create_connection's timeout does not cover DNS lookup.
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout)
    return reached.is_set()
