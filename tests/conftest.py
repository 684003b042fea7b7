"""Shared fixtures: tiny random-weight models exported once per session, and the real stories260k model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import STORIES, run_cli


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, backend="nextoken") -> (checkpoint_dir, package_dir)``: built and exported
    once per session (the default export: nextoken's builder; ``backend="optimum"``: optimum's graph)."""
    from nextoken.exporters import export, make_tiny_checkpoint

    made: dict[tuple[str, str], tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str, backend: str = "nextoken") -> tuple[Path, Path]:
        if (arch, backend) not in made:
            ckpt = root / f"ckpt-{arch}"
            if not ckpt.exists():
                make_tiny_checkpoint(ckpt, arch)
            pkg = root / (f"pkg-{arch}" if backend == "nextoken" else f"pkg-{arch}-{backend}")
            export(ckpt, pkg, backend=backend, progress=None)
            made[arch, backend] = (ckpt, pkg)
        return made[arch, backend]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="session")
def llama_engine(tiny_llama):
    from nextoken import Engine

    with Engine(tiny_llama[1], device="cpu") as engine:
        yield engine


@pytest.fixture(scope="session")
def optimum_llama(tiny_model):
    """The tiny llama through optimum's generic graph (padding on the left, the cache concatenated)."""
    return tiny_model("llama", "optimum")


@pytest.fixture(scope="session")
def optimum_engine(optimum_llama):
    from nextoken import Engine

    with Engine(optimum_llama[1], device="cpu") as engine:
        yield engine


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real trained model in ../shared; skipped where a clone has no ../shared, but never in CI."""
    if not (STORIES / "config.json").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{STORIES} is missing, and CI always has ../shared beside the clone")
        pytest.skip(f"{STORIES} not found: the real-model tests need ../shared/models/stories260k beside the repo")
    return STORIES


@pytest.fixture(scope="session")
def stories_package(stories_dir, tmp_path_factory) -> Path:
    """stories260k exported with the real CLI (`nextoken export`)."""
    out = tmp_path_factory.mktemp("stories") / "pkg"
    result = run_cli("export", str(stories_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "max |Δ logits|" in result.stderr
    return out


@pytest.fixture(scope="session")
def stories_engine(stories_package):
    from nextoken import Engine

    with Engine(stories_package, device="cpu") as engine:
        yield engine


@pytest.fixture(scope="session")
def gqa_package(tmp_path_factory):
    """A GroupQueryAttention graph laid out as onnxruntime-genai's builder does, imported with the CLI."""
    from gqa_graph import build_genai_folder

    root = tmp_path_factory.mktemp("gqa")
    built = build_genai_folder(root / "built")
    result = run_cli("import-genai", str(built), "-o", str(root / "pkg"))
    assert result.returncode == 0, result.stderr
    assert "padding right" in result.stderr
    return root / "pkg"
