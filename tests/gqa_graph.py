"""A tiny decoder built by hand on onnxruntime's GroupQueryAttention (rotary inside), laid out the
way onnxruntime-genai's model builder lays out its graphs: input_ids, attention_mask, past KV in;
logits, present KV out; positions and key placement from the mask's row sums. With its
genai_config.json it stands in for a builder's output folder in the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, CONTEXT = 259, 64, 4, 2, 2, 128
HEAD = HIDDEN // HEADS  # 16: GroupQueryAttention needs a multiple of 16


def build_genai_folder(folder: Path, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nextoken.exporters import make_byte_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    init("emb", (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32))
    angles = np.outer(np.arange(CONTEXT), 1.0 / (10000 ** (np.arange(0, HEAD, 2) / HEAD)))
    init("cos", np.cos(angles).astype(np.float32))
    init("sin", np.sin(angles).astype(np.float32))
    init("one", np.array(1, dtype=np.int64))
    init("axis1", np.array([1], dtype=np.int64))
    nodes += [
        helper.make_node("Gather", ["emb", "input_ids"], ["x0"]),
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["mask_sum_1"]),
        helper.make_node("Cast", ["mask_sum_1"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total64"]),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB])]
    x = "x0"
    for i in range(LAYERS):
        for name, shape in (
            ("q", (HIDDEN, HEADS * HEAD)),
            ("k", (HIDDEN, KV_HEADS * HEAD)),
            ("v", (HIDDEN, KV_HEADS * HEAD)),
            ("o", (HEADS * HEAD, HIDDEN)),
        ):
            init(f"w{name}{i}", (rng.standard_normal(shape) * 0.3).astype(np.float32))
        nodes += [
            helper.make_node("MatMul", [x, f"wq{i}"], [f"q{i}"]),
            helper.make_node("MatMul", [x, f"wk{i}"], [f"k{i}"]),
            helper.make_node("MatMul", [x, f"wv{i}"], [f"v{i}"]),
            helper.make_node(
                "GroupQueryAttention",
                [
                    f"q{i}",
                    f"k{i}",
                    f"v{i}",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total",
                    "cos",
                    "sin",
                ],
                [f"a{i}", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV_HEADS,
                do_rotary=1,
            ),
            helper.make_node("MatMul", [f"a{i}", f"wo{i}"], [f"o{i}"]),
            helper.make_node("Add", [x, f"o{i}"], [f"x{i + 1}"]),
        ]
        x = f"x{i + 1}"
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}",
                    TensorProto.FLOAT,
                    ["batch_size", KV_HEADS, "past_sequence_length", HEAD],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", KV_HEADS, "total_sequence_length", HEAD]
                )
            )
    init("lm_head", (rng.standard_normal((HIDDEN, VOCAB)) * 0.5).astype(np.float32))
    nodes.append(helper.make_node("MatMul", [x, "lm_head"], ["logits"]))
    model = helper.make_model(
        helper.make_graph(nodes, "tiny-gqa", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 9
    onnx.save(model, str(folder / "model.onnx"))
    make_byte_tokenizer(folder, CONTEXT)
    (folder / "genai_config.json").write_text(
        json.dumps(
            {
                "model": {
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "pad_token_id": 0,
                    "context_length": CONTEXT,
                    "type": "llama",
                    "vocab_size": VOCAB,
                    "decoder": {
                        "filename": "model.onnx",
                        "head_size": HEAD,
                        "hidden_size": HIDDEN,
                        "num_attention_heads": HEADS,
                        "num_hidden_layers": LAYERS,
                        "num_key_value_heads": KV_HEADS,
                        "inputs": {
                            "input_ids": "input_ids",
                            "attention_mask": "attention_mask",
                            "past_key_names": "past_key_values.%d.key",
                            "past_value_names": "past_key_values.%d.value",
                        },
                        "outputs": {
                            "logits": "logits",
                            "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value",
                        },
                    },
                }
            }
        )
    )
    return folder
