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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import DTYPES, by_ort_type
from .errors import ManifestMismatchError, ModelPackageError, is_integer

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "VERIFIED_STAMP", "Manifest", "TensorSpec"]

FORMAT_VERSION = 1
MANIFEST_NAME = "nextoken.json"
#: Written beside the manifest once every file's sha256 matched: each file's size and mtime then.
#: While they are unchanged, loading trusts the files without hashing them again.
VERIFIED_STAMP = ".nextoken-verified.json"
#: Files beside the graph that loading reads when present (the tokenizer, its chat template, the
#: sampling defaults): one that the export did not record is refused, not read unchecked.
READ_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_places(directory: Path) -> list[Path]:
    """Where a package's verified stamp may live: in the package, else in the user's cache."""
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextoken" / "verified"
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
    return [directory / VERIFIED_STAMP, cache / f"{key}.json"]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as ONNX Runtime reports it: a name, a dtype and a shape whose
    dynamic axes are strings (or None)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_node_arg(cls, arg: Any) -> "TensorSpec":
        entry = by_ort_type(arg.type)
        return cls(arg.name, entry.name if entry else arg.type, tuple(arg.shape))


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
    #: the export's parity check: max_abs_diff, tolerance, positions, device, reference
    parity: Mapping[str, Any] | None = None
    #: bytes of each file named in ``checksums`` (checked at every load: cheap)
    file_sizes: Mapping[str, int] = field(default_factory=dict)
    padding_side: str = "left"
    #: longrope packages: a sequence longer than this many tokens rotates with the long factors, and
    #: the first step past it runs the whole sequence again (as transformers does); None: no switch
    rope_switch: int | None = None
    #: what the graph is for: ``generate`` (logits over a KV cache) or ``embed`` (one vector a
    #: sequence, ``embeddings [batch, hidden]`` out, no cache)
    task: str = "generate"
    #: an embedding package's: ``pooling`` (last, mean, cls), ``normalize`` (unit vectors),
    #: ``dimensions`` (the vector's size), ``truncatable`` (trained so a prefix of the vector is an
    #: embedding: OpenAI's ``dimensions``), ``prompts`` (named prefixes, as sentence-transformers
    #: has them) and ``default_prompt``
    embedding: Mapping[str, Any] | None = None
    #: an int8 KV cache's (``kv_dtype`` int8): bits, granularity, the calibration, and its accuracy
    #: against the fp32 cache (:mod:`nextoken.exporters.kvquant`)
    kv_quantization: Mapping[str, Any] | None = None
    #: a graph that takes LoRA adapters (:mod:`nextoken.adapters`): ``adapters`` (how many at once),
    #: ``rank`` (the most an adapter may have) and ``targets`` (q, k, v, o, gate, up, down)
    lora: Mapping[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    # -- names -----------------------------------------------------------------------------
    @property
    def embeds(self) -> bool:
        """Whether the package makes embeddings (``task`` ``embed``) rather than text."""
        return self.task == "embed"

    def past_names(self) -> list[str]:
        """Graph inputs that carry the KV cache in, layer by layer, key before value (none for an
        embedding graph)."""
        if self.embeds:
            return []
        return [self.past_pattern.format(layer=i, kind=k) for i in range(self.num_layers) for k in ("key", "value")]

    def present_names(self) -> list[str]:
        """Graph outputs that carry the KV cache out, in the order of :meth:`past_names`."""
        if self.embeds:
            return []
        return [self.present_pattern.format(layer=i, kind=k) for i in range(self.num_layers) for k in ("key", "value")]

    @property
    def has_position_ids(self) -> bool:
        return "position_ids" in self.inputs

    @property
    def cache_head_dim(self) -> int:
        """Elements of one head's keys (or values) at one position as the cache stores them: the
        head's width, or half of it for an int4 cache (two values a byte)."""
        return self.head_dim // 2 if self.kv_dtype == "int4" else self.head_dim

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token costs one sequence (all layers, keys and values)."""
        entry = DTYPES.get(self.kv_dtype)
        itemsize = entry.itemsize if entry else 4
        return 2 * self.num_layers * self.num_kv_heads * self.cache_head_dim * itemsize

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("inputs", "outputs", "eos_token_ids"):
            d[key] = list(d[key])
        d["exported_by"] = dict(self.exported_by)
        d["checksums"] = dict(self.checksums)
        d["quantization"] = dict(self.quantization) if self.quantization else None
        d["parity"] = dict(self.parity) if self.parity else None
        d["file_sizes"] = dict(self.file_sizes)
        d["embedding"] = dict(self.embedding) if self.embedding else None
        d["kv_quantization"] = dict(self.kv_quantization) if self.kv_quantization else None
        d["lora"] = dict(self.lora) if self.lora else None
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
            raise ModelPackageError(
                f"{where} has no valid format_version; re-export the package with `nextoken export`."
            )
        if version > FORMAT_VERSION:
            raise ModelPackageError(
                f"{where} has format_version {version}, newer than this nextoken reads ({FORMAT_VERSION}); "
                "upgrade nextoken."
            )
        names = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            n for n, f in names.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
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
        if kwargs.get("task", "generate") not in ("generate", "embed"):
            raise ModelPackageError(f"{where}: task must be generate or embed, not {kwargs['task']!r}")
        embedding = kwargs.get("embedding")
        if kwargs.get("task") == "embed" and not (
            isinstance(embedding, Mapping)
            and embedding.get("pooling") in ("last", "mean", "cls")
            and is_integer(embedding.get("dimensions"))
        ):
            raise ModelPackageError(
                f"{where}: an embedding package needs embedding.pooling (last, mean or cls) and "
                "embedding.dimensions; re-export it with `nextoken export --task embed`"
            )
        switch = kwargs.get("rope_switch")
        if switch is not None and (not is_integer(switch) or switch <= 0):
            raise ModelPackageError(f"{where}: rope_switch must be a positive integer or null, not {switch!r}.")
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

    @property
    def route(self) -> str:
        """Which graph the package holds: ``fused`` (nextoken's builder), onnxruntime-genai's, or optimum's."""
        if self.exported_by.get("builder") == "nextoken":
            return "fused"
        return (
            "onnxruntime-genai's graph" if "onnxruntime-genai model builder" in self.exported_by else "optimum's graph"
        )

    def with_files(self, directory: str | Path) -> "Manifest":
        """This manifest with the checksums and sizes of the package's files as they are now."""
        files = sorted(
            p for p in Path(directory).iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, VERIFIED_STAMP)
        )
        return dataclasses.replace(
            self,
            checksums={p.name: sha256_file(p) for p in files},
            file_sizes={p.name: p.stat().st_size for p in files},
        )

    def verify_at_load(self, directory: str | Path, full: bool | None = None) -> str:
        """Refuse a package whose files changed since export; returns how it was checked.

        Always: every file named in ``checksums`` exists with its recorded size (a stat each).
        ``full=None`` (the default): the files' sha256 once, then a stamp (:data:`VERIFIED_STAMP`,
        in the package, or in the user's cache where the package is read-only) records each file's
        size and mtime, and later loads trust the files while those are unchanged. ``True``: sha256
        every time. ``False``: sizes only. A mismatch is a :class:`ModelPackageError` naming the files.
        """
        directory = Path(directory)
        if not self.checksums:
            return "none (the manifest records no checksums)"
        unlisted = [name for name in READ_FILES if name not in self.checksums and (directory / name).is_file()]
        if unlisted:
            raise ModelPackageError(
                f"{directory}: {', '.join(unlisted)} would be read but is not among the files "
                "its export recorded (added since?); remove it, or export the package again"
            )
        stats = {}
        for name in sorted(self.checksums):
            try:
                st = (directory / name).stat()
            except OSError:
                raise ModelPackageError(
                    f"{directory / name} is missing (nextoken.json names it); re-export the package or restore the file"
                ) from None
            stats[name] = [st.st_size, st.st_mtime_ns]
        wrong = [n for n, size in self.file_sizes.items() if n in stats and stats[n][0] != size]
        if wrong:
            raise ModelPackageError(self._changed(directory, wrong, "its size differs from the export's"))
        if full is False:
            return "sizes"
        manifest_hash = sha256_file(directory / MANIFEST_NAME)
        stamp = {"manifest_sha256": manifest_hash, "files": stats}
        if full is None:
            for where in _stamp_places(directory):
                try:
                    if json.loads(where.read_text()) == stamp:
                        return "stamp"
                except (OSError, ValueError):
                    continue
        changed = [n for n, expected in self.checksums.items() if sha256_file(directory / n) != expected]
        if changed:
            raise ModelPackageError(self._changed(directory, changed, "its sha256 differs from the export's"))
        for where in _stamp_places(directory):
            try:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.write_text(json.dumps(stamp))
                break
            except OSError:
                continue
        return "sha256"

    @staticmethod
    def _changed(directory: Path, names: Sequence[str], how: str) -> str:
        return (
            f"{directory} is not the package that was exported: {', '.join(names)} changed ({how}); "
            "re-export the package, or restore the file(s)"
        )

    def check_values(self, directory: str | Path) -> None:
        """Refuse manifest values the model cannot honour: token ids outside the vocabulary, a
        context longer than the source config's positions (:class:`ManifestMismatchError`)."""
        problems = []
        ids: dict[str, list[int | None]] = {
            "bos_token_id": [self.bos_token_id],
            "pad_token_id": [self.pad_token_id],
            "eos_token_ids": list(self.eos_token_ids),
        }
        for key, values in ids.items():
            for value in values:
                if value is None:
                    continue
                if not is_integer(value) or not 0 <= value < self.vocab_size:
                    problems.append(f"{key} {value!r} is outside the vocabulary [0, {self.vocab_size})")
        config_path = Path(directory) / "config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError):
                config = {}
            config = config.get("text_config", config) if isinstance(config, dict) else {}
            positions = next(
                (
                    config[k]
                    for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
                    if isinstance(config.get(k), int) and config[k] > 0
                ),
                None,
            )
            if positions is not None and self.context_length > positions:
                problems.append(
                    f"context_length {self.context_length} is longer than the model's "
                    f"{positions} positions (config.json)"
                )
        if problems:
            raise ManifestMismatchError(
                "nextoken.json does not fit the model: "
                + "; ".join(problems)
                + ". Fix nextoken.json or re-export the package with `nextoken export`."
            )

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
        if self.embeds:
            spec = graph_out.get("embeddings")
            width = (self.embedding or {}).get("dimensions")
            if spec is None:
                problems.append("the graph has no embeddings output")
            elif isinstance(spec.shape[-1], int) and spec.shape[-1] != width:
                problems.append(f"embedding.dimensions is {width} in the manifest but the graph's are {spec.shape[-1]}")
        elif "logits" not in graph_out:
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
                if isinstance(dim, int) and dim != self.cache_head_dim:
                    problems.append(
                        f"head_dim is {self.head_dim} in the manifest (a {self.kv_dtype} cache stores "
                        f"{self.cache_head_dim}) but {name} has {dim}"
                    )
                    break
        extra_layers = self.past_pattern.format(layer=self.num_layers, kind="key")
        if extra_layers in graph_in:
            problems.append(f"num_layers is {self.num_layers} in the manifest but the graph has more layers")
        if problems:
            raise ManifestMismatchError(
                "nextoken.json disagrees with the graph: "
                + "; ".join(problems)
                + ". Re-export the package with `nextoken export`."
            )
