"""nextoken's own graph builder: fused operators written from the safetensors, checked against transformers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from nextoken import Engine, Scheduler
from nextoken.exporters import export, make_tiny_checkpoint
from nextoken.exporters.builder import BuilderUnavailable, build, read_safetensors
from helpers import run_cli

PROMPTS = ["Hello there", "A much longer prompt than the first one", "abc"]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def built(request, tmp_path_factory):
    """(architecture, transformers model, engine over the builder's package)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"built-{request.param}")
    ckpt = make_tiny_checkpoint(root / "ckpt", request.param)
    report = export(ckpt, root / "pkg", backend="nextoken", progress=None)
    assert report.manifest.exported_by.get("builder") == "nextoken"
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with Engine(report.output, device="cpu") as engine:
        yield request.param, model, engine, report


def test_the_graph_is_fused(built):
    _, _, engine, report = built
    ops = {n.op_type for n in onnx.load(str(report.output / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert report.manifest.padding_side == "right" and report.max_abs_diff < 1e-4
    assert json.loads((report.output / "nextoken.json").read_text())["parity"]["max_abs_diff"] == report.max_abs_diff


def test_logits_match_transformers(built):
    _, model, engine, _ = built
    ids = engine.encode(PROMPTS[1])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(engine.forward(ids) - expected).max() <= 1e-4


def test_greedy_tokens_match_transformers_generate(built):
    _, model, engine, _ = built
    ids = engine.encode(PROMPTS[0])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, eos_token_id=None, do_sample=False, pad_token_id=0)
    assert engine.generate(ids, max_new_tokens=32, ignore_eos=True).token_ids == out[0, len(ids):].tolist()


def test_batch_and_continuous_batching_equal_alone(built):
    _, _, engine, _ = built
    kw = dict(max_new_tokens=12, ignore_eos=True)
    alone = [engine.generate(p, **kw).token_ids for p in PROMPTS]
    assert [c.token_ids for c in engine.generate(PROMPTS, **kw)] == alone
    scheduler = Scheduler(engine, max_batch=4)
    assert scheduler.kv_backend == "slots"                       # the fixed-slot backend, in place
    handles = [scheduler.submit(p, **kw) for p in PROMPTS]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == alone


def test_tied_embeddings_are_stored_once(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in read_safetensors(ckpt)
    build(ckpt, tmp_path / "out")
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    vocab_sized = [i.name for i in graph.initializer if 259 in i.dims and 64 in i.dims]
    assert vocab_sized == ["embed"]


def test_what_the_builder_does_not_cover_falls_back_to_optimum(tiny_model, stories_dir, tmp_path):
    with pytest.raises(BuilderUnavailable, match="covers llama, mistral, qwen2, not 'gpt2'"):
        build(tiny_model("gpt2")[0], tmp_path / "x")
    with pytest.raises(BuilderUnavailable, match="multiple of 16, and this model's is 8"):
        build(stories_dir, tmp_path / "y")
    result = run_cli("export", str(stories_dir), "-o", str(tmp_path / "stories"), "--backend", "nextoken")
    assert result.returncode == 0, result.stderr
    assert "nextoken's builder does not cover this model" in result.stderr and "exporting optimum's graph" in result.stderr
    assert json.loads((tmp_path / "stories" / "nextoken.json").read_text())["padding_side"] == "left"


def test_in_place_generation_when_rows_finish_at_different_steps(built):
    """Engine.generate runs these graphs in a fixed buffer: a row that stops early rides along
    without outgrowing its slot, and every row gets what it gets alone."""
    _, _, engine, _ = built
    kw = dict(max_new_tokens=16, ignore_eos=True)
    alone = [engine.generate(p, **kw).token_ids for p in PROMPTS]
    stop = alone[0][3]                                   # ends the first prompt at its 4th token
    want = [engine.generate(p, stop_token_ids=[stop], **kw).token_ids for p in PROMPTS]
    assert len(want[0]) == 4
    got = engine.generate(PROMPTS, stop_token_ids=[stop], **kw)
    assert [c.token_ids for c in got] == want
    assert got[0].usage.kv_cache_bytes == 3 * (max(len(engine.encode(p)) for p in PROMPTS) + 16) \
        * engine.manifest.kv_bytes_per_token()


def test_quantised_builds_quantise_the_lm_head_too(tmp_path):
    """--backend nextoken --quantize int4: the builder's graph, then MatMulNBits everywhere,
    the tied LM head included (a MatMul of its own; the lookup stays fp32), with the accuracy report."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama", tie_word_embeddings=True)
    report = export(ckpt, tmp_path / "pkg", backend="nextoken", quantize="int4", block_size=16, progress=None)
    manifest = json.loads((tmp_path / "pkg" / "nextoken.json").read_text())
    assert manifest["precision"] == "int4" and manifest["exported_by"]["builder"] == "nextoken"
    assert manifest["quantization"]["teacher_forced_agreement"] > 0 and report.accuracy is not None
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 * 5 + 1 and "GroupQueryAttention" in ops   # 5 per layer + the head
    with Engine(tmp_path / "pkg", device="cpu") as engine:
        assert len(engine.generate("Hello", max_new_tokens=8, ignore_eos=True).token_ids) == 8
