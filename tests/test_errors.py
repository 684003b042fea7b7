"""Bad input gets a clear error of nextoken's own type, and the engine still serves the next request."""

from __future__ import annotations

import json
import shutil

import pytest

import nextoken
from helpers import rehash, run_cli
from nextoken import (
    ContextWindowError,
    Engine,
    ExportError,
    InvalidRequestError,
    ManifestMismatchError,
    ModelPackageError,
    NextokenError,
)


@pytest.fixture()
def package_copy(tiny_llama, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_llama[1], dst)
    return dst


def _edit_manifest(pkg, **changes):
    path = pkg / "nextoken.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelPackageError, match="does not exist"):
        Engine(tmp_path / "nowhere")


def test_directory_that_is_not_a_package(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelPackageError, match="not a nextoken model package.*nextoken export"):
        Engine(tmp_path)


def test_missing_model_file(package_copy):
    (package_copy / "model.onnx").unlink()
    with pytest.raises(ModelPackageError, match="model.onnx is missing"):
        Engine(package_copy)


def test_corrupt_graph(package_copy):
    (package_copy / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 50)
    with pytest.raises(ModelPackageError, match="model.onnx changed .its size differs"):
        Engine(package_copy)
    rehash(package_copy)  # a graph that is what its manifest says, but no graph
    with pytest.raises(ModelPackageError, match="not a loadable ONNX graph"):
        Engine(package_copy)


def test_corrupt_manifest(package_copy):
    (package_copy / "nextoken.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        Engine(package_copy)


def test_manifest_from_a_newer_nextoken(package_copy):
    _edit_manifest(package_copy, format_version=nextoken.FORMAT_VERSION + 1)
    with pytest.raises(ModelPackageError, match="upgrade nextoken"):
        Engine(package_copy)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_kv_heads": 3}, "num_kv_heads is 3 in the manifest but past_key_values.0.key has 2"),
        ({"head_dim": 7}, "head_dim is 7"),
        ({"num_layers": 1}, "num_layers is 1 in the manifest but the graph has more layers"),
        ({"num_layers": 3}, "num_layers=3 needs past_key_values.2.key"),
        ({"vocab_size": 100}, "vocab_size is 100"),
        ({"kv_dtype": "float16"}, "kv_dtype is float16"),
    ],
)
def test_manifest_that_disagrees_with_the_graph(package_copy, changes, words):
    _edit_manifest(package_copy, **changes)
    with pytest.raises(ManifestMismatchError, match=words.replace(".", r"\.")):
        Engine(package_copy)


def test_manifest_naming_an_input_the_graph_lacks(package_copy):
    data = json.loads((package_copy / "nextoken.json").read_text())
    _edit_manifest(package_copy, inputs=data["inputs"] + ["token_type_ids"])
    with pytest.raises(ManifestMismatchError, match="token_type_ids"):
        Engine(package_copy)


def _still_works(engine):
    good = engine.generate("still fine", max_new_tokens=4, ignore_eos=True)
    assert len(good.token_ids) == 4


def test_empty_prompt_starts_from_bos(llama_engine):
    assert llama_engine.tokenizer.adds_bos
    got = llama_engine.generate("", max_new_tokens=5, ignore_eos=True)
    assert got.prompt_token_ids == [1] and got.usage.prompt_tokens == 1 and len(got.token_ids) == 5


