"""text module: strings made safe to print (control characters and terminal escapes shown, not obeyed)."""
from __future__ import annotations


def printable(text: str) -> str:
    """Control characters (C0, C1, DEL), bidi overrides and lone surrogates as escapes; other text unchanged."""
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o < 0xA0 or 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069 \
                or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)
