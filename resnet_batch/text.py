"""text module: untrusted strings (image ids, paths, URIs, messages) made safe to print on a terminal.

An image id is a file name someone else chose: raw, it can carry terminal escapes that recolour or
rewrite the summary, carriage returns and newlines that forge lines, bidi overrides that show a name
reversed, and bytes that are not UTF-8. `printable` escapes all of that and nothing else, so
`café/写真.jpg` stays readable. Its output holds no character it would escape, so applying it again (a
message built from an already printable id) changes nothing.
"""
from __future__ import annotations

import unicodedata
from typing import Optional

# Unicode categories never printed as they are: controls (C0, DEL, C1: ESC starts every ANSI sequence),
# format characters (bidi overrides and isolates, zero-width characters), surrogates, line/paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: Optional[str]) -> str:
    """`text` with control, format and separator characters escaped Python-style (`\\x1b`, `\\u202e`, `\\n`);
    None (a missing label) as '-'.

    Undecodable bytes of a name (Python's surrogateescape, U+DC80-U+DCFF) show as the byte they were: `\\xff`.
    """
    if text is None:
        return "-"
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if unicodedata.category(ch) not in _ESCAPED_CATEGORIES:
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, smuggled through surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
