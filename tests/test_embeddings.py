"""Embedding packages (``--task embed``): parity with transformers' pooled hidden states, the
sentence-transformers config read at export, Engine.embed's options and errors, and
``/v1/embeddings`` driven by the openai client."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from nextoken import Engine
from nextoken.errors import ContextWindowError, ExportError, InvalidRequestError
from nextoken.exporters import export, make_tiny_checkpoint
from nextoken.manifest import Manifest

from .helpers import run_cli, serving

TEXTS = ["Once upon a time", "a", "the quick brown fox jumps over the lazy dog, twice over"]


def reference(ckpt: Path, texts: list[str], engine: Engine, pooling: str, normalize: bool = True) -> np.ndarray:
    """transformers' base model over each text alone, pooled as ``pooling`` says."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    for text in texts:
        with torch.no_grad():
            hidden = model(torch.tensor([engine.encode(text)])).last_hidden_state[0].numpy()
        out.append({"last": hidden[-1], "mean": hidden.mean(axis=0), "cls": hidden[0]}[pooling])
    vectors = np.stack(out)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if normalize else vectors


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3") / "ckpt", "qwen3")


@pytest.fixture(scope="module")
def embed_package(qwen3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "pkg"
    export(qwen3, out, task="embed", progress=None)
    return out


@pytest.mark.parametrize(("arch", "pooling"), [("qwen3", "last"), ("llama", "mean"), ("gpt2", "cls")])
def test_embeddings_match_transformers_pooled_hidden_states(tmp_path, arch, pooling):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", arch)
    report = export(ckpt, tmp_path / "pkg", task="embed", pooling=pooling, progress=None)
    manifest = report.manifest
    assert manifest.task == "embed" and manifest.outputs == ("embeddings",)
    assert manifest.embedding["pooling"] == pooling and manifest.embedding["normalize"] is True
    assert report.max_abs_diff <= 1e-4 and manifest.parity["positions"] == 3  # rows of three lengths
    with Engine(tmp_path / "pkg", plugins=False) as engine:
        got = engine.embed(TEXTS)  # one batch, padded on the right
        alone = np.stack([engine.embed(t)[0] for t in TEXTS])
        expected = reference(ckpt, TEXTS, engine, pooling)
    assert got.shape == (3, 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got, alone, atol=1e-6)  # padding changes nothing


def test_a_base_models_checkpoint_builds(tmp_path, qwen3):
    """Embedding models are saved as base models (``embed_tokens.weight``, no ``model.`` prefix)."""
    import torch
    from transformers import AutoModel

    base = tmp_path / "base"
    AutoModel.from_pretrained(qwen3, dtype=torch.float32).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (qwen3 / name).is_file():
            (base / name).write_bytes((qwen3 / name).read_bytes())
    export(base, tmp_path / "pkg", task="embed", progress=None)
    with Engine(tmp_path / "pkg", plugins=False) as engine:
        np.testing.assert_allclose(engine.embed(TEXTS), reference(qwen3, TEXTS, engine, "last"), atol=1e-5)


def test_the_sentence_transformers_config_decides_pooling_normalising_and_prompts(tmp_path, qwen3):
    ckpt = tmp_path / "st"
    ckpt.mkdir()
    for p in qwen3.iterdir():
        (ckpt / p.name).write_bytes(p.read_bytes())
    (ckpt / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (ckpt / "1_Pooling").mkdir()
    (ckpt / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    (ckpt / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "Instruct: find it\nQuery: ", "document": ""}, "default_prompt_name": None})
    )
    export(ckpt, tmp_path / "pkg", task="embed", progress=None)
    spec = Manifest.load(tmp_path / "pkg").embedding
    assert spec["pooling"] == "mean" and spec["normalize"] is False  # no Normalize module
    assert spec["prompts"]["query"].startswith("Instruct") and "default_prompt" not in spec
    with Engine(tmp_path / "pkg", plugins=False) as engine:
        raw = engine.embed(TEXTS)
        assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
        np.testing.assert_allclose(raw, reference(qwen3, TEXTS, engine, "mean", normalize=False), atol=1e-5)
        queried = engine.embed("cats", prompt="query")
        np.testing.assert_allclose(queried, engine.embed("Instruct: find it\nQuery: cats"), atol=1e-6)
        with pytest.raises(InvalidRequestError, match="'passage' is not one .* names: document, query"):
            engine.embed("cats", prompt="passage")
    # a pooling the graph does not make is refused at export, by name
    (ckpt / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ExportError, match="pooling_mode_max_tokens.*--pooling"):
        export(ckpt, tmp_path / "pkg2", task="embed", progress=None)


