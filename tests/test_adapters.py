"""LoRA adapters chosen per request: a package exported with LoRA inputs, adapters made from PEFT
checkpoints, each row's logits against transformers + PEFT with that adapter, rows with different
adapters (and none) in one batch against each alone, and every refusal named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nextoken import Engine, InvalidRequestError, SamplingParams, Scheduler
from nextoken.errors import ExportError, ModelPackageError
from nextoken.exporters import export, make_tiny_checkpoint
from nextoken.exporters.adapters import make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> (rank, alpha, PEFT target modules, seed, rsLoRA)
ADAPTERS = {
    "all": (8, 16, ALL, 1, False),
    "qv": (4, 8, ["q_proj", "v_proj"], 2, True),
    "mlp": (8, 4, ["gate_proj", "up_proj", "down_proj"], 3, False),
}
IDS = [1, 5, 9, 33, 100, 7, 2, 64, 200, 11]


def _peft(ckpt: Path, out: Path, rank: int, alpha: float, targets: list[str], seed: int, rslora: bool):
    """A PEFT LoRA model over ``ckpt`` with random A and B (PEFT's own B starts at zero), saved at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, checkpoint, package taking 4 adapters of rank <= 8 on every projection, {name: (PEFT model, adapter)})."""
    root = tmp_path_factory.mktemp("lora")
    ckpt = make_tiny_checkpoint(root / "ckpt", "llama")
    package = root / "pkg"
    export(ckpt, package, progress=None, lora_adapters=4, lora_rank=8, lora_targets=[t[:-5] for t in ALL])
    adapters = {}
    for name, (rank, alpha, targets, seed, rslora) in ADAPTERS.items():
        model = _peft(ckpt, root / f"peft-{name}", rank, alpha, targets, seed, rslora)
        adapters[name] = (model, make_adapter(root / f"peft-{name}", package, root / f"adapter-{name}"))
    return root, ckpt, package, adapters


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def _engine(made, **kwargs) -> Engine:
    _root, _ckpt, package, adapters = made
    return Engine(package, device="cpu", plugins=False, adapters={n: a for n, (_m, a) in adapters.items()}, **kwargs)


def test_each_adapter_matches_transformers_with_peft(made):
    import torch

    _root, _ckpt, _package, adapters = made
    with _engine(made) as engine:
        assert engine.adapters == sorted(ADAPTERS)
        for name, (model, _adapter) in adapters.items():
            with torch.no_grad():
                want = model(torch.tensor([IDS])).logits[0].numpy()
            got = engine.forward(IDS, adapter=name)
            assert np.abs(got - want).max() <= 1e-4, name
            assert np.abs(want - engine.forward(IDS)).max() > 0.05, name  # the adapter changes the logits
            tokens = engine.generate(IDS, max_new_tokens=8, temperature=0, ignore_eos=True, adapter=name).token_ids
            assert tokens == _greedy(model, IDS, 8), name
        with torch.no_grad(), model.disable_adapter():
            base = model(torch.tensor([IDS])).logits[0].numpy()
        assert np.abs(engine.forward(IDS) - base).max() <= 1e-4  # no adapter: the base model


@pytest.mark.parametrize("backend", ["slots", "concat"])
def test_rows_with_different_adapters_in_one_batch_equal_each_alone(made, backend):
    prompts = [[1, 5, 9, 33], [7, 2, 64, 200, 11, 3], [100, 7], [9, 9, 4, 5, 6]]
    names = ["all", "qv", None, "mlp"]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with _engine(made) as engine:
        alone = [engine.generate(p, params, adapter=n).token_ids for p, n in zip(prompts, names)]
        assert len({tuple(a) for a in alone}) == len(alone)
        scheduler = Scheduler(engine, max_batch=4, kv_backend=backend)
        handles = [scheduler.submit(p, params, adapter=n) for p, n in zip(prompts, names)]
        scheduler.step()
        assert scheduler.running == 4  # all four rows in one batch from the first step
        while not all(h.done for h in handles):
            scheduler.step()
        together = [h.result().token_ids for h in handles]
    assert together == alone


def test_adapters_are_refused_by_name(made, tmp_path, tiny_model):
    root, ckpt, package, adapters = made
    with _engine(made) as engine:
        with pytest.raises(InvalidRequestError, match=r"adapter 'nope' is not loaded \(loaded: all, mlp, qv\)"):
            engine.generate("Hi", max_new_tokens=2, adapter="nope")
        with pytest.raises(InvalidRequestError, match="loaded already"):
            engine.load_adapter("all", adapters["all"][1])
        engine.load_adapter("fourth", adapters["qv"][1])
        with pytest.raises(InvalidRequestError, match="all 4 adapter slots are taken"):
            engine.load_adapter("fifth", adapters["qv"][1])
        scheduler = Scheduler(engine, max_batch=2)
        handle = scheduler.submit("Hi", SamplingParams(max_new_tokens=2), adapter="fourth")  # queued: holds it
        with pytest.raises(InvalidRequestError, match="requests in hand"):
            engine.unload_adapter("fourth")
        with scheduler.start():
            handle.result(timeout=60)
        engine.unload_adapter("fourth")
        engine.load_adapter("fifth", adapters["mlp"][1])  # the freed slot serves another
        assert engine.generate("Hi", max_new_tokens=2, adapter="fifth").token_ids
    import shutil

    broken = shutil.copytree(adapters["qv"][1], tmp_path / "nan")
    with np.load(broken / "adapter.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["lora.0.q.a"][0, 0] = np.nan
    np.savez(broken / "adapter.npz", **arrays)
    with (
        _engine(made) as engine,
        pytest.raises(InvalidRequestError, match="lora.0.q.a holds values that are not finite"),
    ):
        engine.load_adapter("broken", broken)
    (broken / "adapter.npz").write_bytes(b"not an archive")
    with _engine(made) as engine, pytest.raises(ModelPackageError, match="the adapter cannot be read"):
        engine.load_adapter("broken", broken)
    _ckpt, plain = tiny_model("llama")
    with Engine(plain, device="cpu", plugins=False) as engine:
        with pytest.raises(InvalidRequestError, match="takes no LoRA adapters"):
            engine.generate("Hi", max_new_tokens=2, adapter="all")
        with pytest.raises(InvalidRequestError, match="takes no LoRA adapters"):
            engine.load_adapter("all", adapters["all"][1])
    with pytest.raises(ExportError, match="takes no adapters"):
        make_adapter(root / "peft-all", plain, tmp_path / "x")
    _peft(ckpt, tmp_path / "r16", 16, 16, ["q_proj"], 4, False)
    with pytest.raises(ExportError, match="rank 16 is over the package's 8.*--lora-rank 16"):
        make_adapter(tmp_path / "r16", package, tmp_path / "x")
    narrow = tmp_path / "narrow"
    export(ckpt, narrow, progress=None, lora_adapters=2, lora_rank=8, lora_targets=["q", "v"])
    with pytest.raises(
        ExportError,
        match="trains self_attn.k_proj, self_attn.o_proj, mlp.gate_proj, .* --lora-targets q,k,v,o,gate,up,down",
    ):
        make_adapter(root / "peft-all", narrow, tmp_path / "x")
    with Engine(narrow, device="cpu", plugins=False) as engine:  # made for the other package
        with pytest.raises(InvalidRequestError, match="was made for another package"):
            engine.load_adapter("qv", adapters["qv"][1])
    with pytest.raises(ExportError, match="LoRA inputs"):
        export(ckpt, tmp_path / "gpt2", progress=None, backend="optimum", lora_adapters=2)


def test_an_int4_base_takes_adapters(made, tmp_path):
    """int4 weights, fp32 adapter pairs (MatMulNBits quantises initializers only; the pairs are inputs):
    the adapter changes the answer, and rows with and without it batch as they run alone."""
    import onnx

    root, ckpt, _package, _adapters = made
    package = tmp_path / "int4"
    report = export(
        ckpt, package, progress=None, quantize="int4", lora_adapters=2, lora_rank=8, lora_targets=["q", "v"]
    )
    assert report.manifest.lora == {"adapters": 2, "rank": 8, "targets": ["q", "v"]}
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    assert {n.op_type for n in graph.node} >= {"MatMulNBits", "Gather"}
    assert all(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input if i.name.startswith("lora.")
    )
    adapter = make_adapter(root / "peft-qv", package, tmp_path / "qv")
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with Engine(package, device="cpu", plugins=False, adapters={"qv": adapter}) as engine:
        assert np.abs(engine.forward(IDS, adapter="qv") - engine.forward(IDS)).max() > 0.05
        alone = [engine.generate(IDS, params, adapter=n).token_ids for n in ("qv", None)]
        scheduler = Scheduler(engine, max_batch=2)
        handles = [scheduler.submit(IDS, params, adapter=n) for n in ("qv", None)]
        while not all(h.done for h in handles):
            scheduler.step()
        assert [h.result().token_ids for h in handles] == alone


def test_stories260k_with_an_adapter_matches_peft(stories_dir, tmp_path):
    """Real weights, heads of 8 stored as 16 (attention's output rows padded in the adapter too)."""
    import torch

    package = tmp_path / "pkg"
    export(stories_dir, package, progress=None, lora_adapters=1, lora_rank=8, lora_targets=[t[:-5] for t in ALL])
    model = _peft(stories_dir, tmp_path / "peft", 8, 8, ALL, 0, False)
    adapter = make_adapter(tmp_path / "peft", package, tmp_path / "adapter")
    with Engine(package, device="cpu", plugins=False, adapters={"tuned": adapter}) as engine:
        ids = engine.encode("Once upon a time, there was a little girl named Lily.")
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(engine.forward(ids, adapter="tuned") - want).max() <= 1e-4
        got = engine.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, adapter="tuned").token_ids
        assert got == _greedy(model, ids, 12)


def test_the_server_serves_adapters_by_model_name(made):
    import anthropic
    import httpx
    import openai

    from helpers import TEMPLATE, serving, with_chat_template

    root, _ckpt, package, adapters = made
    package = with_chat_template(package, root / "chat", TEMPLATE)  # the same graph: the adapters fit it
    key = "adapter-key"
    given = {"adapters": {"all": adapters["all"][1], "qv": adapters["qv"][1]}}
    with serving(package, "tiny", engine_options=given, api_key=key, runtime_adapters=True) as (
        client,
        engine,
        _s,
        base,
    ):
        listed = {m.id: m.model_extra for m in client.models.list().data}
        assert list(listed) == ["tiny", "all", "qv"] and listed["qv"]["parent"] == "tiny"
        for model, adapter in (("tiny", None), ("all", "all"), ("qv", "qv")):
            want = engine.generate("Hello", max_new_tokens=6, temperature=0, ignore_eos=True, adapter=adapter).text
            got = client.completions.create(
                model=model, prompt="Hello", max_tokens=6, temperature=0, extra_body={"nextoken": {"ignore_eos": True}}
            )
            assert got.model == model and got.choices[0].text == want
        with pytest.raises(openai.NotFoundError, match="'tiny', 'all', 'qv'"):
            client.completions.create(model="nope", prompt="Hello", max_tokens=2)
        said = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0).messages.create(
            model="qv", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )
        assert said.model == "qv"
        auth = {"Authorization": f"Bearer {key}"}
        load = {"lora_name": "mlp", "lora_path": str(adapters["mlp"][1])}
        assert httpx.post(f"{base}/v1/load_lora_adapter", json=load).status_code == 401
        loaded = httpx.post(f"{base}/v1/load_lora_adapter", json=load, headers=auth, timeout=30)
        assert loaded.status_code == 200 and loaded.json()["adapters"] == ["all", "mlp", "qv"]
        got = client.completions.create(model="mlp", prompt="Hello", max_tokens=3)
        assert got.model == "mlp"
        bad = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root)}, headers=auth)
        assert bad.status_code == 400 and "not a nextoken adapter" in bad.json()["error"]["message"]
        gone = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "mlp"}, headers=auth)
        assert gone.status_code == 200 and "mlp" not in gone.json()["adapters"]
        missing = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "mlp"}, headers=auth)
        assert missing.status_code == 404
    with serving(package, "tiny", api_key=key) as (_client, _engine, _s, base):
        off = httpx.post(f"{base}/v1/load_lora_adapter", json=load, headers={"Authorization": f"Bearer {key}"})
        assert off.status_code == 403 and "--runtime-adapters" in off.json()["error"]["message"]


