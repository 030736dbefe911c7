"""Benchmark results and BENCHMARKS.md: every script saves what it measured to benchmarks/results/NAME.json
(committed) and BENCHMARKS.md is rendered from those files alone, so a figure in it always has the raw
numbers and the command beside it.

    python benchmarks/report.py          # re-render BENCHMARKS.md from benchmarks/results/*.json

Each results file holds {"title", "command", "measured": {date, machine}, "script", "data"}; the script
(a module in benchmarks/) has `render(data) -> str`, the section's Markdown body. Sections appear in the
order of SECTIONS; hand-written reading notes live in benchmarks/notes/NAME.md and follow their section.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NOTES = HERE / "notes"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
SECTIONS = ("calibration", "routing", "reproduce", "exits", "serving", "batching", "fleet", "drift", "drift_rate_0.3",
            "reliability", "core", "training", "gpu", "web")
HEADER = """# Benchmarks

Figures measured by the scripts in `benchmarks/`. Each section is rendered from the committed results file
`benchmarks/results/NAME.json` (`python benchmarks/report.py` renders them all again) and names the command
that measured it, the date and the machine.
"""


def trained_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a trained model and a calibrated router.json; if not, one line on stderr says how
    to make one (the benchmarks that serve a run exit 2 then)."""
    if (Path(run_dir) / "model").is_dir() and (Path(run_dir) / "router.json").is_file():
        return True
    print(f"{run_dir} is not a trained and calibrated run. Make it with `make run`, or give another RUN_DIR.",
          file=sys.stderr)
    return False


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def save(name: str, title: str, command: str, script: str, data: dict[str, Any], render: bool = True) -> Path:
    """Write benchmarks/results/NAME.json and (unless told not to: a partial result) re-render BENCHMARKS.md."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from dimec.atomic import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, {"title": title, "command": command, "script": script,
                      "measured": {"date": date.today().isoformat(), "machine": machine()}, "data": data})
    if render:
        render_all()
    return path


def section(name: str) -> str:
    doc = json.loads((RESULTS / f"{name}.json").read_text())
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(Path(doc["script"]).stem)
    text = (f"## {doc['title']}\n\nReproduce: `{doc['command']}`  \n"
            f"Measured {doc['measured']['date']} on {doc['measured']['machine']}.\n\n{module.render(doc['data']).strip()}\n")
    note = NOTES / f"{name}.md"
    if note.is_file():
        text += "\n" + note.read_text().strip() + "\n"
    return text


def render_all() -> None:
    names = [n for n in SECTIONS if (RESULTS / f"{n}.json").is_file()]
    names += sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in SECTIONS and _is_section(p))
    BENCHMARKS.write_text(HEADER + "".join("\n" + section(n) for n in names))


def _is_section(path: Path) -> bool:
    """A results file that renders as a section (saved by `save`); raw measurements a section cites are not."""
    return "script" in json.loads(path.read_text())


def markdown_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A Markdown table; align: one of 'l'/'r' per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    render_all()
    print(f"rendered {BENCHMARKS} from {RESULTS}")