def test_dimensions_cut_only_a_model_trained_for_it(tmp_path, qwen3, embed_package):
    with Engine(embed_package, plugins=False) as engine:
        with pytest.raises(InvalidRequestError, match="not marked as trained for shorter ones.*--truncatable"):
            engine.embed("a cat", dimensions=16)
        with pytest.raises(InvalidRequestError, match="dimensions 65 is more than this model's 64"):
            engine.embed("a cat", dimensions=65)
        assert engine.embed("a cat", dimensions=64).shape == (1, 64)
        full = engine.embed(TEXTS)
    export(qwen3, tmp_path / "mrl", task="embed", normalize=False, truncatable=True, progress=None)
    with Engine(tmp_path / "mrl", plugins=False) as engine:
        cut = engine.embed(TEXTS, dimensions=16)
        raw = engine.embed(TEXTS)
    assert cut.shape == (3, 16)
    np.testing.assert_allclose(cut, raw[:, :16], atol=1e-6)  # a prefix, not renormalised (normalize off)
    np.testing.assert_allclose(full, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_embedding_and_generation_packages_refuse_each_others_work(embed_package, stories_package):
    with Engine(embed_package, plugins=False) as engine:
        with pytest.raises(InvalidRequestError, match="embedding model.*Engine.embed or /v1/embeddings"):
            engine.generate("Once upon a time")
        with pytest.raises(InvalidRequestError, match="at least one input"):
            engine.embed([])
        with pytest.raises(ContextWindowError, match="input 1 is 20[01] tokens, over this model's 128"):
            engine.embed(["fine", "x" * 200])
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            engine.embed([[5, 999999]])
        assert engine.embed([[5, 6, 7]]).shape == (1, 64)  # token ids embed as they are
        with pytest.raises(Exception, match="keeps no KV cache"):
            Engine(embed_package, plugins=False, prefix_cache_bytes=1 << 20)
    with Engine(stories_package, plugins=False) as engine:
        with pytest.raises(InvalidRequestError, match="generates text.*--task embed"):
            engine.embed("Once upon a time")


def test_export_refuses_what_it_cannot_build_as_embeddings(tmp_path, qwen3):
    with pytest.raises(ExportError, match="--task embed is built by nextoken's own builder"):
        export(qwen3, tmp_path / "q", task="embed", quantize="int8", progress=None)
    with pytest.raises(ExportError, match="task 'classify' is not known"):
        export(qwen3, tmp_path / "q", task="classify", progress=None)


def test_the_cli_exports_an_embedding_package(tmp_path, qwen3):
    result = run_cli(
        "export", str(qwen3), "-o", str(tmp_path / "pkg"), "--task", "embed", "--pooling", "mean", "--no-normalize"
    )
    assert result.returncode == 0, result.stderr
    assert "embeddings of 64, mean pooling;" in result.stderr and "max |Δ embeddings|" in result.stderr
    spec = Manifest.load(tmp_path / "pkg").embedding
    assert spec["pooling"] == "mean" and spec["normalize"] is False


def test_v1_embeddings_with_the_openai_client(embed_package):
    with serving(embed_package, "embedder") as (client, engine, _scheduler, _url):
        expected = engine.embed(TEXTS)
        got = client.embeddings.create(model="embedder", input=TEXTS)  # the client asks for base64
        assert [d.index for d in got.data] == [0, 1, 2] and got.model == "embedder"
        np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, atol=1e-6)
        tokens = sum(len(engine.encode(t)) for t in TEXTS)
        assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
        floats = client.embeddings.create(model="embedder", input="a", encoding_format="float")
        np.testing.assert_allclose(floats.data[0].embedding, engine.embed("a")[0], atol=1e-6)
        ids = client.embeddings.create(model="embedder", input=[[5, 6, 7], [8]])
        np.testing.assert_allclose(ids.data[1].embedding, engine.embed([[8]])[0], atol=1e-6)
        import openai

        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="embedder", input="a", dimensions=8)
        assert err.value.body["param"] == "dimensions" and "Matryoshka" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="embedder", input=["a", ""])
        assert err.value.body["param"] == "input"
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="embedder", input="a", extra_body={"nextoken": {"prompt": "query"}})
        assert err.value.body["param"] == "nextoken.prompt"
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="a")
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.completions.create(model="embedder", prompt="Once", max_tokens=4)
        # the server still answers after every refusal
        assert len(client.embeddings.create(model="embedder", input="again").data) == 1


def test_concurrent_requests_are_embedded_together_and_each_gets_its_own(embed_package):
    with serving(embed_package, "embedder") as (_client, engine, _scheduler, url):
        import httpx

        texts = [f"text number {i} " * (1 + i % 5) for i in range(24)]
        expected = engine.embed(texts)
        results: dict[int, list[float]] = {}

        def ask(i: int) -> None:
            body = {"input": texts[i], "encoding_format": "float"}
            results[i] = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_allclose(np.array([results[i] for i in range(len(texts))]), expected, atol=1e-5)


def test_a_fault_in_a_shared_run_fails_only_the_request_that_brought_it(embed_package):
    """Rows of several requests run together; when that run fails, each request runs alone, so only
    the one whose rows fail gets the error."""
    from nextoken.serving.embeddings_api import EmbedBatcher

    with Engine(embed_package, plugins=False) as engine:
        embedder = engine.need_embedder()
        real = embedder.pooled
        poison, gate, calls = 99, threading.Event(), []

        def pooled(rows):
            calls.append([list(r) for r in rows])
            if rows == [[1]]:
                gate.wait(5)  # hold the thread: the next requests queue behind this one
            if any(poison in r for r in rows):
                raise InvalidRequestError("row with the poisoned token")
            return real(rows)

        embedder.pooled = pooled  # type: ignore[method-assign]
        batcher = EmbedBatcher(embedder)
        first = batcher.submit([[1]], 64)
        futures = [batcher.submit([[5, 6]], 64), batcher.submit([[7, poison]], 64), batcher.submit([[8]], 64)]
        gate.set()
        assert first.result(10).shape == (1, 64)
        assert np.allclose(futures[0].result(10), engine.embed([[5, 6]]))
        with pytest.raises(InvalidRequestError, match="poisoned"):
            futures[1].result(10)
        assert np.allclose(futures[2].result(10), engine.embed([[8]]))
        assert any(len(c) >= 3 for c in calls)  # they did share a run, which failed
        batcher.close()
