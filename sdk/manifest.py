"""The model package manifest, ``nextoken.json``: what a package holds, and its check against the graph.

A model package is a directory::

    model.onnx (+ model.onnx_data)   the graph: input_ids, attention_mask, [position_ids],
                                     past_key_values.{i}.key/value in; logits, present.{i}.key/value out
    nextoken.json                    this manifest
    tokenizer.json, tokenizer_config.json, generation_config.json, config.json

The manifest is plain JSON; loading a package never executes code from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ManifestMismatchError, ModelPackageError

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "TensorSpec"]

FORMAT_VERSION = 1
MANIFEST_NAME = "nextoken.json"

# ONNX Runtime's type strings <-> the manifest's dtype names.
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as ONNX Runtime reports it: a name, a dtype and a shape whose
    dynamic axes are strings (or None)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_node_arg(cls, arg: Any) -> "TensorSpec":
        return cls(arg.name, ORT_TYPES.get(arg.type, arg.type), tuple(arg.shape))


@dataclass(frozen=True)
class Manifest:
    """What ``nextoken.json`` says about a model package."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    vocab_size: int
    context_length: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    precision: str = "fp32"
    model_file: str = "model.onnx"
    tokenizer: str = "hf"
    tokenizer_file: str | None = "tokenizer.json"
    past_pattern: str = "past_key_values.{layer}.{kind}"
    present_pattern: str = "present.{layer}.{kind}"
    source: str = ""
    exported_by: Mapping[str, str] = field(default_factory=dict)
    checksums: Mapping[str, str] = field(default_factory=dict)
    quantization: Mapping[str, Any] | None = None
    padding_side: str = "left"
    format_version: int = FORMAT_VERSION

    # -- names -----------------------------------------------------------------------------
    def past_names(self) -> list[str]:
        """Graph inputs that carry the KV cache in, layer by layer, key before value."""
        return [self.past_pattern.format(layer=i, kind=k) for i in range(self.num_layers) for k in ("key", "value")]

    def present_names(self) -> list[str]:
        """Graph outputs that carry the KV cache out, in the order of :meth:`past_names`."""
        return [self.present_pattern.format(layer=i, kind=k) for i in range(self.num_layers) for k in ("key", "value")]

    @property
    def has_position_ids(self) -> bool:
        return "position_ids" in self.inputs

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token costs one sequence (all layers, keys and values)."""
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(self.kv_dtype, 4)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("inputs", "outputs", "eos_token_ids"):
            d[key] = list(d[key])
        d["exported_by"] = dict(self.exported_by)
        d["checksums"] = dict(self.checksums)
        d["quantization"] = dict(self.quantization) if self.quantization else None
        return {"format_version": d.pop("format_version"), **d}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(data, Mapping):
            raise ModelPackageError(f"{where} must hold a JSON object; re-export the package with `nextoken export`.")
        version = data.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ModelPackageError(f"{where} has no valid format_version; re-export the package with `nextoken export`.")
        if version > FORMAT_VERSION:
            raise ModelPackageError(
                f"{where} has format_version {version}, newer than this nextoken reads ({FORMAT_VERSION}); "
                "upgrade nextoken."
            )
        names = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in names.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ModelPackageError(
                f"{where} lacks {', '.join(missing)}; re-export the package with `nextoken export`."
            )
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in names}
        for key in ("inputs", "outputs", "eos_token_ids"):
            if key in kwargs:
                if not isinstance(kwargs[key], Sequence) or isinstance(kwargs[key], str):
                    raise ModelPackageError(f"{where}: {key} must be a list.")
                kwargs[key] = tuple(kwargs[key])
        if kwargs.get("padding_side", "left") not in ("left", "right"):
            raise ModelPackageError(f"{where}: padding_side must be left or right, not {kwargs['padding_side']!r}")
        for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "context_length"):
            if not isinstance(kwargs[key], int) or kwargs[key] <= 0:
                raise ModelPackageError(f"{where}: {key} must be a positive integer, not {kwargs[key]!r}.")
        return cls(**kwargs)

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ModelPackageError(
                f"{directory} is not a nextoken model package: it has no {MANIFEST_NAME}. "
                "Create one with `nextoken export MODEL -o DIR`."
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelPackageError(f"{path} is not valid JSON ({exc}); re-export the package.") from None
        return cls.from_dict(data, where=str(path))

    def verify_files(self, directory: str | Path) -> list[str]:
        """Re-hash the package's files against ``checksums``: the names that differ or are missing."""
        bad = []
        for name, expected in sorted(self.checksums.items()):
            path = Path(directory) / name
            if not path.is_file():
                bad.append(f"{name} (missing)")
                continue
            if sha256_file(path) != expected:
                bad.append(f"{name} (changed)")
        return bad

    # -- the check against the graph -------------------------------------------------------------
    def check_graph(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        """Raise :class:`ManifestMismatchError` naming every way the graph's I/O disagrees with this manifest."""
        problems: list[str] = []
        graph_in = {t.name: t for t in inputs}
        graph_out = {t.name: t for t in outputs}

        def compare(kind: str, declared: Sequence[str], actual: Mapping[str, TensorSpec]) -> None:
            extra_declared = [n for n in declared if n not in actual]
            extra_actual = [n for n in actual if n not in declared]
            if extra_declared:
                problems.append(f"{kind} {', '.join(extra_declared[:4])} named in the manifest are not in the graph")
            if extra_actual:
                problems.append(f"graph {kind} {', '.join(extra_actual[:4])} are not in the manifest")

        compare("inputs", self.inputs, graph_in)
        compare("outputs", self.outputs, graph_out)
        for name in ("input_ids", "attention_mask"):
            if name not in graph_in:
                problems.append(f"the graph has no {name} input")
        if "logits" not in graph_out:
            problems.append("the graph has no logits output")
        else:
            vocab = graph_out["logits"].shape[-1]
            if isinstance(vocab, int) and vocab != self.vocab_size:
                problems.append(f"vocab_size is {self.vocab_size} in the manifest but logits have {vocab} columns")
        for names, table in ((self.past_names(), graph_in), (self.present_names(), graph_out)):
            for name in names:
                spec = table.get(name)
                if spec is None:
                    problems.append(f"num_layers={self.num_layers} needs {name}, which the graph lacks")
                    break
                if spec.dtype != self.kv_dtype:
                    problems.append(f"kv_dtype is {self.kv_dtype} in the manifest but {name} is {spec.dtype}")
                    break
                if len(spec.shape) != 4:
                    problems.append(f"{name} has rank {len(spec.shape)}, expected [batch, kv_heads, seq, head_dim]")
                    break
                heads, dim = spec.shape[1], spec.shape[3]
                if isinstance(heads, int) and heads != self.num_kv_heads:
                    problems.append(f"num_kv_heads is {self.num_kv_heads} in the manifest but {name} has {heads}")
                    break
                if isinstance(dim, int) and dim != self.head_dim:
                    problems.append(f"head_dim is {self.head_dim} in the manifest but {name} has {dim}")
                    break
        extra_layers = self.past_pattern.format(layer=self.num_layers, kind="key")
        if extra_layers in graph_in:
            problems.append(f"num_layers is {self.num_layers} in the manifest but the graph has more layers")
        if problems:
            raise ManifestMismatchError(
                "nextoken.json disagrees with the graph: " + "; ".join(problems)
                + ". Re-export the package with `nextoken export`."
            )
