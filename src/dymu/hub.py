"""Whether the Hugging Face Hub can be reached: what model and thresholds loading ask before they try it."""

from __future__ import annotations

import functools
import os
import socket


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> str | None:
    """None when the Hugging Face Hub can be reached, else why not. Checked once per process (at most
    ~2 s); when it cannot be reached, huggingface_hub is switched to offline mode, so every later
    load reads the cache at once instead of retrying the connection (a ~30 s retry storm per file)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe says nothing: let huggingface_hub try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=2).close()
        return None
    except OSError as err:
        constants.HF_HUB_OFFLINE = True
        return f"no connection to {url.hostname}: {err.strerror or err}"
