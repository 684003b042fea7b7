"""nextoken's own graph builder: a checkpoint's safetensors written straight into an ONNX graph on
onnxruntime's fused operators, with no torch at all (numpy, onnx, and the checkpoint's files).

Covered: the Llama family (``llama``, ``mistral``, ``qwen2``) in fp32, where onnxruntime's
GroupQueryAttention can run the head size (a multiple of 16). Per layer:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual fused)
    -> one QKV MatMul (+ bias for qwen2) -> GroupQueryAttention (rotary inside, KV cache, causal,
       sliding window for mistral) -> MatMul -> SkipSimplifiedLayerNormalization
    -> gate and up MatMuls -> SiLU(gate) * up -> down MatMul

then the final norm, the last ``logits_to_keep`` positions only, and the LM head as a Gemm over
the embedding matrix when the checkpoint ties them (stored once). Positions come from the attention
mask (padding on the right), as in onnxruntime-genai's graphs, so continuous batching can use the
fixed-slot KV backend. Anything else is :class:`BuilderUnavailable`; ``nextoken export --backend
nextoken`` then exports optimum's graph, saying so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from nextoken.errors import ExportError

__all__ = ["BuilderUnavailable", "ARCHITECTURES", "build", "read_safetensors"]

ARCHITECTURES = ("llama", "mistral", "qwen2")

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16", "F64": np.float64}


class BuilderUnavailable(ExportError):
    """nextoken's builder does not cover this model (architecture, head size, rotary scaling ...)."""


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint's ``*.safetensors`` files as float32 numpy arrays (bf16 and
    fp16 widened), read directly: the format is an 8-byte header length, a JSON header, the data."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BuilderUnavailable(f"{folder} has no .safetensors weights")
    out: dict[str, np.ndarray] = {}
    for path in files:
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            kind = _DTYPES.get(info["dtype"])
            if kind is None:
                raise BuilderUnavailable(f"{path.name}: tensor {name} is {info['dtype']}, which the builder does not read")
            start, end = info["data_offsets"]
            raw = data[base + start: base + end]
            if kind == "bf16":
                array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=kind).astype(np.float32)
            out[name] = array.reshape(info["shape"])
    return out


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise BuilderUnavailable(f"{folder} has no config.json")
    config = json.loads(path.read_text())
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise BuilderUnavailable(f"the builder covers {', '.join(ARCHITECTURES)}, not {arch!r}")
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise BuilderUnavailable(f"rotary scaling {scaling.get('rope_type') or scaling.get('type')!r} is not built yet")
    heads = config["num_attention_heads"]
    head = config.get("head_dim") or config["hidden_size"] // heads
    if head % 16:
        raise BuilderUnavailable(f"onnxruntime's GroupQueryAttention needs a head size that is a multiple of 16, "
                                 f"and this model's is {head}")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise BuilderUnavailable(f"activation {config.get('hidden_act')!r} is not built yet")
    return config


