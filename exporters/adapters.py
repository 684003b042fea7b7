"""A PEFT LoRA checkpoint made into a nextoken adapter for one package.

    nextoken adapter PEFT_DIR --package PKG -o ADAPTER

The package must take adapters (exported with ``--lora-adapters N``; its rank and targets bound
what an adapter may be). Each targeted projection's pair is written as the graph adds it,
``x @ A @ B`` with ``A [in, R]`` and ``B [R, out]`` (PEFT's ``lora_A.weight [r, in]`` and
``lora_B.weight [out, r]`` turned), the scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)
folded into B, a rank under R padded with zeros, attention's output rows padded per head where the
graph stores heads wider, and a block's residual factor folded in as the builder folds it into the
weights. So the adapter's effect is exact.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nextoken.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from nextoken.errors import ExportError
from nextoken.manifest import Manifest

from .builder import checkpoint_shape, pad_heads

__all__ = ["make_adapter"]

#: PEFT's module names for each target
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def make_adapter(peft_dir: str | Path, package: str | Path, output: str | Path) -> Path:
    """Write the adapter folder ``output`` (:data:`~nextoken.adapters.ADAPTER_CONFIG` and
    :data:`~nextoken.adapters.ADAPTER_WEIGHTS`) from the PEFT LoRA checkpoint ``peft_dir``
    (``adapter_config.json`` and ``adapter_model.safetensors``) for ``package``; an ExportError
    naming what does not fit (a rank over the package's, a module it does not target, DoRA,
    trained biases or saved modules)."""
    from safetensors.numpy import load_file

    peft_dir, package, output = Path(peft_dir), Path(package), Path(output)
    manifest = Manifest.load(package)
    spec = manifest.lora
    if not spec:
        raise ExportError(
            f"{package} takes no adapters; export it with LoRA inputs: nextoken export MODEL --lora-adapters N "
            "--lora-rank R --lora-targets q,k,v,o,..."
        )
    config_path = peft_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ExportError(f"{peft_dir}: no adapter_config.json; point at a PEFT LoRA checkpoint's folder")
    peft = json.loads(config_path.read_text())
    r, alpha = int(peft.get("r", 8)), float(peft.get("lora_alpha", 8))
    refused = {
        "peft_type": peft.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(peft.get("use_dora")),
        "bias": peft.get("bias", "none") != "none",
        "modules_to_save": bool(peft.get("modules_to_save")),
        "rank_pattern": bool(peft.get("rank_pattern")),
        "alpha_pattern": bool(peft.get("alpha_pattern")),
        "fan_in_fan_out": bool(peft.get("fan_in_fan_out")),
    }
    if any(refused.values()):
        raise ExportError(
            f"{peft_dir}: {', '.join(k for k, v in refused.items() if v)} is not taken: nextoken's adapters are "
            "plain LoRA pairs of one rank on linear projections"
        )
    rank = int(spec["rank"])
    if r > rank:
        raise ExportError(f"{peft_dir}: rank {r} is over the package's {rank}; export the package with --lora-rank {r}")
    scale = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)
    weights_path = peft_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ExportError(f"{peft_dir}: no adapter_model.safetensors (PEFT's safetensors format is read)")
    raw = load_file(str(weights_path))
    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    names = {f"{module}.lora_A.weight": t for t, module in MODULES.items()}
    for key, a in raw.items():
        if ".lora_B." in key:
            continue
        layer_at = key.find("layers.")
        tail = key[layer_at + len("layers.") :] if layer_at >= 0 else ""
        index, _, module = tail.partition(".")
        target = names.get(module)
        if not index.isdigit() or target is None or ".lora_A." not in key:
            raise ExportError(
                f"{peft_dir}: tensor {key} is not a LoRA pair of a layer's {', '.join(MODULES.values())}; "
                "nextoken's adapters take those only"
            )
        b = raw.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ExportError(f"{peft_dir}: {key} has no lora_B beside it")
        pairs[int(index), target] = (a.astype(np.float32).T, b.astype(np.float32).T * scale)
    if not pairs:
        raise ExportError(f"{peft_dir}: no LoRA pairs found in adapter_model.safetensors")
    outside = [t for t in MODULES if t not in spec["targets"] and any(t == u for _, u in pairs)]
    if outside:
        raise ExportError(
            f"{peft_dir}: the adapter trains {', '.join(MODULES[t] for t in outside)}, which {package} does not "
            f"take adapters on (its targets: {', '.join(spec['targets'])}); export it with --lora-targets "
            f"{','.join(t for t in MODULES if t in spec['targets'] or t in outside)}"
        )
    shape = checkpoint_shape(package)
    slots = _slot_shapes(package, manifest)
    if max(layer for layer, _ in pairs) >= shape.layers:
        raise ExportError(f"{peft_dir}: the adapter has layers past the package's {shape.layers}: another model's")
    tensors = _site_tensors(shape, pairs, slots)
    dtype = np.float16 if manifest.precision == "fp16" else np.float32
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    arrays: dict[str, Any] = {k: v.astype(dtype) for k, v in tensors.items()}
    np.savez(staging / ADAPTER_WEIGHTS, **arrays)
    made: dict[str, Any] = {
        "format": 1,
        "source": str(peft_dir),
        "base_model": peft.get("base_model_name_or_path"),
        "rank": r,
        "alpha": alpha,
        "rslora": bool(peft.get("use_rslora")),
        "targets": sorted({t for _, t in pairs}, key=list(MODULES).index),
        "package": {"source": manifest.source, "model_sha256": manifest.checksums.get(manifest.model_file)},
    }
    (staging / ADAPTER_CONFIG).write_text(json.dumps(made, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


def _slot_shapes(package: Path, manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor an adapter for ``package`` holds (A ``[in, R]``, B ``[R, out]`` of
    every targeted projection), from the graph's inputs."""
    import onnx

    from nextoken.adapters import lora_groups

    spec = manifest.lora or {}
    rank = int(spec["rank"])
    groups = dict(lora_groups(spec["targets"]))
    graph = onnx.load(str(package / manifest.model_file), load_external_data=False).graph
    shapes: dict[str, tuple[int, ...]] = {}
    for i in graph.input:
        if i.name.startswith("lora."):
            rows, columns = (d.dim_value for d in i.type.tensor_type.shape.dim)  # A^T, B^T: turned
            _, layer, part, kind = i.name.split(".")
            if kind == "b":
                shapes[i.name] = (rank, rows)
            else:
                shapes.update({f"lora.{layer}.{t}.a": (columns, rank) for t in groups[part]})
    return shapes


def _site_tensors(
    shape: Any,
    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]],
    slots: dict[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """The graph's ``lora.{layer}.{target}.a [in, R]`` / ``.b [R, out]`` (shapes ``slots``) for
    one adapter, in the package's layout (zeros where it trains nothing)."""
    out = {name: np.zeros(dims, dtype=np.float32) for name, dims in slots.items()}
    for (layer, target), (pa, pb) in pairs.items():
        a, b = out[f"lora.{layer}.{target}.a"], out[f"lora.{layer}.{target}.b"]
        if target == "o":
            pa = pad_heads(pa, shape.heads, shape.head, shape.stored_head)
        if target in ("o", "down"):
            pb = pb * shape.residual_scale
        if pa.shape[0] != a.shape[0] or pb.shape[1] != b.shape[1]:
            raise ExportError(
                f"layer {layer}'s {MODULES[target]} pair is {list(pa.shape)} x {list(pb.shape)}, the package's "
                f"{list(a.shape)} x {list(b.shape)}: the adapter was trained on another model"
            )
        a[:, : pa.shape[1]], b[: pb.shape[0]] = pa, pb
    return out
