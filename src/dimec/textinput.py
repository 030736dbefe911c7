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


def check_batch(texts, pairs=None, ids=None, max_batch: int | None = None, max_chars: int | None = None,
                max_id_chars: int | None = None, unique_ids: bool = True) -> tuple[list[str], list[str] | None, list[str] | None]:
    """The one check of a batch of texts to classify, wherever it comes from (`dimec route`, the phone client,
    an HTTP body): a non-empty list of non-empty strings, one pair and one unique id per text when given, and
    the limits when set (`unique_ids`: the phone matches answers by id; a server only echoes them). Texts are
    numbered from 1 in messages. Returns (texts, pairs, ids) as lists."""
    if isinstance(texts, str):
        raise DataError("texts must be a list of strings, got one string", "wrap it in a list")
    texts = list(texts)
    if not texts:
        raise DataError("no texts to classify: the list is empty", "give one text or more")
    if max_batch is not None and len(texts) > max_batch:
        raise DataError(f"batch of {len(texts)} texts is over the limit of {max_batch}", "send smaller batches")
    pairs = None if pairs is None else list(pairs)
    if pairs is not None and len(pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(pairs)} text pairs", "give one pair per text")
    for i, t in enumerate([*texts, *(pairs or [])]):
        where = f"text {i % len(texts) + 1}" + (" (its pair)" if i >= len(texts) else "")
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{where} is empty or not a string", "give non-empty texts")
        if max_chars is not None and len(t) > max_chars:
            raise DataError(f"{where} has {len(t)} characters, over the limit of {max_chars}", "send shorter texts")
    if ids is not None:
        ids = [str(x) for x in ids]
        if len(ids) != len(texts) or (unique_ids and len(set(ids)) != len(ids)):
            raise DataError("request ids must be " + ("unique, " if unique_ids else "") + "one per text")
        if max_id_chars is not None and any(len(x) > max_id_chars for x in ids):
            raise DataError(f"request ids are limited to {max_id_chars} characters")
    return texts, pairs, ids


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
