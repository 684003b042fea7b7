"""Packages of GroupQueryAttention graphs (onnxruntime-genai's builder layout): right padding,
batches equal to each prompt alone, the KV cache equal to recomputing, continuous batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gqa_graph import build_genai_folder

from helpers import run_cli
from nextoken import Engine, ExportError, InvalidRequestError, Scheduler
from nextoken.exporters import import_genai

PROMPTS = ["Hi", "A much longer prompt than the others", "medium one"]


@pytest.fixture(scope="module")
def gqa_engine(gqa_package):
    with Engine(gqa_package, device="cpu") as engine:
        yield engine


def test_import_writes_a_manifest_of_the_graph(gqa_package):
    m = json.loads((gqa_package / "nextoken.json").read_text())
    assert m["padding_side"] == "right" and "position_ids" not in m["inputs"]
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"], m["vocab_size"]) == (2, 2, 16, 259)
    assert m["eos_token_ids"] == [2] and m["context_length"] == 128 and m["precision"] == "fp32"


def test_cached_generation_equals_recomputing(gqa_engine):
    prompt = gqa_engine.encode("Recompute me")
    cached = gqa_engine.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
    ids = list(prompt)
    for _ in range(16):
        ids.append(int(np.argmax(gqa_engine.forward(ids)[-1])))
    assert ids[len(prompt) :] == cached


def test_right_padded_batch_equals_each_alone(gqa_engine):
    batch = gqa_engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    for prompt, got in zip(PROMPTS, batch):
        assert got.token_ids == gqa_engine.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids


@pytest.mark.parametrize("backend", ["slots", "concat"])
@pytest.mark.parametrize("chunk", [4096, 8])
def test_continuous_batching_with_right_padding(gqa_engine, chunk, backend):
    """Joins (and, with a small max_prefill_tokens, prompts prefilled in chunks over the cache)
    give each request what it gets alone, with the slot buffer and with concatenation."""
    kw = dict(max_new_tokens=12, ignore_eos=True)
    alone = [gqa_engine.generate(p, **kw).token_ids for p in PROMPTS]
    scheduler = Scheduler(gqa_engine, max_prefill_tokens=chunk, kv_backend=backend)
    assert scheduler.kv_backend == backend
    handles = []
    for p in PROMPTS:
        handles.append(scheduler.submit(p, **kw))
        for _ in range(3):
            scheduler.step()
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == alone


def test_slots_are_the_default_for_gqa_graphs_and_are_reused(gqa_engine, optimum_engine):
    """More requests than slots: each runs in a slot another request left, rows of different
    lengths decode in one call, and every request gets what it gets alone."""
    prompts = [p * (i + 1) for i, p in enumerate(PROMPTS + ["x", "yz"])]
    lengths = [5 + 3 * i for i in range(len(prompts))]
    alone = [gqa_engine.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(prompts, lengths)]
    scheduler = Scheduler(gqa_engine, max_batch=2, slot_length=96)
    assert scheduler.kv_backend == "slots" and scheduler.max_sequence_length == 96
    assert scheduler.kv_buffer_bytes == 2 * 96 * gqa_engine.manifest.kv_bytes_per_token()
    handles = [scheduler.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)]
    steps = 0
    while scheduler.step():
        assert scheduler.running <= 2
        steps += 1
    assert [h.result().token_ids for h in handles] == alone
    assert all(
        h.result().usage.kv_cache_bytes
        == (h.result().usage.prompt_tokens + n - 1) * gqa_engine.manifest.kv_bytes_per_token()
        for h, n in zip(handles, lengths)
    )
    assert scheduler.kv.slot_lengths == [0, 0]  # every slot free again
    with pytest.raises(InvalidRequestError, match=r"exceed the slot length \(96\)"):
        scheduler.submit("Hi", max_new_tokens=95)
    with pytest.raises(InvalidRequestError, match="kv_backend='slots' needs a graph with GroupQueryAttention"):
        Scheduler(optimum_engine, kv_backend="slots")
    with pytest.raises(InvalidRequestError, match="slot_length must be between 1"):
        Scheduler(gqa_engine, slot_length=100000)
    assert Scheduler(optimum_engine).kv_backend == "concat"


def test_slot_decode_runs_only_the_slots_in_use(gqa_engine, monkeypatch):
    """One request in an 8-slot scheduler decodes one row, not eight idle ones."""
    calls = []
    decode = gqa_engine.runner.decode_in_place

    def spy(slots, ids, lengths):
        calls.append(ids.shape)
        return decode(slots, ids, lengths)

    monkeypatch.setattr(gqa_engine.runner, "decode_in_place", spy)
    scheduler = Scheduler(gqa_engine, max_batch=8, slot_length=64)
    handle = scheduler.submit(PROMPTS[1], max_new_tokens=6, ignore_eos=True)
    while scheduler.step():
        pass
    assert calls == [(1, 1)] * 5
    assert handle.result().token_ids == gqa_engine.generate(PROMPTS[1], max_new_tokens=6, ignore_eos=True).token_ids


def test_import_errors(tmp_path):
    with pytest.raises(ExportError, match="no genai_config.json"):
        import_genai(tmp_path, tmp_path / "out")
    built = build_genai_folder(tmp_path / "built")
    cfg = json.loads((built / "genai_config.json").read_text())
    cfg["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.k"
    (built / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="names its KV tensors 'past.%d.k'"):
        import_genai(built, tmp_path / "out2")
    cfg["model"]["decoder"]["inputs"]["past_key_names"] = "past_key_values.%d.key"
    cfg["model"]["decoder"]["head_size"] = 8
    (built / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="multiple of 16, and this model's is 8; export it with the optimum backend"):
        import_genai(built, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


def test_bench_compare_of_an_imported_package_names_its_checkpoint(gqa_package, tiny_llama, tmp_path):
    out = tmp_path / "compare.json"
    result = run_cli(
        "bench",
        str(gqa_package),
        "--compare",
        "transformers",
        "--checkpoint",
        str(tiny_llama[0]),
        "--batch",
        "1",
        "--prompt-tokens",
        "8",
        "--new",
        "4",
        "--repeat",
        "1",
        "--json",
        str(out),
        env={"NEXTOKEN_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["checkpoint"] == str(tiny_llama[0]) and data["package"] == str(gqa_package)
    assert all(not r["error"] for r in data["rows"])


def test_export_with_the_genai_backend_runs_the_builder_in_its_own_python(tiny_llama, tmp_path):
    """A stand-in for a genai venv's python: it 'builds' by writing the hand-built folder."""
    import sys

    from nextoken.exporters import export

    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from gqa_graph import build_genai_folder\n"
        "args = sys.argv[1:]\n"
        "assert args[:2] == ['-m', 'onnxruntime_genai.models.builder'], args\n"
        "build_genai_folder(Path(args[args.index('-o') + 1]))\n"
    )
    fake.chmod(0o755)
    report = export(
        tiny_llama[0], tmp_path / "pkg", backend="genai", genai_python=str(fake), check=False, progress=None
    )
    assert report.manifest.padding_side == "right"
    with Engine(tmp_path / "pkg", device="cpu") as engine:
        assert len(engine.generate("works", max_new_tokens=5, ignore_eos=True).token_ids) == 5
    with pytest.raises(ExportError, match="needs --genai-python"):
        export(tiny_llama[0], tmp_path / "pkg2", backend="genai", progress=None)
    with pytest.raises(ExportError, match="backend 'tvm' is not known"):
        export(tiny_llama[0], tmp_path / "pkg3", backend="tvm", progress=None)


