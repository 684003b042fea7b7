#!/usr/bin/env bash
# mypy over the runtime package as it installs (sdk/ is nextoken, plugins/ and exporters/ inside
# it), read through scripts/package_tree.py's links. Run by .ci/run before the tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
"$python" "$root/scripts/package_tree.py" "$tree"
cd "$tree" && "$python" -m mypy --config-file "$root/pyproject.toml" nextoken
