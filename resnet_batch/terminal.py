"""terminal module: text from the data (image ids, labels, paths) made safe to print on a terminal."""
from __future__ import annotations

import unicodedata
from typing import Optional


def printable(text: Optional[str]) -> str:
    """Control and format characters (escape sequences, CR, LF, bidi overrides) shown as \\xNN / \\uNNNN /
    \\UNNNNNNNN escapes, so that an image_id cannot forge lines or recolour the screen; None as '-'."""
    if text is None:
        return "-"
    return "".join(ch if unicodedata.category(ch)[0] != "C" else _escape(ord(ch)) for ch in text)


def _escape(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
