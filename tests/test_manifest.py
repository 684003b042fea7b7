"""The manifest: what it records, and how it round-trips."""

from __future__ import annotations

import json

import pytest

from nextoken import FORMAT_VERSION, Manifest, ModelPackageError


def test_export_records_what_the_design_asks(tiny_llama):
    data = json.loads((tiny_llama[1] / "nextoken.json").read_text())
    for key in (
        "format_version",
        "architecture",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "kv_dtype",
        "inputs",
        "outputs",
        "context_length",
        "bos_token_id",
        "eos_token_ids",
        "pad_token_id",
        "precision",
        "exported_by",
        "checksums",
    ):
        assert key in data, key
    assert data["format_version"] == FORMAT_VERSION
    assert data["architecture"] == "llama" and data["num_layers"] == 2 and data["num_kv_heads"] == 2
    assert data["head_dim"] == 16 and data["kv_dtype"] == "float32" and data["precision"] == "fp32"
    assert data["eos_token_ids"] == [2] and data["bos_token_id"] == 1 and data["pad_token_id"] == 0
    assert {"torch", "transformers", "optimum", "onnx", "nextoken"} <= set(data["exported_by"])
    assert "model.onnx" in data["checksums"] and "tokenizer.json" in data["checksums"]
    # the default graph takes its positions from the mask (padding on the right); optimum's takes them
    assert data["exported_by"]["builder"] == "nextoken" and data["padding_side"] == "right"
    assert "position_ids" not in data["inputs"]


def test_optimum_graphs_get_position_ids(tiny_model):
    for arch in ("llama", "gemma"):
        data = json.loads((tiny_model(arch, "optimum")[1] / "nextoken.json").read_text())
        assert "position_ids" in data["inputs"] and data["padding_side"] == "left"


def test_round_trip(tiny_llama, tmp_path):
    m = Manifest.load(tiny_llama[1])
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m
    assert m.past_names()[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert m.present_names()[-1] == "present.1.value"
    assert m.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4


def test_missing_fields_are_named(tmp_path):
    (tmp_path / "nextoken.json").write_text(json.dumps({"format_version": 1, "architecture": "llama"}))
    with pytest.raises(ModelPackageError, match="lacks num_layers, num_kv_heads"):
        Manifest.load(tmp_path)


def test_bad_values_are_named(tiny_llama, tmp_path):
    data = json.loads((tiny_llama[1] / "nextoken.json").read_text())
    data["num_layers"] = 0
    (tmp_path / "nextoken.json").write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match="num_layers must be a positive integer"):
        Manifest.load(tmp_path)


def test_info_verifies_checksums(tiny_llama, tmp_path):
    import shutil

    from helpers import run_cli

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama[1], pkg)
    ok = run_cli("info", str(pkg), "--verify", "--json")
    assert ok.returncode == 0, ok.stderr
    assert "verified" in json.loads(ok.stdout)["checksums"]
    with open(pkg / "tokenizer_config.json", "a") as fh:
        fh.write(" ")
    bad = run_cli("info", str(pkg), "--verify")
    assert bad.returncode == 1 and "tokenizer_config.json (changed)" in bad.stderr
