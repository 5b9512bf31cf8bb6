"""Every `upstack COMMAND` that README.md and docs/*.md name in code (fenced blocks, indented blocks and inline
`...` spans, prose sentences included) is a subcommand of the CLI: a sentence cannot send a user to a command
that does not exist. (test_docs_examples.py parses the full command lines of the code blocks.)"""

import re
from pathlib import Path

from upstack.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
# `upstack WORD` where upstack starts the code or a shell command in it (not `from upstack import`, paths)
COMMAND = re.compile(r"(?:^|[;&|(]|\$ )[ \t]*upstack[ \t]+([a-z][\w-]*)", re.M)


def code_texts(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    fenced = FENCE.findall(text)
    rest = FENCE.sub("", text)
    indented = "\n".join(line[4:] for line in rest.splitlines() if line.startswith("    "))
    return [*fenced, indented, *INLINE.findall(rest)]


def named_commands() -> dict[str, list[str]]:
    """command -> the docs naming it."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for code in code_texts(doc):
            for name in COMMAND.findall(code):
                found.setdefault(name, []).append(doc.name)
    return found


def test_every_command_the_docs_name_exists():
    found = named_commands()
    assert {"run", "demo", "upscale", "sft", "dpo", "eval", "data"} <= set(found)  # the scan sees the docs
    known = set(build_parser().subcommands)
    missing = {name: sorted(set(docs)) for name, docs in found.items() if name not in known}
    assert not missing, f"commands named in the docs but not in the CLI: {missing}"


def test_the_scan_finds_inline_commands_and_skips_python():
    assert COMMAND.findall("download and check it with `upstack data`".split("`")[1]) == ["data"]
    assert COMMAND.findall("from upstack import cli") == []
    assert COMMAND.findall("python -m upstack.cli run x.yaml") == []
    assert COMMAND.findall("$ upstack eval m --tasks x && upstack report runs/x") == ["eval", "report"]
