"""Every figure in the docs is written by a script in the repository.

Generated text sits between the markers of `benchmarks/docs_section.py`, which name the
script that wrote it. docs/benchmarks.md holds no number outside such blocks (commands and
code excepted); the other docs hold no measured rate, ratio or speed outside them. Figures
of an earlier run that no current script wrote may stay only inside a marked history block.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import END, replace_section, split_generated, strip_history  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```.*?```|`[^`]+`", re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
# What a rerun would change: rates, ratios, speeds, bandwidths, PSNR.
MEASURED = re.compile(r"\d(\.\d+)?x\b|\d\s?(tokens|frames|rollouts|requests|GB|MB)/s\b"
                      r"|\d\s?ms/token|\d\s?dB\b")


def _prose(text: str) -> str:
    """What is written by hand: outside generated and history blocks, code and comments."""
    return COMMENT.sub("", CODE.sub("", strip_history(split_generated(text)[1])))


def test_every_number_in_benchmarks_md_is_in_a_generated_block() -> None:
    lines = [line for line in _prose((ROOT / "docs" / "benchmarks.md").read_text())
             .splitlines() if re.search(r"(?<![A-Za-z_\d])\d", line)]  # not bfloat16
    assert not lines, "numbers written by hand in docs/benchmarks.md:\n" + "\n".join(lines)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_generated_blocks_name_a_script_of_the_repo_and_how_it_ran(doc: Path) -> None:
    for script, body in split_generated(doc.read_text())[0]:
        assert (ROOT / script).is_file(), f"{doc.name}: block by {script}, which is not here"
        assert re.search(r"\d{4}-\d\d-\d\d", body) and "load average" in body, \
            f"{doc.name}: the block by {script} does not say when and under what load it ran"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_measured_figure_is_written_by_hand(doc: Path) -> None:
    hits = [line.strip() for line in _prose(doc.read_text()).splitlines()
            if MEASURED.search(line)]
    assert not hits, f"measured figures outside generated blocks in {doc.name}:\n" + \
        "\n".join(hits)


def test_a_section_is_replaced_in_place_and_marked(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\n## Speed\n\nold 1.5x\n\n### Notes by hand\n\nkept\n")
    for figure in ("2.0x", "3.0x"):
        replace_section(doc, f"## Speed\n\nnew {figure}\n", stop=("## ", "### "),
                        script="benchmarks/bench_x.py")
    text = doc.read_text()
    blocks, outside = split_generated(text)
    assert blocks == [("benchmarks/bench_x.py", "\nnew 3.0x\n")]
    assert "1.5x" not in text and "2.0x" not in text and text.count(END) == 1
    assert "### Notes by hand\n\nkept" in outside


def test_the_check_finds_a_figure_written_by_hand(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("## Speed\n\nabout 2.5x faster at 30 tokens/s\n")
    replace_section(doc, "## Other\n\n9.9x\n", script="benchmarks/bench_x.py")
    flagged = [x for x in _prose(doc.read_text()).splitlines() if MEASURED.search(x)]
    assert flagged == ["about 2.5x faster at 30 tokens/s"]


def test_a_new_part_goes_to_the_end_of_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\n## Serve\n\nintro\n\n## Later\n\ntext\n")
    replace_section(doc, "### Row a\n\nfigure a\n", within="## Serve", script="b/x.py")
    replace_section(doc, "### Row b\n\nfigure b\n", within="## Serve", script="b/x.py")
    text = doc.read_text()
    assert text.index("intro") < text.index("### Row a") < text.index("### Row b") \
        < text.index("## Later")


def test_the_heading_a_script_writes_is_part_of_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    replace_section(doc, "### models/demo, wait 100 ms\n\nfast 2.0x\n",
                    script="benchmarks/bench_x.py")
    text = doc.read_text() + "\n### by hand, 100 ms\n\nmore\n"
    blocks, outside = split_generated(text)
    assert blocks == [("benchmarks/bench_x.py", "\nfast 2.0x\n")]
    assert "wait 100 ms" not in outside and "### by hand, 100 ms" in outside
