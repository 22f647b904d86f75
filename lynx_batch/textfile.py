"""Read a user's text file whatever editor saved it: UTF-8, UTF-8 with BOM, or UTF-16/32 with BOM.

Windows tools save "Unicode" text as UTF-16 with a byte-order mark and Excel's plain "CSV" as the
ANSI code page; the first is read as is, the second cannot be told apart from other 8-bit code
pages, so it is refused with the position of the first bad byte and how to save the file as UTF-8.
"""
import codecs
from pathlib import Path

from .errors import QueueError

# Longest BOM first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
SAVE_AS_UTF8 = ("save it as UTF-8 (Notepad: File > Save as > Encoding: UTF-8; Excel: Save as > "
                "'CSV UTF-8 (Comma delimited)')")


def read_text(path: Path, flag: str) -> str:
    """The file's text; a clear QueueError naming ``flag``, the file and the bad byte otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QueueError(f"{flag}: cannot read {path} ({e.strerror or e})") from None
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start:e.start + 1].hex()
        hint = ""
        if encoding == "utf-8" and b"\x00" in data[:200]:
            hint = " (it looks like UTF-16 without a byte-order mark)"
        name = {"utf-8-sig": "UTF-8", "utf-16": "UTF-16", "utf-32": "UTF-32"}.get(encoding, "UTF-8")
        raise QueueError(f"{flag}: {path} is not valid {name} text{hint}: byte 0x{bad} at byte {e.start} "
                         f"(line {line}, column {column}); {SAVE_AS_UTF8}") from None