@pytest.mark.parametrize("backend", ["slots", "concat"])
def test_the_load_test_script_against_nextoken_serve(gqa_package, tmp_path, backend):
    """scripts/load_test.py, small: the CLI server with either KV backend, golden tokens,
    cancellation, a short soak and the bad requests all pass."""
    import subprocess
    import sys

    out = tmp_path / "load.json"
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent.parent / "scripts" / "load_test.py"),
            str(gqa_package),
            "--levels",
            "1,3",
            "--requests",
            "6",
            "--max-tokens",
            "6",
            "--golden",
            "24",
            "--cancel",
            "4",
            "--soak",
            "20",
            "--threads",
            "1",
            "--kv-backend",
            backend,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and report["golden"]["identical"] == 24
    # A dropped stream of this tiny model may finish before its hang-up arrives (all of them, on a fast
    # run), so only "none stays behind" is asserted here; that a hang-up cancels a request that is
    # still running is test_server's test_a_client_that_disconnects_cancels_its_request.
    assert report["cancellation"]["running_after"] == 0 and report["cancellation"]["waiting_after"] == 0
    assert [r["clients"] for r in report["throughput"]] == [1, 3]
    assert all(400 <= r["status"] < 500 and r["openai_error"] for r in report["bad_requests"])


def test_slide_in_slots(gqa_engine):
    kw = dict(max_new_tokens=180, ignore_eos=True, context_policy="slide")
    alone = gqa_engine.start(PROMPTS[1], **kw)
    want = gqa_engine.complete(alone)[0].token_ids
    assert alone.slides
    scheduler = Scheduler(gqa_engine, max_batch=3, slot_length=128)
    handles = [scheduler.submit(PROMPTS[1], **kw), scheduler.submit(PROMPTS[0], max_new_tokens=40, ignore_eos=True)]
    while scheduler.step():
        pass
    assert handles[0].result().token_ids == want and handles[0].generation.slides == alone.slides
    assert (
        handles[1].result().token_ids == gqa_engine.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True).token_ids
    )
    with pytest.raises(InvalidRequestError, match="needs slots of that length"):
        Scheduler(gqa_engine, slot_length=64).submit("x", **kw)


def test_the_genai_route_falls_back_to_the_plain_graph_where_it_does_not_apply(tiny_llama, tmp_path):
    """A builder that cannot build the model (here a stand-in that fails as the real one does for an
    architecture it lacks): the export warns and writes the optimum graph, parity-checked."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'NotImplementedError: The model is not currently supported.' >&2\nexit 1\n")
    fake.chmod(0o755)
    lines: list[str] = []
    from nextoken.exporters import export

    report = export(tiny_llama[0], tmp_path / "pkg", backend="genai", genai_python=str(fake), progress=lines.append)
    warning = [line for line in lines if line.startswith("warning: the genai backend does not apply here")]
    assert warning and "not currently supported" in warning[0]
    assert report.manifest.padding_side == "left" and report.max_abs_diff < 1e-3
    with pytest.raises(ExportError, match="needs --genai-python"):  # a missing environment is no fallback
        export(tiny_llama[0], tmp_path / "pkg2", backend="genai", genai_python=None, progress=None)
