"""Small helpers shared by the `dimec` command line (dimec.cli) and the commands it attaches from other
packages (dimec.serving.cli), so that neither imports the other's module."""

from __future__ import annotations

from pathlib import Path

from dimec.errors import DataError


def texts_from_args(texts: list[str], file: str | None) -> list[str]:
    """Texts given on the command line, then the non-empty lines of `file` (one text per line)."""
    texts = list(texts)
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"file not found: {path}", "give a text file with one text per line")
        texts += [line for line in path.read_text().splitlines() if line.strip()]
    return texts
