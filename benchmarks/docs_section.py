"""Rewrite one section of a Markdown document with a benchmark's results."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, *, stop: tuple[str, ...] = ("## ",)) -> None:
    """Put `section` (Markdown starting with its heading line) in place of the part of
    `path` that starts with the same heading line and runs to the next line starting with
    one of `stop` (to the end when there is none); appended when the heading is absent.
    `stop=("## ", "### ")` keeps hand-written subsections after the generated part."""
    heading = section.split("\n", 1)[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(f"\n{heading}\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        start += 1
        ends = [i for s in stop if (i := text.find(f"\n{s}", start + len(heading))) != -1]
        text = text[:start] + section.rstrip("\n") + "\n" + text[min(ends, default=len(text)):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
