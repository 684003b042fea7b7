"""The package as it installs, as a tree of links: ``DEST/nextoken`` holds sdk/'s files with
plugins/ and exporters/ inside it. Tools that look for a ``nextoken`` folder (mypy, the docs' API
reference) read the sources through it; pyproject's package-dir mapping hides the layout from them.

    python scripts/package_tree.py DEST
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(dest: str | Path) -> Path:
    """Write the tree under ``dest`` (a folder, made if missing); returns ``dest``."""
    package = Path(dest) / "nextoken"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / "sdk").iterdir():
        if entry.name != "__pycache__" and not (package / entry.name).exists():
            (package / entry.name).symlink_to(entry)
    for sub in ("plugins", "exporters"):
        if not (package / sub).exists():
            (package / sub).symlink_to(ROOT / sub)
    return Path(dest)


if __name__ == "__main__":
    make(sys.argv[1])
