"""One distribution, three folders, one namespace: the editable install, a wheel and pytest agree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import nextoken
import nextoken.exporters
import nextoken.plugins
from helpers import REPO

FOLDERS = {"nextoken": "sdk", "nextoken.plugins": "plugins", "nextoken.exporters": "exporters"}


def _modules(folder: Path, package: str) -> set[str]:
    """Every module under ``folder``, subpackages included (cli/, serving/, tools/), as the wheel names them."""
    return {f"{package}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.py")}


def test_imports_resolve_to_the_source_folders():
    for module, folder in ((nextoken, "sdk"), (nextoken.plugins, "plugins"), (nextoken.exporters, "exporters")):
        assert Path(module.__file__).resolve().parent == REPO / folder


def test_installed_distribution_maps_the_folders(tmp_path):
    """The installed package (editable here) resolves the same modules in a fresh interpreter."""
    code = (
        "import nextoken, nextoken.plugins, nextoken.exporters, nextoken.cli;"
        "print(nextoken.__file__); print(nextoken.plugins.__file__); print(nextoken.exporters.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    paths = [Path(p).resolve().parent for p in out.stdout.split()]
    assert paths == [REPO / "sdk", REPO / "plugins", REPO / "exporters"]


def test_wheel_holds_every_module_under_the_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("nextoken-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for package, folder in FOLDERS.items():
        expected |= _modules(REPO / folder, package.replace(".", "/"))
    assert expected <= names
    assert not any(n.startswith(("sdk/", "plugins/", "exporters/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nextoken = nextoken.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_console_script_and_module_entry_point():
    script = Path(sys.executable).parent / "nextoken"
    for cmd in ([str(script), "--version"], [sys.executable, "-m", "nextoken", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == f"nextoken {nextoken.__version__}"


def test_public_api_names():
    for name in nextoken.__all__:
        assert hasattr(nextoken, name)
    # classes keep the module they are written in (no rewrite to "nextoken"), so their type hints
    # resolve where they were written
    assert nextoken.Engine.__module__ == "nextoken.engine"
    assert nextoken.SamplingParams.__module__ == "nextoken.types"