def build(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", untie_head: bool = False) -> dict[str, Any]:
    """Write ``output``/model.onnx for the checkpoint folder ``checkpoint``; returns what the
    manifest needs (layers, heads, head size, context, vocabulary). ``untie_head``: write a tied LM
    head as a MatMul of its own (for a package about to be quantised: the quantiser then writes
    it in int4/int8, at an eighth or a quarter of the embedding's size, while the lookup stays fp32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if dtype != "fp32":
        raise BuilderUnavailable(f"the builder writes fp32 graphs; {dtype} is not built yet")
    folder, output = Path(checkpoint), Path(output)
    config = _config(folder)
    weights = read_safetensors(folder)
    arch = config["model_type"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head = config.get("head_dim") or hidden // heads
    eps = float(config.get("rms_norm_eps", 1e-6))
    context = int(config.get("max_position_embeddings", 2048))
    theta = float(config.get("rope_theta", 10000.0))
    window = config.get("sliding_window") if arch == "mistral" else None
    emb = weights["model.embed_tokens.weight"]
    vocab = emb.shape[0]
    tied = "lm_head.weight" not in weights
    if tied and untie_head:
        weights["lm_head.weight"] = emb
        tied = False

    inits: list = []
    nodes: list = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))

    def w(name: str) -> np.ndarray:
        try:
            return weights[name]
        except KeyError:
            raise BuilderUnavailable(f"the checkpoint has no weight {name}") from None

    init("embed", emb)
    inv = 1.0 / theta ** (np.arange(0, head, 2, dtype=np.float64) / head)
    angles = np.outer(np.arange(context, dtype=np.float64), inv)
    init("cos_cache", np.cos(angles).astype(np.float32))
    init("sin_cache", np.sin(angles).astype(np.float32))
    init("one", np.array(1, dtype=np.int64))
    init("axis1", np.array([1], dtype=np.int64))
    init("axis_seq", np.array([1], dtype=np.int64))
    init("big", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    init("zero1", np.array([0], dtype=np.int64))

    # positions and lengths from the mask: seqlens_k = tokens per row - 1, total = the mask's width
    node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0)
    node("Sub", ["mask_sum", "one"], ["mask_sum_1"])
    node("Cast", ["mask_sum_1"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", "one"], ["total64"])
    node("Cast", ["total64"], ["total_len"], to=TensorProto.INT32)
    node("Gather", ["embed", "input_ids"], ["h0"])

    residual, pending = "h0", None       # pending: the last block's output, not yet added to the residual
    for i in range(layers):
        p = f"model.layers.{i}."
        init(f"ln_in{i}", w(p + "input_layernorm.weight"))
        if pending is None:
            node("SimplifiedLayerNormalization", [residual, f"ln_in{i}"], [f"x{i}"], axis=-1, epsilon=eps)
        else:
            node("SkipSimplifiedLayerNormalization", [pending, residual, f"ln_in{i}"],
                 [f"x{i}", "", "", f"res{i}a"], domain="com.microsoft", epsilon=eps)
            residual = f"res{i}a"
        qkv = np.concatenate([w(p + "self_attn.q_proj.weight"), w(p + "self_attn.k_proj.weight"),
                              w(p + "self_attn.v_proj.weight")], axis=0).T
        node("MatMul", [f"x{i}", init(f"wqkv{i}", qkv)], [f"qkv{i}"])
        qkv_out = f"qkv{i}"
        if p + "self_attn.q_proj.bias" in weights:
            bias = np.concatenate([w(p + "self_attn.q_proj.bias"), w(p + "self_attn.k_proj.bias"),
                                   w(p + "self_attn.v_proj.bias")])
            node("Add", [qkv_out, init(f"bqkv{i}", bias)], [f"qkvb{i}"])
            qkv_out = f"qkvb{i}"
        attrs = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0)
        if window:
            attrs["local_window_size"] = int(window)
        node("GroupQueryAttention", [qkv_out, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                     "seqlens_k", "total_len", "cos_cache", "sin_cache"],
             [f"attn{i}", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft", **attrs)
        node("MatMul", [f"attn{i}", init(f"wo{i}", w(p + "self_attn.o_proj.weight").T)], [f"o{i}"])
        node("SkipSimplifiedLayerNormalization", [f"o{i}", residual, init(f"ln_post{i}", w(p + "post_attention_layernorm.weight"))],
             [f"m{i}", "", "", f"res{i}b"], domain="com.microsoft", epsilon=eps)
        residual = f"res{i}b"
        node("MatMul", [f"m{i}", init(f"wg{i}", w(p + "mlp.gate_proj.weight").T)], [f"g{i}"])
        node("MatMul", [f"m{i}", init(f"wu{i}", w(p + "mlp.up_proj.weight").T)], [f"u{i}"])
        node("Sigmoid", [f"g{i}"], [f"gs{i}"])
        node("Mul", [f"g{i}", f"gs{i}"], [f"silu{i}"])
        node("Mul", [f"silu{i}", f"u{i}"], [f"act{i}"])
        node("MatMul", [f"act{i}", init(f"wd{i}", w(p + "mlp.down_proj.weight").T)], [f"d{i}"])
        pending = f"d{i}"

    node("SkipSimplifiedLayerNormalization", [pending, residual, init("ln_final", w("model.norm.weight"))],
         ["final"], domain="com.microsoft", epsilon=eps)
    # only the last logits_to_keep positions reach the LM head
    node("Neg", ["logits_to_keep"], ["keep_neg"])
    node("Slice", ["final", "keep_neg", "big", "axis_seq"], ["kept"])
    if tied:
        node("Shape", ["kept"], ["kept_shape"])
        node("Slice", ["kept_shape", "zero1", init("two1", np.array([2], dtype=np.int64))], ["bs"])
        node("Reshape", ["kept", init("flat", np.array([-1, hidden], dtype=np.int64))], ["kept2d"])
        node("Gemm", ["kept2d", "embed"], ["logits2d"], transB=1)
        node("Concat", ["bs", init("vocab1", np.array([vocab], dtype=np.int64))], ["logits_shape"], axis=0)
        node("Reshape", ["logits2d", "logits_shape"], ["logits"])
    else:
        node("MatMul", ["kept", init("lm_head", w("lm_head.weight").T)], ["logits"])

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "kept_length", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch_size", kv_heads, "past_sequence_length", head]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch_size", kv_heads, "total_sequence_length", head]))
    model = helper.make_model(helper.make_graph(nodes, f"nextoken-{arch}", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="nextoken")
    model.ir_version = 9
    output.mkdir(parents=True, exist_ok=True)
    big = sum(t.nbytes for t in weights.values()) > (1 << 31) - (64 << 20)
    onnx.save(model, str(output / "model.onnx"), save_as_external_data=big, all_tensors_to_one_file=True,
              location="model.onnx_data" if big else None)
    return {"architecture": arch, "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head,
            "vocab_size": vocab, "context_length": context,
            "inputs": tuple(i.name for i in inputs), "outputs": tuple(o.name for o in outputs)}


def _local_folder(source: str, offline: bool) -> Path:
    """The checkpoint's folder: ``source`` itself, or the hub snapshot of the id ``source``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"],
                                      local_files_only=offline))
    except Exception as exc:
        raise BuilderUnavailable(f"cannot read {source!r} as a local checkpoint or a hub snapshot "
                                 f"({type(exc).__name__})") from None


