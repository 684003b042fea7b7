"""Weight quantisation of an exported package, with its accuracy measured against fp32.

Both methods are onnxruntime's MatMulNBits: symmetric blocks of ``block_size`` weights along the
input axis with one fp32 scale each, 8 bits (``int8``) or 4 (``int4``), computed with int8
activations quantised per row and block (accuracy_level 4), so a row's result never depends on the
other rows of its batch. Dynamic quantisation (DynamicQuantizeMatMul: one activation scale per
tensor) was the int8 before: its prefill was twice as fast (135M Llama, prompt 128: TTFT 37 against
74 ms) and batch 8 decoded 14% faster, but a request's tokens then depended on its neighbours in a
batch (batch != alone on five of the six tiny architectures), which continuous batching cannot
allow; MatMulNBits 8-bit is also closer to fp32 there (64/64 greedy tokens identical against 10/64,
mean |Δ logit| 0.009 against 0.014) and decodes at batch 1 as fast (138 against 136 tok/s).
Embedding lookups stay fp32, except where the builder untied a tied LM head for quantisation: the
lookup then reads the head's quantised blocks (:func:`share_embedding`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from nextoken.errors import ExportError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "QUANTIZATIONS",
    "Accuracy",
    "check_method",
    "compare_accuracy",
    "quantize_experts",
    "quantize_model",
    "quantize_package",
    "share_embedding",
]

QUANTIZATIONS = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 32
_TWO_GB = 2 << 30


@dataclass
class Accuracy:
    """How a quantised package compares with its fp32 original on one sample.

    ``greedy_agreement``: of ``tokens`` greedy tokens, how many the quantised model produces
    identically before the first difference. ``teacher_forced_agreement``: the fraction of those
    positions where both models' top token agrees when both read the fp32 model's tokens.
    ``mean_abs_logit_diff`` / ``max_abs_logit_diff``: over all positions of that sequence.
    """

    tokens: int
    greedy_agreement: int
    teacher_forced_agreement: float
    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    #: the MatMuls (by the activation they read) given fp32 activations by :func:`activation_remedy`,
    #: and its measurement: mean |Δ logit| against fp32 with int8 activations everywhere, with fp32
    #: activations everywhere, and as shipped
    fp32_activations: tuple[str, ...] = ()
    remedy: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        line = (
            f"greedy {self.greedy_agreement}/{self.tokens} identical, teacher-forced agreement "
            f"{100 * self.teacher_forced_agreement:.1f}%, mean |Δ logit| {self.mean_abs_logit_diff:.4f} "
            f"(max {self.max_abs_logit_diff:.3f})"
        )
        if self.fp32_activations:
            r = self.remedy or {}
            line += (
                f"; {len(self.fp32_activations)} of {r.get('matmuls')} MatMuls keep fp32 activations "
                f"({', '.join(self.fp32_activations[:4])}{', ...' if len(self.fp32_activations) > 4 else ''}: "
                f"int8 activations there took mean |Δ logit| from {r.get('fp32_activations'):.4f} to "
                f"{r.get('int8_activations'):.4f})"
            )
        return line


def check_method(method: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Refuse an unknown method or an unusable block size before any export work."""
    if method not in QUANTIZATIONS:
        raise ExportError(f"quantisation {method!r} is not known; use {' or '.join(QUANTIZATIONS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"{method} block size must be a power of two >= 16, not {block_size}")


def quantize_model(source: Path, target: Path, method: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Write the ``method``-quantised ``source`` model.onnx to ``target``."""
    check_method(method, block_size)
    # Over 2 GB (the protobuf limit) the weights go to an external data file beside model.onnx.
    big = sum(p.stat().st_size for p in source.parent.iterdir() if p.name.startswith(source.name)) > _TWO_GB
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        from .builder import ROUTER

        bits = 8 if method == "int8" else 4
        model = onnx.load(str(source))
        routers = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith(ROUTER)]
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4, nodes_to_exclude=routers
        )
        quantizer.process()
        quantize_experts(quantizer.model.model, block_size, bits)
        share_embedding(quantizer.model.model, block_size, bits)
        quantizer.model.save_model_to_file(str(target), use_external_data_format=big)
    except ImportError as exc:
        raise ExportError(
            f"quantising needs {exc.name}; install the export extra: pip install 'nextoken[export]'"
        ) from None
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"onnxruntime could not quantise the model to {method}: {type(exc).__name__}: {exc}"
        ) from None


def _blocks(w, block_size: int, bits: int):
    """``w`` [..., N, K] as symmetric ``bits``-bit blocks of ``block_size`` along K, as MatMulNBits'
    own quantiser makes them: the block's largest magnitude maps to -2^(bits-1), so the whole
    range is used (its scale may be negative). Returns the bytes [..., N, K * bits / 8] (two 4-bit
    values a byte, the first in the low nibble; zero point 2^(bits-1), the default) and one scale a
    block [..., N, K / block_size]."""
    import numpy as np

    half = 1 << (bits - 1)
    blocks = w.astype(np.float32).reshape(*w.shape[:-1], w.shape[-1] // block_size, block_size)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scale = peak / -half
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(blocks / scale[..., None]), -half, half - 1) + half).astype(np.uint8).reshape(w.shape)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scale.astype(np.float32)


def quantize_experts(model, block_size: int, bits: int = 4) -> int:
    """Rewrite each MoE node (the builder's experts, float) as QMoE over ``bits``-bit blocks of
    ``block_size`` along each expert's input, with int8 activations as the MatMulNBits beside it
    (accuracy_level 4). Returns how many it rewrote."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = 0
    for index, moe in enumerate(list(graph.node)):
        if moe.op_type != "MoE":
            continue
        names = []
        for slot in (2, 4):
            weight = numpy_helper.to_array(inits[moe.input[slot]])
            if weight.shape[-1] % block_size:
                raise ExportError(
                    f"the experts' inputs ({weight.shape[-1]}) are not a multiple of the block size "
                    f"{block_size}; choose a block size that divides them"
                )
            packed, scale = _blocks(weight, block_size, bits)
            graph.initializer.remove(inits[moe.input[slot]])
            graph.initializer.extend(
                [
                    numpy_helper.from_array(packed, f"{moe.input[slot]}_q{bits}"),
                    numpy_helper.from_array(scale, f"{moe.input[slot]}_scales"),
                ]
            )
            names += [f"{moe.input[slot]}_q{bits}", f"{moe.input[slot]}_scales"]
        attrs = {a.name: helper.get_attribute_value(a) for a in moe.attribute}
        bias = [moe.input[slot] if len(moe.input) > slot else "" for slot in (3, 5)]
        qmoe = helper.make_node(
            "QMoE",
            [moe.input[0], moe.input[1], names[0], names[1], bias[0], names[2], names[3], bias[1]],
            list(moe.output),
            name=f"{moe.name}_q{bits}",
            domain="com.microsoft",
            **attrs,
            expert_weight_bits=bits,
            block_size=block_size,
            accuracy_level=4,
        )
        graph.node.remove(moe)
        graph.node.insert(index, qmoe)
        done += 1
    return done


def share_embedding(model, block_size: int, bits: int = 4) -> bool:
    """In a graph whose tied LM head was untied for quantisation (the builder's ``TIED_HEAD``), let
    the embedding lookup read the head's quantised blocks (GatherBlockQuantized over the same
    bytes, reshaped) and drop the fp32 embedding: one ``bits``-bit copy of the matrix instead of a
    quantised one and a 32-bit one. True when it did."""
    import numpy as np
    from onnx import helper, numpy_helper

    from .builder import TIED_HEAD

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{TIED_HEAD}_Q{bits}"), None)
    index, gather = next(
        ((i, n) for i, n in enumerate(graph.node) if n.op_type == "Gather" and n.input[0] == "embed"), (None, None)
    )
    if head is None or gather is None or index is None or "embed" not in inits or head.input[1] not in inits:
        return False
    vocab, blocks = inits[head.input[1]].dims[:2]
    hidden = next(a.i for a in head.attribute if a.name == "K")
    # a hidden size the blocks do not divide is padded to whole blocks: the rows gathered are that
    # wide, and cut back to the hidden size (576 in blocks of 128: 640 read, 576 kept)
    padded = blocks * block_size != hidden
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), "embed_q4_shape"))
    extra = [head.input[3]] if len(head.input) > 3 and head.input[3] else []  # zero points, if any
    rows = [f"{gather.output[0]}_padded"] if padded else list(gather.output)
    nodes = [
        helper.make_node("Reshape", [head.input[1], "embed_q4_shape"], ["embed_q4"], name="embed_q4_Reshape"),
        helper.make_node(
            "GatherBlockQuantized",
            ["embed_q4", gather.input[1], head.input[2], *extra],
            rows,
            name="embed_GatherBlockQuantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block_size,
            bits=bits,
        ),
    ]
    if padded:
        cut = {"embed_q4_starts": 0, "embed_q4_ends": hidden, "embed_q4_axes": -1}
        graph.initializer.extend(numpy_helper.from_array(np.array([v], dtype=np.int64), k) for k, v in cut.items())
        nodes.append(helper.make_node("Slice", [rows[0], *cut], list(gather.output), name="embed_q4_Slice"))
    del graph.node[index]
    for offset, new in enumerate(nodes):
        graph.node.insert(index + offset, new)
    graph.initializer.remove(inits["embed"])
    return True