def test_the_cli_exports_makes_and_uses_adapters(made, tmp_path):
    from helpers import run_cli

    root, ckpt, _package, _adapters = made
    package = tmp_path / "pkg"
    out = run_cli(
        "export", str(ckpt), "-o", str(package), "--lora-adapters", "2", "--lora-rank", "4", "--lora-targets", "q,v"
    )
    assert out.returncode == 0, out.stderr
    made_one = run_cli("adapter", str(root / "peft-qv"), "--package", str(package), "-o", str(tmp_path / "qv"))
    assert made_one.returncode == 0 and "adapter for" in made_one.stderr, made_one.stderr
    too_big = run_cli("adapter", str(root / "peft-all"), "--package", str(package), "-o", str(tmp_path / "all"))
    assert too_big.returncode != 0 and "rank 8 is over the package's 4" in too_big.stderr
    assert "Traceback" not in too_big.stderr
    refused = run_cli("serve", str(package), "--runtime-adapters")
    assert refused.returncode != 0 and "--api-key" in refused.stderr
    with Engine(package, device="cpu", plugins=False, adapters={"qv": tmp_path / "qv"}) as engine:
        assert engine.generate("Hi", max_new_tokens=3, adapter="qv").token_ids
    info = run_cli("info", str(package), "--json", "--device", "cpu")
    assert json.loads(info.stdout)["lora"] == {"adapters": 2, "rank": 4, "targets": ["q", "v"]}


