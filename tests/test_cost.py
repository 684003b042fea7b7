"""`nextoken cost`: what a workload costs, from given figures or from a measured bench run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from nextoken.tools.cost import per_answer_from_bench, per_answer_from_tokens, project


def test_a_cent_an_answer_at_a_million_answers_a_day_is_ten_thousand_dollars_a_day():
    assert project(0.01, 1_000_000)["per_day"] == pytest.approx(10_000)
    # the same from a token mix at per-token prices
    assert per_answer_from_tokens(1000, 500, 2.0, 16.0) == pytest.approx(0.01)
    out = run_cli(
        "cost",
        "--requests-per-day",
        "1000000",
        "--prompt-tokens",
        "1000",
        "--completion-tokens",
        "500",
        "--input-price",
        "2",
        "--output-price",
        "16",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["per_answer"] == pytest.approx(0.01) and data["per_day"] == pytest.approx(10_000)
    plain = run_cli("cost", "--requests-per-day", "1000000", "--per-answer", "0.01")
    assert "per day        $10,000.00" in plain.stdout


def test_cost_from_a_bench_run(stories_package, tmp_path):
    bench = tmp_path / "bench.json"
    out = run_cli(
        "bench",
        str(stories_package),
        "--batch",
        "1,2",
        "--prompt-tokens",
        "16",
        "--new",
        "16",
        "--repeat",
        "1",
        "--json",
        str(bench),
    )
    assert out.returncode == 0, out.stderr
    assert "outside%" in out.stdout
    data = json.loads(bench.read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        assert r["step_ms"] == pytest.approx(r["model_step_ms"] + r["outside_step_ms"], rel=1e-6)
    est = per_answer_from_bench(data, completion_tokens=100, hourly_rate=3.6)
    fastest = max(data["rows"], key=lambda r: r["total_tokens_per_s"])
    assert est["batch"] == fastest["batch"]
    assert est["per_answer"] == pytest.approx(est["device_seconds"] * 3.6 / 3600)
    cli = run_cli(
        "cost",
        "--requests-per-day",
        "86400",
        "--bench",
        str(bench),
        "--hourly-rate",
        "3.6",
        "--completion-tokens",
        "100",
        "--json",
    )
    got = json.loads(cli.stdout)
    assert got["per_answer"] == pytest.approx(est["per_answer"])
    assert got["basis"]["devices_needed"] == pytest.approx(est["device_seconds"])


def test_cost_errors():
    none = run_cli("cost", "--requests-per-day", "10")
    assert none.returncode == 2 and "give --per-answer" in none.stderr and "usage: nextoken cost" in none.stderr
    bad = run_cli("cost", "--requests-per-day", "10", "--bench", "/no/such.json", "--hourly-rate", "1")
    assert bad.returncode == 1 and "cannot read the bench file" in bad.stderr


def test_bench_compare_runs_each_contender_in_its_own_process(stories_package, tmp_path):
    out_json = tmp_path / "compare.json"
    result = run_cli(
        "bench",
        str(stories_package),
        "--compare",
        "optimum,transformers,genai,llamacpp",
        "--batch",
        "1",
        "--prompt-tokens",
        "8",
        "--new",
        "8",
        "--repeat",
        "1",
        "--json",
        str(out_json),
        "--threads",
        "2",
        "--spin",
        "--plot",
        str(tmp_path / "chart.png"),
        "--peers-venv",
        str(tmp_path / "no-genai-venv"),
        env={"NEXTOKEN_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert "[1/3] nextoken batch 1" in result.stderr  # progress while it runs
    data = json.loads(out_json.read_text())
    rows = {r["contender"]: r for r in data["rows"]}
    assert set(rows) == {"nextoken", "optimum", "transformers", "genai", "llamacpp"}
    for name in ("nextoken", "optimum", "transformers"):
        assert not rows[name]["error"] and rows[name]["runs"] == 1
        assert rows[name]["decode_tok_s"] > 0 and rows[name]["ttft_ms"] > 0 and rows[name]["peak_rss_bytes"] > 0
        # the same settings reached every contender, read back from each
        settings = rows[name]["settings"]
        assert settings["intra_op_threads"] == 2 and settings["inter_op_threads"] == 1 and settings["read_back"], (
            settings
        )
    assert rows["nextoken"]["settings"]["spinning"] == rows["optimum"]["settings"]["spinning"] == "1"
    assert "intra-op threads 2, inter-op threads 1, spinning 1 (read back)" in result.stdout
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "chart:" in result.stderr
    assert "its own virtual environment" in rows["genai"]["error"]
    assert (
        "needs llama-cpp-python, gguf and safetensors in a virtual environment of its own" in rows["llamacpp"]["error"]
    )
    assert data["bound_tok_s"] > 0
    assert "not run:" in result.stdout and "decode bound" in result.stdout


def test_bench_compare_at_int4(stories_package, tmp_path):
    """Every contender at int4 in blocks of 64: nextoken's package exported so (a cache entry of its
    own), llama.cpp refused (its q4_0 blocks are 32), transformers in fp32 only."""
    out_json = tmp_path / "compare.json"
    result = run_cli(
        "bench",
        str(stories_package),
        "--compare",
        "transformers,llamacpp",
        "--precision",
        "int4",
        "--block-size",
        "64",
        "--batch",
        "1",
        "--prompt-tokens",
        "8",
        "--new",
        "8",
        "--repeat",
        "1",
        "--json",
        str(out_json),
        env={"NEXTOKEN_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out_json.read_text())
    assert data["precision"] == "int4" and "-int4-" in Path(data["package"]).name
    rows = {r["contender"]: r for r in data["rows"]}
    assert rows["nextoken"]["decode_tok_s"] > 0
    assert rows["transformers"]["error"] == "compared in fp32 only (this run is int4)"
    assert rows["llamacpp"]["error"] == "llama.cpp's q8_0 and q4_0 hold blocks of 32 weights, not 64"
    manifest = json.loads(
        (tmp_path / "cache" / "packages" / data["package"].split("/")[-1] / "nextoken.json").read_text()
    )
    assert manifest["precision"] == "int4" and manifest["quantization"]["block_size"] == 64
    assert data["block_size"] == 64 and "(int4, blocks of 64)" in result.stdout


def test_gguf_conversion_for_the_llamacpp_contender(tiny_llama, tmp_path):
    """bench writes a Llama checkpoint as GGUF for llama.cpp: every weight under llama.cpp's name,
    q/k in its rotary layout (undoing the permutation gives transformers' weights back)."""
    gguf = pytest.importorskip("gguf")
    import subprocess
    import sys

    import numpy as np
    from safetensors.numpy import load_file

    from nextoken.tools import bench

    out = tmp_path / "m.gguf"
    peers = str(Path(bench.__file__).with_name("peers.py"))
    done = subprocess.run(
        [sys.executable, peers, "convert-gguf", "--model", str(tiny_llama[0]), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    hf = load_file(str(tiny_llama[0] / "model.safetensors"))
    assert len(tensors) == len(hf)
    config = json.loads((tiny_llama[0] / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def unpermute(w, n):
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    np.testing.assert_array_equal(
        unpermute(tensors["blk.0.attn_q.weight"], heads), hf["model.layers.0.self_attn.q_proj.weight"]
    )
    np.testing.assert_array_equal(
        unpermute(tensors["blk.1.attn_k.weight"], kv), hf["model.layers.1.self_attn.k_proj.weight"]
    )
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], hf["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"])
    fields = {f.name: f for f in reader.fields.values()}
    assert int(fields["llama.block_count"].parts[-1][0]) == config["num_hidden_layers"]
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == kv


GENAI_STUB = """
import json, os

RECORD = os.environ["GENAI_STUB_RECORD"]


class Config:
    def __init__(self, path):
        self.path, self.overlays = path, []

    def overlay(self, text):
        self.overlays.append(json.loads(text))
        json.dump(self.overlays, open(RECORD, "w"))


class Model:
    def __init__(self, config):
        assert isinstance(config, Config)


class GeneratorParams:
    def __init__(self, model):
        self.options = {}

    def set_search_options(self, **options):
        self.options = options


class Generator:
    def __init__(self, model, params):
        self.left = params.options["max_length"] - 4

    def append_tokens(self, prompts):
        pass

    def is_done(self):
        return self.left <= 0

    def generate_next_token(self):
        self.left -= 1
"""


def test_bench_settings_reach_onnxruntime_genai(tmp_path):
    """genai reads its session options from genai_config.json only: the runner overlays the
    comparison's threads and spinning on it (checked with a stand-in onnxruntime_genai module)."""
    import subprocess
    import sys

    from helpers import REPO

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "onnxruntime_genai.py").write_text(GENAI_STUB)
    model = tmp_path / "model"
    model.mkdir()
    (model / "genai_config.json").write_text(json.dumps({"model": {"vocab_size": 300}}))
    record = tmp_path / "overlay.json"
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "sdk" / "tools" / "peers.py"),
            "genai",
            "--model",
            str(model),
            "--batch",
            "1",
            "--prompt",
            "4",
            "--new",
            "4",
            "--threads",
            "3",
            "--spin",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(stub), "GENAI_STUB_RECORD": str(record), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    overlay = json.loads(record.read_text())[0]["model"]["decoder"]["session_options"]
    assert overlay == {
        "intra_op_num_threads": 3,
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": "1",
        "session.inter_op.allow_spinning": "1",
    }
    settings = json.loads(out.stdout)["settings"]
    assert {k: settings[k] for k in ("intra_op_threads", "inter_op_threads", "spinning", "read_back")} == {
        "intra_op_threads": 3,
        "inter_op_threads": 1,
        "spinning": "1",
        "read_back": False,
    }


def test_bench_takes_a_list_of_prompt_lengths(stories_package, tmp_path):
    bench = tmp_path / "bench.json"
    args = ["--batch", "1", "--prompt-tokens", "16,64", "--new", "8", "--repeat", "1", "--json", str(bench)]
    out = run_cli("bench", str(stories_package), *args)
    assert out.returncode == 0, out.stderr
    rows = json.loads(bench.read_text())["rows"]
    assert [(r["batch"], r["prompt_tokens"]) for r in rows] == [(1, 16), (1, 64)]
    assert all(r["prefill_ms"] > 0 for r in rows)
