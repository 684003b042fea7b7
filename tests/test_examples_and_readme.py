"""The README's embedding example is examples/embed.py, and it runs."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, run_cli


def test_readme_embedding_example_is_the_example_file():
    readme = (REPO / "README.md").read_text()
    example = (REPO / "examples" / "embed.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert any(block.strip() == example.strip() for block in blocks)


def test_embed_example_runs(stories_package):
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "embed.py"), str(stories_package)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "Lily" in out.stdout
    assert lines[-1].startswith("error: max_new_tokens must be >= 1")


def test_readme_quick_start_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    assert len(commands) >= 2
    main_job, test_cmd = commands[0].strip(), commands[1].strip()
    assert "nextoken demo" in main_job
    assert test_cmd in ci


def test_demo_builds_an_untrained_default_offline(tmp_path):
    """The main job with no model: an untrained tiny Llama, built, exported and run, no download."""
    env = {"NEXTOKEN_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = run_cli("demo", "--max-new-tokens", "12", "--ignore-eos", env=env)
    assert result.returncode == 0, result.stderr
    assert "untrained" in result.stderr
    assert "[length] prompt" in result.stderr and "completion 12 tok" in result.stderr
    assert "[1/3] building" in result.stderr  # the default export: the builder's graph
    (package,) = (tmp_path / "packages").iterdir()
    assert package.name.startswith("tiny-llama-untrained-") and (package / "nextoken.json").is_file()
    again = run_cli("demo", "--max-new-tokens", "12", "--ignore-eos", env=env)  # cached: no export
    assert again.returncode == 0 and "[1/" not in again.stderr
    assert again.stdout == result.stdout


def test_demo_with_a_local_checkpoint(stories_dir, tmp_path):
    result = run_cli("demo", str(stories_dir), "--max-new-tokens", "20", env={"NEXTOKEN_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(", there was")


def test_embed_example_without_a_package_says_how_to_run_it():
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "embed.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and out.stderr.startswith("usage: python examples/embed.py PACKAGE")
    assert "Traceback" not in out.stderr
