"""redact module: URIs and options made safe to print and store (no userinfo, query or fragment)."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def safe_uri(uri: str) -> str:
    """The URI without userinfo, query and fragment (a pre-signed URL's token, ftp://user:pass@...)."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
