"""Text from outside - command-line arguments, text files, stdin, HTTP bodies - is checked here, once, at
the boundary: it must be valid Unicode that encodes as UTF-8, or the user gets one clear error naming where.

Why a str can be invalid: on POSIX, Python decodes command-line bytes that are not UTF-8 with
`surrogateescape`, so byte 0xff arrives as the lone surrogate U+DCFF; JSON may spell a lone surrogate as
"\\ud800". Either would reach the tokenizer (which cannot encode it) or a JSON answer and fail there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from dimec.errors import DataError

UTF8_HINT = "give UTF-8 text (re-save the file as UTF-8, or check the terminal's encoding)"


def text_problem(text: str, escaped_bytes: bool = False) -> str | None:
    """What is wrong with `text` ("is not valid UTF-8 ..."), or None when it is fine.

    `escaped_bytes`: the text was decoded with surrogateescape (command-line arguments), so U+DC80..U+DCFF
    stand for bytes that were not UTF-8, and are reported as such.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if escaped_bytes and 0xDC80 <= code <= 0xDCFF:
            return f"is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {exc.start})"
        return f"holds a lone surrogate (U+{code:04X} at character {exc.start}), which is not valid Unicode text"
    return None


def check_text(text: str, where: str, escaped_bytes: bool = False) -> str:
    """`text` itself, or a DataError saying `where` it is not valid text."""
    problem = text_problem(text, escaped_bytes)
    if problem:
        raise DataError(f"{where} {problem}", UTF8_HINT)
    return text


def check_args(texts: Iterable[str]) -> list[str]:
    """Texts given as command-line arguments ("text 1", "text 2", ... in messages)."""
    return [check_text(t, f"text {i}", escaped_bytes=True) for i, t in enumerate(texts, start=1)]


def decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    """Strict UTF-8 (a leading byte-order mark is dropped); an error names the line (`first_line` is the
    number of data's first line) and the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise DataError(f"{where}:{line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                        UTF8_HINT) from None


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one text per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}", "give a text file with one text per line")
    return [line for line in decode_utf8(path.read_bytes(), str(path)).splitlines() if line.strip()]


def iter_lines(stream: BinaryIO, where: str = "stdin") -> Iterator[str]:
    """The non-empty lines of a byte stream (e.g. sys.stdin.buffer), each decoded strictly as it arrives."""
    for number, raw in enumerate(stream, start=1):
        line = decode_utf8(raw, where, first_line=number).rstrip("\r\n")
        if line.strip():
            yield line
