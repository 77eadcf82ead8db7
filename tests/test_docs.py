"""Outputs quoted in the docs are what the commands print today: each ```console block that starts
with ``$ jaxq ...`` is run (in a scratch folder, with the repository's configs/ reachable) and every
quoted output line other than ``...`` must appear, verbatim, in what the command prints. A doc that
goes stale fails here; the failure shows the current output to paste."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# commands that take minutes (tuning for 150 steps, a sweep, an hour of trace through 64 replicas): checked
# with --run-slow
SLOW = ("jaxq tune", "jaxq sweep", "jaxq trace simulate")


def console_blocks():
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"```console\n(.*?)```", text, re.S):
            lines = m.group(1).rstrip("\n").splitlines()
            if lines and lines[0].startswith("$ jaxq ") and len(lines) > 1:  # a command with its output
                line_no = text[: m.start()].count("\n") + 2
                yield pytest.param(lines[0][2:], lines[1:], id=f"{path.name}:{line_no}",
                                   marks=[pytest.mark.slow] if lines[0][2:].startswith(SLOW) else [])


@pytest.mark.parametrize("command, quoted", list(console_blocks()))
def test_quoted_output_is_current(command, quoted, tmp_path, monkeypatch, capsys):
    from jaxq.cli import main

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    argv = shlex.split(command)[1:]
    inputs = [a for a in argv if a.endswith((".csv", ".toml")) and a != "-"]
    if any(not (tmp_path / a).exists() and not (REPO / a).exists() for a in inputs):
        pytest.skip(f"illustrative: {command!r} reads a file of the reader's own")
    # a path given from the repository's root (../shared/data/...): the same file from the scratch folder
    argv = [str(REPO / a) if a in inputs and not (tmp_path / a).exists() else a for a in argv]
    rc = main(argv)
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out
    # stdout and stderr (progress lines, redrawn with carriage returns)
    printed = [line.rstrip() for line in re.split(r"[\r\n]", captured.out + "\n" + captured.err)]

    def shown(q):  # "..." inside a quoted line stands for any text (an elided path)
        pattern = ".*".join(re.escape(part) for part in q.rstrip().split("..."))
        return any(re.fullmatch(pattern, line) for line in printed)

    missing = [q for q in quoted if q.strip() not in ("...", "") and not shown(q)]
    assert not missing, f"stale lines in the doc (first of {len(missing)}): {missing[0]!r}\n--- current output ---\n{out}"