def test_empty_prompt_without_bos_is_an_error(package_copy):
    tok = json.loads((package_copy / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (package_copy / "tokenizer.json").write_text(json.dumps(tok))
    with Engine(rehash(package_copy), device="cpu") as engine:
        with pytest.raises(InvalidRequestError, match="empty.*no BOS"):
            engine.generate("")
        _still_works(engine)


@pytest.mark.parametrize(
    "request_kwargs, error, words",
    [
        (dict(prompts="x" * 300), ContextWindowError, "has 301 tokens but the model's context window is 128"),
        (dict(prompts="ok", max_new_tokens=0), InvalidRequestError, "max_new_tokens must be >= 1"),
        (dict(prompts="ok", max_new_tokens=-3), InvalidRequestError, "max_new_tokens must be >= 1"),
        (dict(prompts="ok", max_new_tokens=2.5), InvalidRequestError, "max_new_tokens must be an integer"),
        (dict(prompts="ok", temprature=0.5), InvalidRequestError, "unknown generation option.*temprature"),
        (
            dict(prompts="ok", strategy="beam"),
            InvalidRequestError,
            "unknown strategy 'beam'; registered: greedy, sample",
        ),
        (dict(prompts=[1, 5, 9999]), InvalidRequestError, r"outside the vocabulary \[0, 259\)"),
        (dict(prompts=[]), InvalidRequestError, "no prompt given"),
        (dict(prompts=["fine", ""]), None, None),
        (dict(prompts=["fine", 3.5]), InvalidRequestError, "prompt 1 must be text or a sequence of token ids"),
        (dict(prompts=["short", "y" * 200]), ContextWindowError, "prompt 1 has 201 tokens"),
    ],
)
def test_bad_requests_then_a_good_one(llama_engine, request_kwargs, error, words):
    if error is None:
        llama_engine.generate(**request_kwargs, max_new_tokens=2)
    else:
        with pytest.raises(error, match=words):
            llama_engine.generate(**request_kwargs)
    _still_works(llama_engine)


def test_errors_are_nextoken_errors():
    for cls in (ModelPackageError, ManifestMismatchError, InvalidRequestError, ContextWindowError, ExportError):
        assert issubclass(cls, NextokenError)


def test_generation_stops_at_the_context_window(llama_engine):
    prompt = llama_engine.encode("z" * 100)
    got = llama_engine.generate(prompt, max_new_tokens=100, ignore_eos=True)
    assert got.finish_reason == "context"
    assert len(prompt) + len(got.token_ids) == llama_engine.manifest.context_length


def test_export_of_a_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        nextoken.exporters.export(tmp_path / "no-such-checkpoint", tmp_path / "out", progress=None)


def test_export_of_a_directory_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        nextoken.exporters.export(tmp_path / "ckpt", tmp_path / "out", progress=None)


def test_export_of_an_architecture_without_past_support(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ExportError, match="cannot export 'bert' with past key values"):
        nextoken.exporters.export(tmp_path / "bert", tmp_path / "out", progress=None)


def test_export_into_a_directory_that_holds_other_things(tiny_llama, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an empty directory"):
        nextoken.exporters.export(tiny_llama[0], tmp_path, progress=None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli_errors_are_one_line_without_traceback(tmp_path, tiny_llama):
    cases = [
        ("generate", str(tmp_path / "nowhere"), "hi"),
        ("generate", str(tmp_path), "hi"),
        ("info", str(tmp_path / "nowhere")),
        ("generate", str(tiny_llama[1]), "x" * 300),
        ("export", str(tmp_path / "no-such-checkpoint"), "-o", str(tmp_path / "out")),
        ("export", "no-such-org/no-such-model", "-o", str(tmp_path / "out2")),
    ]
    for args in cases:
        result = run_cli(*args, env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("nextoken: error:")]
        assert len(errors) == 1, result.stderr
    bad = run_cli("generate", str(tiny_llama[1]), "hi", "--max-new-tokens", "0")
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


def test_export_of_a_hub_id_that_cannot_be_had(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ExportError, match="no-such-org/no-such-model"):
        nextoken.exporters.export("no-such-org/no-such-model", tmp_path / "out", progress=None)


def test_a_bad_flag_prints_the_commands_usage(tiny_llama):
    bad = run_cli("generate", str(tiny_llama[1]), "hi", "--bogus")
    assert bad.returncode == 2 and bad.stderr.startswith("usage: nextoken generate")
    assert "unrecognized arguments: --bogus" in bad.stderr


def test_cached_packages_are_keyed_by_what_they_are(tmp_path, tiny_llama):
    """Two models reached through the same relative path get packages of their own (the demo's and
    the bench's caches)."""
    import os

    from nextoken.exporters.hf import cache_key as _demo_key

    first = _demo_key(str(tiny_llama[0]))
    link = tmp_path / "model"
    os.symlink(tiny_llama[0], link)
    assert _demo_key(str(link)) == first  # the same model by another path
    other = tmp_path / "other"
    shutil.copytree(tiny_llama[0], other)
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    link.unlink()
    os.symlink(other, link)
    assert _demo_key(str(link)) != first  # another model at that path
    hub = _demo_key("HuggingFaceTB/SmolLM2-135M")
    assert hub.startswith("HuggingFaceTB--SmolLM2-135M-") and _demo_key("HuggingFaceTB/SmolLM2-135M", "int4") != hub
    # the exporter's own code is part of the key (a package of an older exporter is not reused);
    # the peers' builds do not depend on it
    assert _demo_key(str(tiny_llama[0]), exporter=False) != first


def test_control_characters_are_escaped_on_a_terminal():
    from nextoken.cli.common import printable as _printable

    assert _printable("a\x1b[31mb\nc\td\x00") == "a\\x1b[31mb\nc\td\\x00"


def test_demo_help_says_what_it_makes():
    assert "(default 64)" in run_cli("demo", "--help").stdout
    assert "MatMulNBits blocks of 8 or 4 bits, int8 activations per row" in " ".join(
        run_cli("export", "--help").stdout.split()
    )


def test_the_top_logprobs_table_has_a_header(tiny_llama):
    out = run_cli("generate", str(tiny_llama[1]), "hi", "--max-new-tokens", "2", "--top-logprobs", "2")
    assert out.returncode == 0 and "token" in out.stderr and "alternatives" in out.stderr


def test_exports_print_no_warning_of_optimum_about_accelerate(tiny_llama, tmp_path):
    out = run_cli("export", str(tiny_llama[0]), "-o", str(tmp_path / "pkg"))
    assert out.returncode == 0 and "accelerate" not in out.stderr, out.stderr


def test_none_and_wrong_types_in_list_fields_are_named_not_tracebacks():
    """None means "none" for the list-valued fields; another type is an error that names the field."""
    from nextoken import SamplingParams

    plain = SamplingParams(stop=None, stop_token_ids=None, processors=None, stop_conditions=None)
    assert (plain.stop, plain.stop_token_ids, plain.processors, plain.stop_conditions) == ((), (), (), ())
    for field, value in (("stop", 5), ("stop_token_ids", 5), ("processors", 5), ("stop_conditions", {"a": 1})):
        with pytest.raises(InvalidRequestError, match=field):
            SamplingParams(**{field: value})
