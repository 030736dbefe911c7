"""Small helpers shared by the `dimec` command line (dimec.cli) and the commands it attaches from other
packages (dimec.serving.cli), so that neither imports the other's module."""

from __future__ import annotations


def texts_from_args(texts: list[str], file: str | None) -> list[str]:
    """Texts given on the command line, then the non-empty lines of `file` (one text per line); both
    checked to be valid UTF-8 (a DataError naming the text or file:line if not)."""
    from dimec.textinput import check_args, read_lines

    return check_args(texts) + (read_lines(file) if file else [])
