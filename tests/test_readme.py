"""README.md as runnable documentation: every ```python block runs as written, each in a fresh
namespace (so each block defines what it uses), on the CPU, in a temporary working directory.

A block that cannot run here (it needs a GPU or a file this repository does not hold) is marked
with ``<!-- readme-test: skip REASON -->`` on the line before its fence; the test reports it as
skipped with that reason. A marker that is not right before a python block fails the test, so no
marker silently does nothing (a marker is a line of its own; quoted in prose it is no marker).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

from uniformer_kernels import backends

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*skip\b(.*?)-->")


class Block(NamedTuple):
    line: int           # 1-based line number of the block's first code line
    code: str
    skip: str | None    # the reason of a skip marker right before the fence


def python_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"README.md:{i + 1}: python block never closed"
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
            skip = marker.group(1).strip() if marker else None
            assert marker is None or skip, f"README.md:{i}: a skip marker needs a reason"
            blocks.append(Block(i + 2, "\n".join(lines[i + 1:end]), skip))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks_and_every_skip_marker_is_on_one():
    text = README.read_text()
    assert BLOCKS, "README.md has no ```python block"
    markers = sum(bool(MARKER.fullmatch(line.strip())) for line in text.splitlines())
    assert markers == sum(b.skip is not None for b in BLOCKS), (
        "a readme-test skip marker is not on the line right before a ```python fence")


def test_block_finder_reads_fences_markers_and_lines():
    text = ("intro\n```python\na = 1\n```\n<!-- readme-test: skip needs a GPU -->\n```python\n"
            "b = 2\nc = 3\n```\n```bash\nls\n```\n")
    assert python_blocks(text) == [Block(3, "a = 1", None), Block(7, "b = 2\nc = 3", "needs a GPU")]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_python_block_runs(block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    monkeypatch.chdir(tmp_path)                      # files a block writes land here
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    # padded so that a traceback's line numbers are README.md's
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    exec(code, {"__name__": "__readme__"})