def build_package(source: str, package: Path, *, check: bool = True, atol: float = 1e-3, offline: bool = False,
                  untie_head: bool = False, say=lambda _m: None):
    """A whole package at ``package`` from ``source``: the builder's graph, the tokenizer and
    config files, the manifest, and (``check``) the parity check against PyTorch, recorded."""
    import shutil
    import time
    from types import SimpleNamespace

    from nextoken.manifest import Manifest

    from .hf import PACKAGE_FILES, ExportReport, eos_ids, export_versions, parity_check, record_parity

    folder = _local_folder(source, offline)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    say(f"[1/2] building {folder.name} with nextoken's builder (fused operators, fp32) ...")
    shape = build(folder, package, untie_head=untie_head)
    seconds["build"] = round(time.perf_counter() - start, 3)
    for name in PACKAGE_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, package / name)
    config = json.loads((folder / "config.json").read_text())
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}

    def first(key: str):
        value = generation.get(key, config.get(key))
        return (value[0] if value else None) if isinstance(value, list) else value

    manifest = Manifest(
        **{k: shape[k] for k in ("architecture", "num_layers", "num_kv_heads", "head_dim", "vocab_size",
                                 "context_length", "inputs", "outputs")},
        kv_dtype="float32", eos_token_ids=eos_ids(SimpleNamespace(**config), generation),
        bos_token_id=first("bos_token_id"), pad_token_id=first("pad_token_id"), precision="fp32",
        tokenizer_file="tokenizer.json" if (package / "tokenizer.json").is_file() else None,
        source=str(source), exported_by={**export_versions(), "builder": "nextoken"}, padding_side="right",
    ).with_files(package)
    manifest.save(package)
    diff, n = float("nan"), 0
    if check:
        say("[2/2] checking ONNX logits against PyTorch (on cpu) ...")
        start = time.perf_counter()
        diff, n, _ = parity_check(str(folder), package, offline)
        seconds["parity"] = round(time.perf_counter() - start, 3)
        if not diff <= atol:
            raise ExportError(f"parity check failed: max |Δ logits| between nextoken's graph and PyTorch is {diff:.3e}, "
                              f"over the tolerance {atol:.1e}")
        manifest = record_parity(package, manifest, diff, atol, n, "cpu")
    return ExportReport(package, manifest, diff, atol, n, seconds)