def greedy_sample(ref, prompt: str, tokens: int) -> tuple[list[int], list[int]]:
    """The ids of ``prompt`` (random ids without a tokenizer) and the fp32 engine ``ref``'s
    ``tokens`` greedy tokens after them: the sequence every accuracy figure reads."""
    import numpy as np

    ids = ref.encode(prompt) if ref.tokenizer is not None else []
    if not ids:
        ids = [int(i) for i in np.random.default_rng(0).integers(0, ref.manifest.vocab_size, size=12)]
    ids = ids[: max(1, ref.manifest.context_length - tokens)]
    return ids, ref.generate(ids, max_new_tokens=tokens, ignore_eos=True).token_ids


def first_difference(expected: list[int], got: list[int]) -> int:
    """How many of ``expected``'s tokens ``got`` has identically before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), len(expected))


def compare_accuracy(fp32_package: Path, quantized_package: Path, prompt: str, tokens: int = 64) -> Accuracy:
    """Greedy and teacher-forced agreement, and logit differences, of two packages on ``prompt``."""
    import numpy as np

    from nextoken.engine import Engine

    # Both are checked by the export itself (the quantised one's manifest is rewritten afterwards).
    with (
        Engine(fp32_package, device="cpu", plugins=False, verify=False) as ref,
        Engine(quantized_package, device="cpu", plugins=False, verify=False) as q,
    ):
        ids, expected = greedy_sample(ref, prompt, tokens)
        got = q.generate(ids, max_new_tokens=tokens, ignore_eos=True).token_ids
        same = first_difference(expected, got)
        seq = ids + expected[:-1]
        a, b = ref.forward(seq), q.forward(seq)
        gen = slice(len(ids) - 1, len(seq))
        forced = float(np.mean(a[gen].argmax(-1) == b[gen].argmax(-1)))
        diff = np.abs(a - b)
    return Accuracy(len(expected), same, forced, float(diff.mean()), float(diff.max()))


#: int8 activations (MatMulNBits' accuracy_level 4) are blamed when they make the logits' mean
#: |Δ| against fp32 more than this many times what the same weights give with fp32 activations
#: (they add a few percent where activations are tame; models with very large activations flip
#: greedy tokens, onnxruntime issue 29849)
ACTIVATION_EXCESS = 1.25


def _activation_errors(fp32_package: Path, names: list[str], ids: list[int], block_size: int) -> dict[str, float]:
    """For each activation in ``names`` (tensors of the fp32 graph), the relative error that int8
    quantisation per row and block of ``block_size`` (what accuracy_level 4 does) makes on ``ids``
    in the output of the MatMuls reading it (in the activation itself where no plain MatMul does,
    e.g. the experts)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_package / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    readers = {
        name: [
            n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == name and n.input[1] in inits
        ]
        for name in names
    }
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    probe = fp32_package / "probe.onnx"  # beside model.onnx_data, which it reads
    onnx.save(model, str(probe))
    from nextoken.adapters import no_adapter_feeds

    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    row = np.asarray([ids], dtype=np.int64)
    feeds = {}
    for meta in session.get_inputs():
        if meta.name == "input_ids":
            feeds[meta.name] = row
        elif meta.name == "attention_mask":
            feeds[meta.name] = np.ones_like(row)
        elif meta.name == "position_ids":
            feeds[meta.name] = np.arange(len(ids), dtype=np.int64)[None]
        elif meta.name == "logits_to_keep":
            feeds[meta.name] = np.asarray([1], dtype=np.int64)
        elif meta.name == "lora_ids" or meta.name.startswith("lora."):
            feeds.update(no_adapter_feeds([meta], 1))
        else:  # an empty past
            shape = [d if isinstance(d, int) else (1 if i == 0 else 0) for i, d in enumerate(meta.shape)]
            feeds[meta.name] = np.zeros(shape, dtype=np.float16 if "float16" in meta.type else np.float32)
    errors = {}
    for name, x in zip(names, session.run(names, feeds)):
        x = x.astype(np.float32).reshape(-1, x.shape[-1])
        k = x.shape[1]
        blocks = np.pad(x, ((0, 0), (0, -k % block_size))).reshape(x.shape[0], -1, block_size)
        scale = np.abs(blocks).max(-1, keepdims=True) / 127
        scale[scale == 0] = 1.0
        lost = (blocks - np.rint(blocks / scale) * scale).reshape(x.shape[0], -1)[:, :k]
        pairs = (
            [(x, lost)]
            if not readers[name]
            else [
                (x @ w, lost @ w) for w in (numpy_helper.to_array(inits[i], str(fp32_package)) for i in readers[name])
            ]
        )
        errors[name] = max(float(np.linalg.norm(e) / max(np.linalg.norm(y), 1e-30)) for y, e in pairs)
    probe.unlink()
    return errors


