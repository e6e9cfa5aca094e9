"""printable(): image ids and other untrusted names cannot drive the terminal, and stay readable."""
import os

import pytest

from resnet_batch.text import printable


@pytest.mark.parametrize("raw,shown", [
    ("shard-000/astronaut-00001.jpg", "shard-000/astronaut-00001.jpg"),
    ("photos/café/写真 1.jpg", "photos/café/写真 1.jpg"),  # ordinary non-ASCII and spaces stay as they are
    ("Ελλάδα/Москва/😀.png", "Ελλάδα/Москва/😀.png"),
    ("a\x1b[2K\x1b[1Aresnet-batch: complete.jpg", "a\\x1b[2K\\x1b[1Aresnet-batch: complete.jpg"),  # ANSI: erase, up
    ("x.jpg\r  images: 0 ok, 0 failed", "x.jpg\\r  images: 0 ok, 0 failed"),  # overwrite the line
    ("x.jpg\nerror: forged", "x.jpg\\nerror: forged"),
    ("tab\there\x00nul\x7fdel", "tab\\there\\x00nul\\x7fdel"),
    ("c1-\x85-\x9b31m", "c1-\\x85-\\x9b31m"),  # C1: NEL, and CSI (the one-byte ANSI introducer)
    ("invoice-\u202egpj.exe", "invoice-\\u202egpj.exe"),  # right-to-left override: would show "exe.jpg"
    ("\u2066isolate\u2069 \u200bzero\u200dwidth \ufeffbom", "\\u2066isolate\\u2069 \\u200bzero\\u200dwidth \\ufeffbom"),
    ("line\u2028separator\u2029para", "line\\u2028separator\\u2029para"),
])
def test_printable_escapes_what_can_drive_a_terminal_and_nothing_else(raw, shown):
    assert printable(raw) == shown
    assert printable(shown) == shown  # already printable: unchanged, so layers may each apply it


def test_a_name_that_is_not_utf8_shows_its_bytes():
    name = os.fsdecode(b"caf\xe9-\xff.jpg")  # a Latin-1 name as Python decodes it from the file system
    assert name == "caf\udce9-\udcff.jpg"
    assert printable(name) == "caf\\xe9-\\xff.jpg"
    printable(name).encode("utf-8")  # no surrogate left: the result can always be written out


def test_printable_output_holds_no_control_or_format_character():
    import unicodedata

    everything = "".join(chr(c) for c in range(0x3000)) + "".join(chr(c) for c in range(0xD800, 0xE000))
    shown = printable(everything)
    assert not [ch for ch in shown if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
