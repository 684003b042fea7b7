"""mkdocs hook: the API reference reads the package through scripts/package_tree.py's links, made
in build/api-src (mkdocs.yml points mkdocstrings there) before mkdocstrings sets up its search
paths (so the first build of a fresh clone finds the package too)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[1]


@event_priority(100)  # before mkdocstrings' own on_config
def on_config(config):
    spec = importlib.util.spec_from_file_location("package_tree", ROOT / "scripts" / "package_tree.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(ROOT / "build" / "api-src")
    return config
