"""Every `upstack ...` command line in README.md and docs/ parses (its subcommand and flags exist), and every
recipe and merge YAML example there validates, so the documentation cannot drift from the code."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(kind: str):
    for doc in DOCS:
        for lang, body in FENCE.findall(doc.read_text(encoding="utf-8")):
            if lang in kind:
                yield doc.name, body


def indented(doc: Path):
    """Indented (4-space) code lines outside fences: the docs' other way of showing commands."""
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    return "\n".join(line[4:] for line in text.splitlines() if line.startswith("    "))


def command_lines():
    sources = [*blocks(("bash", "sh", "shell", "")), *((d.name, indented(d)) for d in DOCS)]
    for doc, body in sources:
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
                # synopses ("[--flag]", "...") show a shape, not a command
                if part.startswith("upstack ") and "..." not in part and "[" not in part:
                    yield doc, part


COMMANDS = list(command_lines())


def test_docs_have_examples():
    assert len(COMMANDS) >= 15 and len(RECIPES) >= 1 and len(MERGE_CONFIGS) >= 2


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}:{line[:60]}" for d, line in COMMANDS])
def test_documented_commands_parse(doc, line):
    from upstack.cli import build_parser

    argv = shlex.split(line)[1:]
    args, extras = build_parser().parse_known_args(argv)
    assert getattr(args, "func", None) is not None, f"{doc}: {line}: no such command"
    assert not extras, f"{doc}: {line}: unknown arguments {extras}"


RECIPES = [(d, b) for d, b in blocks(("yaml", "yml")) if isinstance(yaml.safe_load(b), dict)
           and "stages" in yaml.safe_load(b)]


@pytest.mark.parametrize("doc,text", RECIPES, ids=[d for d, _ in RECIPES])
def test_documented_recipes_validate(tmp_path, doc, text):
    """Problems about files the example names but this test does not have are the only ones allowed."""
    from upstack.errors import ConfigError
    from upstack.pipeline import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(text)
    try:
        load_recipe(p, tmp_path / "run")
    except ConfigError as e:
        problems = [x.strip() for x in str(e).splitlines()[1:]] or [str(e)]
        other = [x for x in problems if not re.search(r"no such (file|folder)|does not exist|not found|no file matches", x)]
        assert not other, f"{doc}: {other}"


MERGE_CONFIGS = [(d, b) for d, b in blocks(("yaml", "yml")) if isinstance(yaml.safe_load(b), dict)
                 and {"method", "merge_method"} & set(yaml.safe_load(b))]


@pytest.mark.parametrize("doc,text", MERGE_CONFIGS, ids=[d for d, _ in MERGE_CONFIGS])
def test_documented_merge_configs_validate(tmp_path, doc, text):
    from upstack.merge import config_from_yaml, validate_config

    p = tmp_path / "merge.yaml"
    p.write_text(text)
    validate_config(config_from_yaml(p))
