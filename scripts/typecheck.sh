#!/usr/bin/env bash
# mypy over the runtime package as it installs (sdk/ is nextoken, plugins/ and exporters/ inside it):
# a tree of links in a temporary folder, since the package-dir mapping hides the layout from mypy.
# Run by .ci/run before the tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/nextoken"
for f in "$root"/sdk/*; do ln -s "$f" "$tree/nextoken/"; done
ln -s "$root/plugins" "$tree/nextoken/plugins"
ln -s "$root/exporters" "$tree/nextoken/exporters"
cd "$tree" && "${MYPY:-$root/.venv/bin/mypy}" --config-file "$root/pyproject.toml" nextoken
