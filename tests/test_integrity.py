"""A package is what it claims to be, from export to load: atomic export, a parity check that
exercises the model and is recorded, files checked at load, manifest values checked against the model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import REPO, rehash
from nextoken import Engine, ExportError, ManifestMismatchError, ModelPackageError
from nextoken.exporters import export
from nextoken.manifest import VERIFIED_STAMP


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".nextoken-" in p.name]


def test_a_failed_parity_check_writes_nothing_and_keeps_the_previous_package(tiny_llama, tmp_path):
    ckpt = tiny_llama[0]
    fresh = tmp_path / "fresh"
    with pytest.raises(ExportError, match=r"parity check failed.*nothing was written to"):
        export(ckpt, fresh, atol=1e-12, progress=None)
    assert not fresh.exists() and _leftovers(tmp_path) == []

    kept = tmp_path / "kept"
    report = export(ckpt, kept, progress=None)
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with pytest.raises(ExportError, match=r"parity check failed.*keeps the package it had"):
        export(ckpt, kept, atol=1e-12, progress=None)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before and _leftovers(tmp_path) == []
    parity = json.loads((kept / "nextoken.json").read_text())["parity"]
    assert parity["max_abs_diff"] == report.max_abs_diff <= parity["tolerance"] == 1e-3
    assert parity["positions"] >= 16 and parity["device"] == "cpu"


@pytest.mark.parametrize("stage", ["building", "writing the model package", "checking ONNX logits"])
def test_an_export_killed_at_any_stage_leaves_nothing_and_the_next_one_cleans_up(tiny_llama, tmp_path, stage):
    out = tmp_path / "pkg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextoken", "export", str(tiny_llama[0]), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    for line in proc.stderr:
        if stage in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert _leftovers(tmp_path)  # what the killed export left beside the target ...
    export(tiny_llama[0], out, progress=None)
    assert _leftovers(tmp_path) == []  # ... the next export of it removed
    with Engine(out, device="cpu") as engine:
        assert len(engine.generate("abc", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_a_parity_check_that_proves_nothing_fails(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from nextoken.exporters import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama")
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # every token the same (zero) vector
    model.save_pretrained(ckpt)
    with pytest.raises(ExportError, match="the parity check cannot judge this export: PyTorch's logits are"):
        export(ckpt, tmp_path / "pkg", progress=None)
    assert not (tmp_path / "pkg").exists()


@pytest.fixture()
def package(tiny_llama, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_llama[1], dst)
    (dst / VERIFIED_STAMP).unlink(missing_ok=True)
    return dst


def test_a_changed_file_is_refused_at_load(package):
    with Engine(package, device="cpu") as engine:
        assert engine.verified == "sha256"  # hashed once ...
    with Engine(package, device="cpu") as engine:
        assert engine.verified == "stamp"  # ... then trusted while size and mtime hold
    with Engine(package, device="cpu", verify=True) as engine:
        assert engine.verified == "sha256"
    model = package / "model.onnx"
    size = model.stat().st_size
    with open(model, "r+b") as fh:  # 64 bytes overwritten, the size unchanged
        fh.seek(size // 2)
        fh.write(bytes(64))
    assert model.stat().st_size == size
    with pytest.raises(ModelPackageError, match=r"model.onnx changed \(its sha256 differs"):
        Engine(package, device="cpu")
    with Engine(package, device="cpu", verify=False) as engine:  # sizes only: the caller's choice
        assert engine.verified == "sizes"


def test_a_file_loading_would_read_that_the_export_did_not_record_is_refused(package):
    (package / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(ModelPackageError, match=r"chat_template.jinja would be read but is not among the files"):
        Engine(package, device="cpu")
    rehash(package)  # recorded, as an export would: it loads
    with Engine(package, device="cpu") as engine:
        assert engine.decode(engine.apply_chat_template([{"role": "user", "content": "Hello"}])) == "Hello"


def test_a_package_that_cannot_hold_its_stamp_keeps_it_in_the_user_cache(package, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (package / VERIFIED_STAMP).mkdir()  # unwritable there (as a read-only package is, even for root)
    with Engine(package, device="cpu") as engine:
        assert engine.verified == "sha256"
    with Engine(package, device="cpu") as engine:
        assert engine.verified == "stamp"
    assert len(list((tmp_path / "cache" / "nextoken" / "verified").iterdir())) == 1


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(pad_token_id=10**6), "pad_token_id 1000000 is outside the vocabulary"),
        (dict(eos_token_ids=[-1]), "eos_token_ids -1 is outside the vocabulary"),
        (dict(context_length=100000), "context_length 100000 is longer than the model's 128 positions"),
    ],
)
def test_manifest_values_are_checked_against_the_model(package, changes, words):
    path = package / "nextoken.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestMismatchError, match=words):
        Engine(package, device="cpu")


def test_rehash_helper_restores_loading(package):
    with open(package / "tokenizer_config.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(ModelPackageError, match="tokenizer_config.json changed"):
        Engine(package, device="cpu")
    with Engine(rehash(package), device="cpu"):
        pass
