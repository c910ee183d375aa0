"""HTTP health probe of node 0's server (``GET http://IP:PORT/health`` answers 200)."""

from __future__ import annotations

import urllib.error
import urllib.request

__all__ = ["probe", "base_url"]


def probe(url: str, timeout_s: float = 2.0) -> bool:
    """``True`` when ``GET url`` answers HTTP 200 within ``timeout_s``; never raises."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # node IPs: never via a proxy
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def base_url(health_url: str) -> str:
    """``http://IP:PORT`` from ``http://IP:PORT/health`` (the URL clients use)."""
    return health_url[: -len("/health")] if health_url.endswith("/health") else health_url
