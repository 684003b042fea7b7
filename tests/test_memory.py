"""The memory planner: weights + working memory + KV cache, from configs and packages, checked
against the rule of thumb and against measured runs."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, run_cli
from nextoken import Engine, InvalidRequestError
from nextoken.tools.memory import ModelSpec, count_parameters, plan_memory

CONFIGS = REPO / "tests" / "data" / "configs"
GB = 1e9


@pytest.mark.parametrize(
    "config, billions, fp16_gb",
    [
        ("tinyllama-1.1b.json", 1.1, 2.2),
        ("llama-2-7b.json", 6.74, 14),
        ("llama-2-13b.json", 13.0, 26),
    ],
)
def test_rule_of_thumb_two_bytes_a_parameter_in_fp16(config, billions, fp16_gb):
    plan = plan_memory(CONFIGS / config, batch=1, context=1024, dtype="fp16", capacity=64 << 30)
    assert plan.parameters / 1e9 == pytest.approx(billions, rel=0.02)
    assert plan.weights_bytes / GB == pytest.approx(fp16_gb, rel=0.05)
    assert plan.weights_bytes == pytest.approx(2 * plan.parameters, rel=1e-6)


def test_parameter_count_matches_transformers(tiny_model):
    from transformers import AutoModelForCausalLM

    for arch in ("gpt2", "llama", "qwen2", "phi3", "gemma"):
        ckpt, _ = tiny_model(arch)
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        real = sum(p.numel() for p in model.parameters())
        assert count_parameters(json.loads((ckpt / "config.json").read_text())) == real, arch


def test_kv_cache_arithmetic():
    spec = ModelSpec.load(CONFIGS / "llama-2-7b.json")
    plan = plan_memory(spec, batch=4, context=4096, dtype="fp16", capacity=80 << 30)
    assert plan.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2  # 512 KiB a token
    assert plan.kv_bytes_per_sequence == plan.kv_bytes_per_token * 4096  # 2 GiB a sequence
    assert plan.kv_cache_bytes == 4 * plan.kv_bytes_per_sequence
    assert plan.total_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.working_bytes
    cached = plan_memory(spec, batch=4, context=4096, dtype="fp16", capacity=80 << 30, prefix_cache_bytes=8 << 30)
    assert cached.total_bytes == plan.total_bytes + (8 << 30) and cached.max_batch < plan.max_batch


def test_fits_largest_batch_and_longest_context():
    spec = ModelSpec.load(CONFIGS / "llama-2-7b.json")
    plan = plan_memory(spec, batch=1, context=4096, dtype="fp16", device="cuda", capacity=24 << 30)
    assert plan.fits is True
    assert plan.max_batch >= 1
    at_max = plan_memory(spec, batch=plan.max_batch, context=4096, dtype="fp16", device="cuda", capacity=24 << 30)
    over = plan_memory(spec, batch=plan.max_batch + 1, context=4096, dtype="fp16", device="cuda", capacity=24 << 30)
    assert at_max.fits and not over.fits
    small = plan_memory(spec, batch=1, context=4096, dtype="fp16", device="cuda", capacity=15 << 30)
    assert small.fits is False and small.max_context < 4096
    assert plan_memory(spec, batch=1, context=small.max_context, dtype="fp16", device="cuda", capacity=15 << 30).fits
    assert plan_memory(spec, dtype="fp32", capacity=16 << 30).max_batch == 0  # 27 GB of weights


def test_bad_plans():
    with pytest.raises(InvalidRequestError, match="dtype 'fp8' is not known"):
        plan_memory(CONFIGS / "llama-2-7b.json", dtype="fp8")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        plan_memory("./no/such/config")
    with pytest.raises(InvalidRequestError, match="batch must be >= 1"):
        plan_memory(CONFIGS / "llama-2-7b.json", batch=0)


def _measure(package, batch, context):
    """Predicted and measured peak in a fresh process (`nextoken memory --measure`)."""
    out = run_cli(
        "memory",
        str(package),
        "--batch",
        str(batch),
        "--context",
        str(context),
        "--measure",
        "--json",
        "--threads",
        "2",
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("batch", [1, 8])
def test_prediction_within_15_percent_of_measured_peak_on_stories260k(stories_package, batch):
    data = _measure(stories_package, batch, 256)
    assert data["fits"] is True
    # the default graph's buffer is sized for the whole request (256 positions) up front
    assert data["measured"]["kv_cache_bytes"] == batch * 256 * data["kv_bytes_per_token"]
    assert 0.85 <= data["measured"]["predicted_over_measured"] <= 1.15, data


def test_prediction_within_15_percent_for_a_larger_tiny_llama(tmp_path):
    from nextoken.exporters import export, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        tmp_path / "ckpt",
        "llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    export(ckpt, tmp_path / "pkg", progress=None)
    data = _measure(tmp_path / "pkg", 4, 512)
    assert 0.85 <= data["measured"]["predicted_over_measured"] <= 1.15, data


def test_usage_reports_kv_bytes_and_peak(llama_engine, optimum_llama):
    got = llama_engine.generate(["abc", "defgh"], max_new_tokens=5, ignore_eos=True)
    m = llama_engine.manifest
    width = max(len(c.prompt_token_ids) for c in got)
    # the default graph runs in a fixed buffer sized for the whole request up front (prompt + 5 new);
    # optimum's concatenated cache holds what was run (the last token is never fed back)
    assert got[0].usage.kv_cache_bytes == 2 * (width + 5) * m.kv_bytes_per_token()
    with Engine(optimum_llama[1], device="cpu") as concat:
        got = concat.generate(["abc", "defgh"], max_new_tokens=5, ignore_eos=True)
    assert got[0].usage.kv_cache_bytes == 2 * (width + 4) * m.kv_bytes_per_token()
    if sys.platform.startswith("linux"):
        assert got[0].usage.peak_memory_bytes > 10 << 20


def test_memory_cli_table_and_json():
    out = run_cli(
        "memory", str(CONFIGS / "smollm2-135m.json"), "--batch", "8", "--context", "1024", "--capacity", "0.4"
    )
    assert out.returncode == 0, out.stderr
    assert "fits             NO" in out.stdout and "KV cache" in out.stdout
    js = run_cli("memory", str(CONFIGS / "llama-2-7b.json"), "--dtype", "fp16", "--json")
    data = json.loads(js.stdout)
    for key in ("weights_bytes", "kv_cache_bytes", "working_bytes", "total_bytes", "fits"):
        assert key in data
    bad = run_cli("memory", str(CONFIGS / "llama-2-7b.json"), "--dtype", "fp3")
    assert bad.returncode == 1 and "dtype 'fp3' is not known" in bad.stderr
