"""The runtime never needs torch, transformers or optimum: import and generate with them blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "transformers", "optimum")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True)


def test_generate_without_torch_transformers_optimum(tiny_llama):
    result = _run(f"""
        import nextoken, nextoken.plugins, nextoken.exporters
        with nextoken.Engine({str(tiny_llama[1])!r}) as engine:
            c = engine.generate("no torch here", max_new_tokens=8, ignore_eos=True)
            assert len(c.token_ids) == 8, c
            events = list(engine.stream(["a", "bb"], max_new_tokens=3, ignore_eos=True))
            assert len(events) == 6
        loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not loaded, loaded
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_export_without_the_extra_says_what_to_install(tmp_path):
    result = _run(f"""
        import nextoken.exporters
        try:
            nextoken.exporters.export("some/model", {str(tmp_path / "out")!r}, progress=None)
        except nextoken.ExportError as exc:
            print(exc)
    """)
    assert result.returncode == 0, result.stderr
    assert "pip install 'nextoken[export]'" in result.stdout


def test_cli_generate_without_torch(tiny_llama):
    result = _run(f"""
        from nextoken.cli import main
        raise SystemExit(main(["generate", {str(tiny_llama[1])!r}, "hello", "--max-new-tokens", "4", "--json"]))
    """)
    assert result.returncode == 0, result.stderr
    assert '"token_ids"' in result.stdout


def test_the_default_export_needs_no_torch_without_its_parity_check(tiny_llama, tmp_path):
    """With torch, transformers and optimum blocked, `export --no-check` (nextoken's builder: numpy
    and onnx) writes a package that generates what the checked export's does; asking for the check
    names the extra to install."""
    from nextoken import Engine

    run = "from nextoken.cli import main; raise SystemExit(main(['export', {!r}, '-o', {!r}] + {!r}))"
    ok = _run(run.format(str(tiny_llama[0]), str(tmp_path / "pkg"), ["--no-check"]))
    assert ok.returncode == 0, ok.stderr
    assert "parity not checked (--no-check)" in ok.stderr
    with Engine(tmp_path / "pkg", device="cpu") as engine, Engine(tiny_llama[1], device="cpu") as checked:
        assert (
            engine.generate("abc", max_new_tokens=8, ignore_eos=True).token_ids
            == checked.generate("abc", max_new_tokens=8, ignore_eos=True).token_ids
        )
    refused = _run(run.format(str(tiny_llama[0]), str(tmp_path / "other"), []))
    assert refused.returncode == 1 and "install the export extra" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
