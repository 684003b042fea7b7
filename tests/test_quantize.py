"""Weight quantisation at export, with its accuracy reported against fp32."""

from __future__ import annotations

import json

import pytest

from nextoken import Engine, ExportError
from nextoken.exporters import export
from helpers import run_cli


@pytest.mark.parametrize("method, min_agreement", [("int8", 0.9), ("int4", 0.7)])
def test_quantized_stories260k(stories_dir, tmp_path, method, min_agreement):
    out = tmp_path / method
    result = run_cli("export", str(stories_dir), "-o", str(out), "--quantize", method)
    assert result.returncode == 0, result.stderr
    assert f"{method} accuracy against fp32: greedy" in result.stderr
    manifest = json.loads((out / "nextoken.json").read_text())
    q = manifest["quantization"]
    assert manifest["precision"] == method and q["method"] == method and q["tokens"] == 64
    assert q["teacher_forced_agreement"] >= min_agreement and 0 < q["mean_abs_logit_diff"] < 2
    assert (out / "model.onnx").stat().st_size < 0.6 * 1_300_000 or method == "int8"
    assert run_cli("info", str(out), "--verify").returncode == 0
    with Engine(out, device="cpu") as engine:
        got = engine.generate("Once upon a time", max_new_tokens=20)
        assert len(got.token_ids) == 20 and got.text.strip()
    ops = {n.op_type for n in __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ("MatMulNBits" if method == "int4" else "DynamicQuantizeMatMul") in ops or "MatMulInteger" in ops


def test_unknown_quantisation(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="quantisation 'int3' is not known; use int8 or int4"):
        export(tiny_llama[0], tmp_path / "q", quantize="int3", progress=None)
    with pytest.raises(ExportError, match="int4 block size must be a power of two >= 16"):
        export(tiny_llama[0], tmp_path / "q2", quantize="int4", block_size=24, progress=None)