#: what reads each activation of the builder's graphs (layer i's x, attn, m and act)
_READERS = {"x": "qkv", "attn": "o", "m": "mlp in", "act": "down", "moe": "experts"}


def _label(activation: str) -> str:
    """A reader's name for the MatMuls reading ``activation``: "layer 3 mlp in" for the builder's
    graphs, the tensor's own name otherwise."""
    import re

    match = re.fullmatch(r"([a-z]+)(\d+)", activation)
    if match and match.group(1) in _READERS:
        return f"layer {match.group(2)} {_READERS[match.group(1)]}"
    return {"kept": "lm_head", "kept2d": "lm_head"}.get(activation, activation)


def activation_remedy(fp32_package: Path, package: Path, ids: list[int], block_size: int) -> tuple[list[str], dict]:
    """Where int8 activations (accuracy_level 4) cost the quantised ``package`` accuracy, give fp32
    activations (accuracy_level 0) to the MatMuls whose activations int8 loses most, as few as
    bring the mean |Δ logit| against fp32 (teacher-forced over ``ids``) within
    :data:`ACTIVATION_EXCESS` of fp32 activations everywhere: 1, 2, 4 ... of them, ranked by the
    activations' own int8 error on ``ids``. Rewrites ``package``'s graph when it helps; returns the
    activations named and the measurements."""
    import os

    import numpy as np
    import onnx

    from nextoken.engine import Engine

    model = onnx.load(str(package / "model.onnx"), load_external_data=False)
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "QMoE")]
    trial = Path(tempfile.mkdtemp(prefix=".nextoken-remedy-", dir=package.parent))
    try:
        import dataclasses

        from nextoken.manifest import MANIFEST_NAME, Manifest

        for p in package.iterdir():
            if p.is_file() and p.name not in ("model.onnx", MANIFEST_NAME):
                os.link(p, trial / p.name)
        # the trial graphs are this process's own: no checksums to hold them to
        dataclasses.replace(Manifest.load(package), checksums={}, file_sizes={}).save(trial)

        def level(node, value: int) -> None:
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = value

        def error(fp32_inputs: set[str]) -> float:
            for node in matmuls:
                level(node, 0 if node.input[0] in fp32_inputs else 4)
            onnx.save(model, str(trial / "model.onnx"))
            with Engine(trial, device="cpu", plugins=False, verify=False) as engine:
                return float(np.abs(engine.forward(ids) - reference).mean())

        with Engine(fp32_package, device="cpu", plugins=False, verify=False) as ref:
            reference = ref.forward(ids)
        activations = list(dict.fromkeys(n.input[0] for n in matmuls))
        int8, fp32 = error(set()), error(set(activations))
        measured = {
            "matmuls": len(matmuls),
            "int8_activations": int8,
            "fp32_activations": fp32,
            "excess_allowed": ACTIVATION_EXCESS,
        }
        chosen: list[str] = []
        if int8 > ACTIVATION_EXCESS * fp32:
            errors = _activation_errors(fp32_package, activations, ids, block_size)
            ranked = sorted(activations, key=lambda name: errors[name], reverse=True)
            k = 1
            while True:
                chosen = ranked[:k]
                shipped = error(set(chosen))
                if shipped <= ACTIVATION_EXCESS * fp32 or k >= len(ranked):
                    break
                k *= 2
            measured["shipped"] = shipped
        for node in matmuls:
            level(node, 0 if node.input[0] in chosen else 4)
        if chosen:
            onnx.save(model, str(package / "model.onnx"))
        return [_label(name) for name in chosen], measured
    finally:
        shutil.rmtree(trial, ignore_errors=True)