def test_a_preempted_request_comes_back_with_its_adapter(made):
    """Under a KV budget that preempts, and with the prefix cache on, every request (adapters
    mixed, one without) gets what an engine without the cache gives it alone: a row prefilled in
    chunks or again after preemption runs with its own adapter, and an adapter's prompt is never
    served from (nor stored in) the base model's cache."""
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 250, size=int(k))] for k in rng.integers(20, 120, size=5)]
    names = ["all", "qv", None, "mlp", "all"]
    new = 40
    with _engine(made) as plain:
        alone = [
            plain.generate(p, max_new_tokens=new, ignore_eos=True, adapter=n).token_ids for p, n in zip(prompts, names)
        ]
        base = plain.generate(prompts[0], max_new_tokens=new, ignore_eos=True).token_ids
    with _engine(made, prefix_cache_bytes=8 << 20) as engine:
        probe = Scheduler(engine, max_batch=8)
        budget = max(probe._entry_bytes([p + [0] * (new - 1)]) for p in prompts) * 3 // 2
        scheduler = Scheduler(engine, max_batch=8, kv_budget=budget)
        handles = [scheduler.submit(p, max_new_tokens=new, ignore_eos=True, adapter=n) for p, n in zip(prompts, names)]
        while scheduler.step():
            pass
        assert scheduler.preempted >= 1
        assert [h.result().token_ids for h in handles] == alone
        again = scheduler.submit(prompts[0], max_new_tokens=new, ignore_eos=True)  # the base model, where "all" ran
        while scheduler.step():
            pass
        assert again.result().token_ids == base


