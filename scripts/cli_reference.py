"""Write docs/cli.md's synopsis from the argparse parsers (``nextoken.cli.reference``); the tests
check the page matches.

    python scripts/cli_reference.py
"""

from __future__ import annotations

import re
from pathlib import Path

from nextoken.cli import reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BLOCK = re.compile(r"(<!-- cli reference: scripts/cli_reference.py -->\n```\n).*?(```)", re.S)


def main() -> None:
    text = PAGE.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f"{PAGE} has no synopsis block to rewrite")
    PAGE.write_text(BLOCK.sub(lambda m: m.group(1) + reference() + m.group(2), text))


if __name__ == "__main__":
    main()
