"""Write one section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nFigures measured by the scripts in `benchmarks/`; each section names the command that reproduces it.\n"


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def update_section(title: str, body: str, command: str) -> None:
    """Replace (or append) the `## title` section with the body, stamped with command, date and machine."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    section = (f"## {title}\n\nReproduce: `{command}`  \nMeasured {date.today().isoformat()} on {machine()}.\n\n"
               f"{body.strip()}\n\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip() + "\n")
