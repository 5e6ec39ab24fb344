"""Reading bytes as UTF-8 text: bad bytes are replaced (U+FFFD), counted and warned about once."""

from __future__ import annotations

import codecs
from pathlib import Path

from lorakit.data.errors import DataError, warn

_REPLACEMENT = "\ufffd".encode()


def decode(raw: bytes, fallback: str | None = None) -> tuple[str, int]:
    """The text and how many invalid UTF-8 sequences were replaced (a BOM is dropped).

    With `fallback` (e.g. "cp1252"), bytes that are not valid UTF-8 are read in that encoding.
    Bytes that start with a UTF-16 BOM (Excel's "Unicode Text", Windows PowerShell's `>`) are
    read as UTF-16.
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16", errors="replace")
        return text, text.count("\ufffd")
    if fallback is not None:
        try:
            return raw.decode("utf-8-sig"), 0
        except UnicodeDecodeError:
            return raw.decode(fallback, errors="replace"), 0
    text = raw.decode("utf-8-sig", errors="replace")
    return text, text.count("\ufffd") - raw.count(_REPLACEMENT)


def read_bytes(path: Path) -> bytes:
    """A file's bytes, or a DataError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"File not found: {path}. Check the path.") from None
    except OSError as error:
        raise DataError(f"Cannot read {path}: {error.strerror or error}.") from None


def warn_replaced(source: str, replaced: int, files: int = 1) -> None:
    """One warning for all the bytes replaced while reading a source (none when zero)."""
    if replaced:
        where = f" in {files} file(s)" if files > 1 else ""
        warn(
            f"{source}: {replaced} invalid UTF-8 byte sequence(s){where} were replaced with "
            "U+FFFD; save the file as UTF-8 to keep those characters."
        )


def read_text_folder(folder: Path, fallback: str | None = None) -> tuple[list[str], int, int]:
    """The `*.txt` files of a folder in sorted name order: texts, bytes replaced, files affected."""
    texts, replaced, files = [], 0, 0
    for path in sorted(folder.glob("*.txt")):
        text, bad = decode(read_bytes(path), fallback)
        texts.append(text)
        replaced += bad
        files += bool(bad)
    return texts, replaced, files