def test_an_fp16_base_takes_adapters_within_fp16s_tolerance(made, tmp_path):
    """fp16 weights, activations and pairs (the CUDA precision; on the CPU through casts): each
    adapter's logits within the export's fp16 bound of PEFT's fp32 ones."""
    import torch

    from nextoken.exporters.package import FP16_RTOL

    root, ckpt, _package, adapters = made
    package = tmp_path / "fp16"
    export(ckpt, package, progress=None, dtype="fp16", lora_adapters=2, lora_rank=8, lora_targets=[t[:-5] for t in ALL])
    adapter = make_adapter(root / "peft-all", package, tmp_path / "all")
    with Engine(package, device="cpu", plugins=False, adapters={"all": adapter}) as engine:
        with torch.no_grad():
            want = adapters["all"][0](torch.tensor([IDS])).logits[0].numpy()
        got = engine.forward(IDS, adapter="all")
        assert np.abs(got - want).max() <= FP16_RTOL * np.abs(want).max()


def test_several_models_serve_each_adapter_with_the_model_it_was_made_for(made, tiny_model, tmp_path):
    """Several models in one server: each adapter goes with the package it was made for (its graph's
    checksum), /v1/models lists it with its parent, a request for it loads that model (another one
    unloaded within the budget) and answers as the model served alone with that adapter; an adapter
    made for none of the models is refused by name; the plan counts the adapter slots."""
    import openai

    from helpers import running_app
    from nextoken.pool import ModelPool
    from nextoken.serving.core import ServeOptions
    from nextoken.serving.router import attach_app, close_app, create_router
    from nextoken.tools.memory import plan_memory

    root, _ckpt, package, adapters = made
    other = tiny_model("qwen2")[1]
    plan = plan_memory(package, 2, 128)
    assert plan.adapter_bytes > 0 and "LoRA adapters" in plan.table()
    assert plan_memory(other, 2, 128).adapter_bytes == 0
    given = {"all": adapters["all"][1], "qv": adapters["qv"][1]}
    options = ServeOptions()
    kwargs = dict(max_batch=2, engine_options={"device": "cpu", "plugins": False}, on_load=attach_app(options))
    probe = ModelPool({"base": package, "other": other}, budget=1 << 40, **kwargs)
    planned = {d["id"]: d["planned_bytes"] for d in probe.describe()}
    budget = max(planned.values())  # one model at a time: a request for an adapter loads its model
    pool = ModelPool({"base": package, "other": other}, budget, adapters=given, on_unload=close_app, **kwargs)
    assert pool.adapters == {"all": "base", "qv": "base"} and pool.model_of("qv") == "base"
    with Engine(package, device="cpu", plugins=False, adapters=given) as engine:
        want = {
            name: engine.generate("Hello", max_new_tokens=6, temperature=0, ignore_eos=True, adapter=adapter).text
            for name, adapter in (("base", None), ("all", "all"), ("qv", "qv"))
        }
    with running_app(create_router(pool, options), join_s=20) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        for name in ("all", "other", "qv", "base", "other", "all"):
            got = client.completions.create(
                model=name, prompt="Hello", max_tokens=6, temperature=0, extra_body={"nextoken": {"ignore_eos": True}}
            )
            assert got.model == name
            if name != "other":
                assert got.choices[0].text == want[name], name
            assert pool.held_bytes <= pool.budget
        listed = {m.id: m.model_extra for m in client.models.list().data}
        assert list(listed) == ["base", "other", "all", "qv"] and listed["qv"]["parent"] == "base"
        assert client.models.retrieve("all").model_extra["parent"] == "base"
        with pytest.raises(openai.NotFoundError, match="base, other, all, qv"):
            client.completions.create(model="nope", prompt="Hello", max_tokens=2)
    pool.close()
    with pytest.raises(InvalidRequestError, match="adapter stray .* none of the models here"):
        ModelPool({"other": other}, 1 << 40, adapters={"stray": adapters["qv"][1]}, **kwargs)
    with pytest.raises(InvalidRequestError, match="a model of that name is served already"):
        ModelPool({"base": package}, 1 << 40, adapters={"base": adapters["qv"][1]}, **kwargs)
    with pytest.raises(InvalidRequestError, match="not a nextoken adapter"):
        ModelPool({"base": package}, 1 << 40, adapters={"x": str(root)}, **kwargs)
