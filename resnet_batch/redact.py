"""redact module: no secret in what the job records or prints (URIs, storage options, messages).

Two rules, used everywhere something user-supplied is written down:
- `safe_uri`: the form of a URI that may be recorded (provenance, reports, manifests): no userinfo,
  query or fragment. A pre-signed URL's token lives in its query; identity comes from the sha256.
- `redact_text` / `redact_value` / `redact_options`: mask secrets, found by the name they are stored
  under (`secret`, `token`, `Authorization`, `AccountKey`...) or by their shape (`user:pass@` in a URL,
  `name=value` pairs with a secret name as in query strings and connection strings, `Bearer ...`).
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# A name holds a secret when it contains one of these (any case) ...
_SECRET_PARTS = ("secret", "token", "password", "passwd", "credential", "signature", "session", "auth", "cookie",
                 "key", "connection_string", "connectionstring")
# ... or is one of these short names, too short to look for inside other names.
_SECRET_NAMES = ("sig", "pwd", "pw", "pass")

# (lengths are bounded so that a long run of name characters costs linear time, not quadratic)
_NAME = r"(?:[\w.-]{0,64}(?:" + "|".join(_SECRET_PARTS) + r")[\w.-]{0,64}|" + "|".join(_SECRET_NAMES) + ")"
_USERINFO = r"[^\s@/:'\"]{1,256}:[^\s@'\"]{0,1024}@"  # user:password@, the password may hold "/" (AWS secrets do)
_PATTERNS = (
    # scheme://user:pass/word@host -> scheme://***@host
    (re.compile(r"\b([a-z][a-z0-9+.-]{0,31}://)" + _USERINFO, re.IGNORECASE), r"\1" + MASK + "@"),
    # scheme://user@host -> scheme://***@host
    (re.compile(r"\b([a-z][a-z0-9+.-]{0,31}://)[^/\s@'\"]+@", re.IGNORECASE), r"\1" + MASK + "@"),
    # name%3Dvalue: a secret pair inside a percent-encoded URL (up to the next encoded or plain separator)
    (re.compile(r"(?<![\w.-])(" + _NAME + r")%3D(?:%(?!26|3B)[0-9A-F]{2}|[^;&\s'\",%])*", re.IGNORECASE),
     r"\1%3D" + MASK),
    # name=value with a secret name: query strings, connection strings, AWS4 Authorization headers
    (re.compile(r"(?<![\w.-])(" + _NAME + r")=[^;&\s'\",]*", re.IGNORECASE), r"\1=" + MASK),
    # name = value, name: value (YAML, logs) when the value looks like a credential (a digit or a symbol in
    # it, or 12 characters or more), so that prose ("ExpiredToken: the token has expired") stays as it is
    (re.compile(r"(?<![\w.-])(" + _NAME + r")(\s{1,8}=\s{0,8}|=\s{1,8}|:[ \t]{1,8})"
                r"(?!(?:Bearer|Basic|Digest|Negotiate|NTLM)\b)(?=[^;&\s'\",]{0,1024}[\d/+=_.-]|[^;&\s'\",]{12})"
                r"[^;&\s'\",]+", re.IGNORECASE), r"\1\2" + MASK),
    # 'name': 'value' (a dict or JSON inside a message)
    (re.compile(r"(['\"])(" + _NAME + r")\1(\s*:\s*)(['\"]).*?(?<!\\)\4", re.IGNORECASE),
     r"\1\2\1\3\4" + MASK + r"\4"),
    # HTTP authorization schemes followed by their credentials
    (re.compile(r"\b(Bearer|Basic|Digest|Negotiate|NTLM)\s+[\w.~+/=-]+", re.IGNORECASE), r"\1 " + MASK),
)


def is_secret_name(name: str) -> bool:
    """Whether a key or parameter named `name` holds a secret (`secret`, `X-Amz-Security-Token`, `AccountKey`...)."""
    low = str(name).lower()
    return low in _SECRET_NAMES or any(part in low for part in _SECRET_PARTS)


def redact_text(text: str) -> str:
    """`text` with every secret it visibly carries masked; the rest (hosts, paths, names) kept for the reader."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """A value with secrets masked: strings by their shape, dicts also by key name, lists and tuples item by item."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return redact_options(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def redact_options(options: dict) -> dict:
    """Storage options (or any mapping) for logs and reports: a value stored under a secret-looking key is masked
    whole; every other value is redacted by its shape, recursing into nested dicts and lists (client_kwargs...)."""
    return {k: MASK if is_secret_name(k) else redact_value(v) for k, v in options.items()}


def safe_uri(uri: str) -> str:
    """The URI without userinfo, query and fragment (each part of an fsspec `a::b` chain); a plain path as it is,
    with any secret-looking `name=value` in it masked."""
    return "::".join(_safe_one(part) for part in str(uri).split("::"))


def _safe_one(uri: str) -> str:
    if "://" not in uri:
        return redact_text(uri)
    # user:pass@ whose password holds "/" is not userinfo to urlsplit (the "/" starts its path): cut it first
    uri = re.sub(r"^([a-z][a-z0-9+.-]{0,31}://)" + _USERINFO, r"\1", uri, flags=re.IGNORECASE)
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