def quantize_package(package: Path, method: str, block_size: int, prompt: str) -> Accuracy:
    """Quantise ``package`` in place and measure it against the fp32 original (kept aside meanwhile)."""
    aside = Path(tempfile.mkdtemp(prefix=".nextoken-fp32-", dir=package.parent))
    try:
        for p in package.iterdir():
            if p.is_file():
                shutil.copy2(p, aside / p.name)
        for p in package.iterdir():
            if p.name.startswith("model.onnx"):
                p.unlink()
        try:
            quantize_model(aside / "model.onnx", package / "model.onnx", method, block_size)
        except ExportError:
            for p in aside.iterdir():  # leave the fp32 package as it was
                shutil.copy2(p, package / p.name)
            raise
        from nextoken.manifest import Manifest

        chosen: list[str] = []
        measured: dict | None = None
        if method == "int4":  # int8 weights run int8 activations at every level
            from nextoken.engine import Engine

            with Engine(aside, device="cpu", plugins=False, verify=False) as ref:
                ids, expected = greedy_sample(ref, prompt, 64)
            chosen, measured = activation_remedy(aside, package, ids + expected[:-1], block_size)
        Manifest.load(package).with_files(package).save(package)
        accuracy = compare_accuracy(aside, package, prompt)
        accuracy.fp32_activations, accuracy.remedy = tuple(chosen), measured
        return accuracy
    finally:
        shutil.rmtree(aside, ignore_errors=True)
