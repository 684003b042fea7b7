"""The README and docs/: their links resolve, and the code blocks marked to run do run, against the
stories260k package (``engine``, ``prompt`` and ``nextoken`` given; a block marked "as the module
NAME" becomes that module for the blocks after it)."""

from __future__ import annotations

import re
import types

import pytest

import nextoken
from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- runs in the tests(?:, as the module (\w+))? -->\n```python\n(.*?)```", re.S)


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in "\n".join(lines) or page.name in ("index.md", "api.md"), page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"


def test_the_marked_code_blocks_run(stories_engine):
    blocks = [(page.name, name, code) for page in PAGES for name, code in MARK.findall(page.read_text())]
    assert len(blocks) >= 6
    scope = {"nextoken": nextoken, "engine": stories_engine, "prompt": "Once upon a time"}
    for page, name, code in blocks:
        if name:  # a plugin module, for the blocks after it
            module = types.ModuleType(name)
            exec(compile(code, f"{page}:{name}", "exec"), module.__dict__)
            scope[name] = module
        else:
            exec(compile(code, page, "exec"), dict(scope))
    assert stories_engine.generate("Once upon a time", max_new_tokens=4).token_ids  # and the engine still works


def test_the_cli_page_is_the_parsers_own():
    """docs/cli.md's synopsis is nextoken.cli.reference() (scripts/cli_reference.py writes it):
    every command and every flag the parsers take, none they do not (compared by name, so another
    Python's argparse wrapping cannot fail it)."""
    from nextoken.cli import _parser

    page = (REPO / "docs" / "cli.md").read_text()
    block = re.search(r"<!-- cli reference: scripts/cli_reference.py -->\n```\n(.*?)```", page, re.S)
    assert block, "docs/cli.md lost its synopsis block"
    documented = set(re.findall(r"--[a-z0-9-]+", block.group(1)))
    commands = _parser().get_default("commands")
    flags = {
        option
        for command in commands.values()
        for line in command.format_usage().split()
        for option in re.findall(r"--[a-z0-9-]+", line)
    }
    assert documented == flags - {"--help"}
    assert all(f"nextoken {name} " in block.group(1) for name in commands)


#: Public classes beyond ``nextoken.__all__`` that users construct (plugin tests, the server, caches).
CONSTRUCTED = {
    "nextoken.testing": ("FakeEngine", "ScriptedModel", "CharTokenizer"),
    "nextoken.intake": ("Intake",),
    "nextoken.toolcalls": ("ToolRequest",),
    "nextoken.prefixcache": ("PrefixCache", "DiskTier"),
    "nextoken.runner": ("StepRunner", "CacheOps"),
    "nextoken.kvbackends": ("SlotBackend", "ConcatBackend"),
    "nextoken.speculation": ("Speculation",),
    "nextoken.serving.core": ("Service",),
    "nextoken.serving.openai_api": ("OpenAIService",),
    "nextoken.serving.responses_api": ("ResponsesService",),
    "nextoken.serving.anthropic_api": ("MessagesService",),
    "nextoken.serving.embeddings_api": ("EmbeddingsService", "EmbedBatcher"),
    "nextoken.embedding": ("Embedder",),
    "nextoken.reasoning": ("ThinkTags",),
    "nextoken.adapters": ("AdapterTable",),
}


def test_public_constructors_list_their_args():
    """Every public class with an ``__init__`` of its own documents each parameter in an ``Args:``
    list (what the API reference renders); dataclasses document their fields instead."""
    import dataclasses
    import importlib
    import inspect

    classes = [c for n in nextoken.__all__ if inspect.isclass(c := getattr(nextoken, n))]
    for module, names in CONSTRUCTED.items():
        classes += [getattr(importlib.import_module(module), n) for n in names]
    missing = {}
    for cls in classes:
        init = cls.__dict__.get("__init__")
        if not inspect.isfunction(init) or dataclasses.is_dataclass(cls):
            continue
        named = [
            p.name
            for p in inspect.signature(init).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        found = re.search(r"Args:\n(.*?)(?:\n\s*\n|\Z)", (init.__doc__ or "") + "\n" + (cls.__doc__ or ""), re.S)
        lacking = [p for p in named if not found or not re.search(rf"^\s+{p}\b[^:\n]*:", found.group(1), re.M)]
        if lacking:
            missing[f"{cls.__module__}.{cls.__name__}"] = lacking
    assert not missing, missing
