"""Memory: model weights + working memory + KV cache ("conversation memory"), planned before
loading and checked against what a run measures."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..dtypes import QUANTISED_KV
from ..errors import InvalidRequestError, ModelPackageError
from ..probes import GPUMemory, gpu_memory, meminfo_bytes, peak_rss_bytes, reset_peak_rss

__all__ = [
    "DTYPE_BYTES",
    "GPUMemory",
    "MemoryPlan",
    "ModelSpec",
    "count_parameters",
    "device_capacity",
    "gpu_memory",
    "measure_peak",
    "plan_memory",
    "prefix_cache_budget",
]

MiB = 1 << 20

#: Bytes per weight for each precision (int8 and int4 include one fp32 scale per block of 32, as
#: ``nextoken export --quantize`` writes them).
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.125, "int4": 0.625}

#: Resident memory of a process that has imported nextoken and ONNX Runtime and probed the devices,
#: before any model (measured on Linux x86_64 with onnxruntime-gpu 1.31: 65-69 MiB).
RUNTIME_BASELINE = {"cpu": 70 * MiB, "cuda": 70 * MiB}
#: A session's own memory beyond its weights (threads, arena, graph): ~10 MiB on CPU; on CUDA
#: the context, cuBLAS/cuDNN workspaces (~500 MiB, a commonly seen figure; not measured here).
SESSION_OVERHEAD = {"cpu": 10 * MiB, "cuda": 500 * MiB}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as the planner needs it."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    parameters: int
    tie_word_embeddings: bool
    weights_file_bytes: int | None = None  # a package's real model.onnx (+ data) size
    dtype: str = "fp32"
    #: nextoken's fused graph (GroupQueryAttention, KV in place, prompts prefilled a row at a time),
    #: as the default export writes it; False: optimum's generic graph
    fused: bool = False
    #: a package's KV cache dtype (``int8``, ``int4``: quantised; None or another: the activations')
    kv_dtype: str | None = None
    #: a package's LoRA adapter slots (``export --lora-adapters``), every slot filled
    adapter_bytes: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelSpec":
        """From a transformers ``config.json`` (as a dict): no weights needed."""
        c = dict(config)
        mt = c.get("model_type", "")
        if mt == "gpt2":
            hidden, layers, heads = c["n_embd"], c["n_layer"], c["n_head"]
            inter = c.get("n_inner") or 4 * hidden
            kv, ctx, head_dim = heads, c.get("n_positions", 1024), hidden // heads
        else:
            try:
                hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
                inter = c["intermediate_size"]
            except KeyError as exc:
                raise InvalidRequestError(
                    f"config.json lacks {exc.args[0]}; is it a decoder-only transformer?"
                ) from None
            kv = c.get("num_key_value_heads") or heads
            head_dim = c.get("head_dim") or hidden // heads
            ctx = c.get("max_position_embeddings") or 2048
        tie = c.get("tie_word_embeddings", mt in ("gpt2", "gemma", "gemma2", "gemma3_text"))
        dtype = {"float16": "fp16", "bfloat16": "bf16"}.get(str(c.get("torch_dtype") or c.get("dtype")), "fp32")
        fused = _builder_covers(c)
        if fused:  # the fused graph stores heads padded to a multiple of 16 (stories260k's 8: 16)
            head_dim = -(-int(head_dim) // 16) * 16
        return cls(
            mt or "unknown",
            int(layers),
            int(hidden),
            int(inter),
            int(heads),
            int(kv),
            int(head_dim),
            int(c["vocab_size"]),
            int(ctx),
            count_parameters(c),
            bool(tie),
            dtype=dtype,
            fused=fused,
        )

    @classmethod
    def load(cls, source: str | os.PathLike) -> "ModelSpec":
        """From a model package, a checkpoint directory, a config.json file, or a hub id (its
        config.json alone is fetched, which needs network access and the ``export`` extra)."""
        path = Path(source).expanduser()
        if path.is_dir() and (path / "nextoken.json").is_file():
            from ..manifest import Manifest

            manifest = Manifest.load(path)
            if not (path / "config.json").is_file():
                raise ModelPackageError(f"{path} has no config.json; re-export it with `nextoken export`")
            spec = cls.from_config(json.loads((path / "config.json").read_text()))
            size = sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(manifest.model_file))
            return cls(
                **{
                    **asdict(spec),
                    "weights_file_bytes": size,
                    "dtype": manifest.precision,
                    "num_layers": manifest.num_layers,
                    "num_kv_heads": manifest.num_kv_heads,
                    "head_dim": manifest.head_dim,
                    "context_length": manifest.context_length,
                    "kv_dtype": manifest.kv_dtype,
                    "fused": manifest.padding_side == "right",
                    "adapter_bytes": _adapter_slot_bytes(path / manifest.model_file) if manifest.lora else 0,
                }
            )
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                return cls.from_config(json.loads(path.read_text()))
            except (ValueError, OSError) as exc:
                raise InvalidRequestError(f"cannot read {path}: {exc}") from None
        if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
            raise InvalidRequestError(
                f"{source} does not exist (give a package, a checkpoint, a config.json or a hub id)"
            )
        try:
            from huggingface_hub import hf_hub_download

            return cls.from_config(json.loads(Path(hf_hub_download(str(source), "config.json")).read_text()))
        except ImportError:
            raise InvalidRequestError(
                "planning from a hub id needs huggingface_hub: pip install 'nextoken[export]'"
            ) from None
        except Exception as exc:
            raise InvalidRequestError(
                f"cannot fetch the config.json of {source!r}: {str(exc).splitlines()[0][:200]}"
            ) from None


def _adapter_slot_bytes(model_file: Path) -> int:
    """Bytes of a graph's LoRA adapter inputs (every adapter's pairs: what an engine holds once its
    slots are filled), read from the graph's inputs without its weights."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    total = 0
    for value in graph.input:
        if value.name.startswith("lora.") and value.name.endswith((".a", ".b")):
            tensor = value.type.tensor_type
            size = math.prod(d.dim_value for d in tensor.shape.dim)
            total += size * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
    return total


def _builder_covers(config: Mapping[str, Any]) -> bool:
    """Whether ``nextoken export`` writes this model with its own (fused) builder."""
    from ..errors import ExportError
    from ..exporters.builder import covers

    try:
        covers(dict(config))
    except ExportError:  # not covered (BuilderUnavailable), or a config it cannot read
        return False
    return True


def count_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config (gpt2 and the llama family:
    llama, mistral, qwen2, phi3, gemma ...), embeddings counted once when tied."""
    c = config
    if c.get("model_type") == "gpt2":
        h, layers, v = c["n_embd"], c["n_layer"], c["vocab_size"]
        inter = c.get("n_inner") or 4 * h
        per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h) + 4 * h
        return v * h + c.get("n_positions", 1024) * h + layers * per_layer + 2 * h
    h, layers, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    inter = c["intermediate_size"]
    bias = c.get("attention_bias", c.get("model_type") == "qwen2")
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (heads * hd + 2 * kv * hd if bias else 0)
    mlp = 3 * h * inter + (2 * inter + h if c.get("mlp_bias") else 0)
    tie = c.get("tie_word_embeddings", c.get("model_type") in ("gemma", "gemma2", "gemma3_text"))
    return v * h * (1 if tie else 2) + layers * (attn + mlp + 2 * h) + h


@dataclass
class MemoryPlan:
    """What a model needs at ``batch`` sequences of ``context`` tokens, against a capacity. Bytes."""

    model: str
    device: str
    dtype: str
    batch: int
    context: int
    parameters: int
    weights_bytes: int
    kv_bytes_per_token: int  # one sequence, all layers, keys and values
    kv_bytes_per_sequence: int  # at `context` tokens
    kv_cache_bytes: int  # the whole batch at `context` tokens
    working_bytes: int  # runtime + session + activations at the peak
    total_bytes: int  # weights + KV cache + working memory + the prefix cache + LoRA adapter slots
    capacity_bytes: int | None
    fits: bool | None
    max_batch: int | None  # at this context
    max_context: int | None  # at this batch (at most the model's window)
    model_context_length: int
    capacity_source: str = ""  # where the capacity came from: given, host RAM, free on a GPU
    prefix_cache_bytes: int = 0  # the prefix cache's budget (Engine(prefix_cache_bytes=...)), held at most
    adapter_bytes: int = 0  # a package's LoRA adapter slots, every one filled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        gib = lambda n: "-" if n is None else f"{n / (1 << 30):.2f} GiB"  # noqa: E731
        rows = [
            ("model", f"{self.model} ({self.parameters / 1e6:,.1f}M parameters)"),
            ("device / dtype", f"{self.device} / {self.dtype}"),
            ("batch x context", f"{self.batch} x {self.context} tokens (window {self.model_context_length})"),
            ("weights", gib(self.weights_bytes)),
            (
                "KV cache",
                f"{gib(self.kv_cache_bytes)}  ({self.kv_bytes_per_token / 1024:.1f} KiB/token, "
                f"{gib(self.kv_bytes_per_sequence)}/sequence)",
            ),
            ("working memory", gib(self.working_bytes)),
            (
                "prefix cache",
                gib(self.prefix_cache_bytes) + ("  (at most; off)" if not self.prefix_cache_bytes else "  (at most)"),
            ),
            *([("LoRA adapters", gib(self.adapter_bytes) + "  (every slot filled)")] if self.adapter_bytes else []),
            ("total", gib(self.total_bytes)),
            ("capacity", gib(self.capacity_bytes) + (f"  ({self.capacity_source})" if self.capacity_source else "")),
            ("fits", {True: "yes", False: "NO", None: "-"}[self.fits]),
            ("largest batch", "-" if self.max_batch is None else f"{self.max_batch} at {self.context} tokens"),
            (
                "longest context",
                "-" if self.max_context is None else f"{self.max_context} tokens at batch {self.batch}",
            ),
        ]
        return "\n".join(f"{k:16} {v}" for k, v in rows)


def _bytes_per(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise InvalidRequestError(f"dtype {dtype!r} is not known; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _kv_item(spec: ModelSpec, act: int) -> float:
    """Bytes of one cached key or value element: a quantised cache's (int8: 1, int4: half), else the activations'."""
    return QUANTISED_KV.get(spec.kv_dtype or "", float(act))


def _activation_bytes(spec: ModelSpec, batch: int, context: int, act: int, dtype: str = "fp32") -> int:
    """The peak of one request beyond weights. Optimum's generic graph: the larger of prefill (the
    cache being filled, plus one layer's temporaries: attention scores [B, heads, S, S], MLP
    [B, S, I], hidden [B, S, H], several of each alive at once) and decode (the graph concatenates
    past and new keys/values, so a step holds the cache twice). The fused graph: the cache, written
    in place, plus one row's prefill temporaries (MLP and hidden; GroupQueryAttention keeps no
    [S, S] scores alive, measured: see tests/test_memory.py), plus the prepacked copy of a tied
    LM head."""
    kv = int(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * _kv_item(spec, act) * batch * context)
    logits = act * batch * spec.vocab_size
    if spec.fused:
        # a tied LM head is a Gemm over the embedding, and onnxruntime prepacks its weight: a second
        # copy of the matrix in memory (the quantised builds share one int4 copy instead)
        prepacked = (
            act * spec.vocab_size * spec.hidden_size
            if spec.tie_word_embeddings and dtype in ("fp32", "fp16", "bf16")
            else 0
        )
        return kv + act * context * (4 * spec.intermediate_size + 8 * spec.hidden_size) + logits + prepacked
    per_layer = (
        act * batch * context * (4 * spec.num_heads * context + 4 * spec.intermediate_size + 8 * spec.hidden_size)
    )
    return max(kv + per_layer + logits, 2 * kv + logits)


def _total(spec: ModelSpec, batch: int, context: int, dtype: str, device: str, weights: int) -> tuple[int, int, int]:
    act = 2 if dtype in ("fp16", "bf16") else 4
    kv_cache = int(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * _kv_item(spec, act) * batch * context)
    working = (
        RUNTIME_BASELINE[device]
        + SESSION_OVERHEAD[device]
        + _activation_bytes(spec, batch, context, act, dtype)
        - kv_cache
    )
    return kv_cache, working, weights + kv_cache + working


def device_capacity(device: str, device_id: int = 0) -> int | None:
    """Memory a model can use on ``device``: the host's RAM for cpu; for cuda, what is free on the
    GPU now (NVML), since other processes and earlier sessions hold the rest. None if unknown."""
    if device == "cpu":
        total = meminfo_bytes("MemTotal")
        if total is not None:
            return total
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    gpu = gpu_memory(device_id)
    return None if gpu is None else gpu.free


def plan_memory(
    model: str | os.PathLike | ModelSpec,
    batch: int = 1,
    context: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    capacity: int | None = None,
    prefix_cache_bytes: int = 0,
) -> MemoryPlan:
    """Plan memory for ``batch`` sequences of ``context`` tokens (default: the model's window).

    ``model``: a :class:`ModelSpec`, a package, a checkpoint, a config.json or a hub id. ``dtype``:
    the weights' precision (default: the package's, else fp32). ``capacity``: bytes available
    (default: the host's RAM, or the memory free on the GPU now). Weights are a package's real file size, or
    parameters x bytes per parameter from a config. ``prefix_cache_bytes``: a prefix cache's budget,
    planned as held whole.
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec.load(model)
    device_id = 0
    if device.startswith("cuda:") and device[5:].isdigit():
        device, device_id = "cuda", int(device[5:])
    if device not in RUNTIME_BASELINE:
        raise InvalidRequestError(f"device {device!r} is not known to the planner; use cpu, cuda or cuda:N")
    if batch < 1:
        raise InvalidRequestError(f"batch must be >= 1, not {batch}")
    context = spec.context_length if context is None else context
    if context < 1:
        raise InvalidRequestError(f"context must be >= 1, not {context}")
    dtype = dtype or spec.dtype
    per_param = _bytes_per(dtype)
    if spec.weights_file_bytes is not None and dtype == spec.dtype:
        weights = spec.weights_file_bytes
    else:
        weights = math.ceil(spec.parameters * per_param)
    kv_cache, working, total = _total(spec, batch, context, dtype, device, weights)
    total += prefix_cache_bytes + spec.adapter_bytes
    if capacity is not None:
        source = "given"
    else:
        capacity = device_capacity(device, device_id)
        if device == "cpu":
            source = "host RAM" if capacity is not None else "unknown"
        else:
            gpu = gpu_memory(device_id) if capacity is not None else None
            source = (
                f"free on cuda:{device_id} ({gpu.name})"
                if gpu
                else f"unknown: no NVIDIA driver answers for cuda:{device_id}"
            )
    per_token = kv_cache // (batch * context)
    fits = max_batch = max_context = None
    if capacity is not None:
        fits = total <= capacity and context <= spec.context_length

        def ok(b: int, t: int) -> bool:
            return _total(spec, b, t, dtype, device, weights)[2] + prefix_cache_bytes + spec.adapter_bytes <= capacity

        max_batch = _largest(lambda b: ok(b, context), 1 << 20)
        max_context = _largest(lambda t: ok(batch, t), spec.context_length)
    name = str(model) if not isinstance(model, ModelSpec) else spec.architecture
    return MemoryPlan(
        name,
        device,
        dtype,
        batch,
        context,
        spec.parameters,
        weights,
        per_token,
        per_token * context,
        kv_cache,
        working,
        total,
        capacity,
        fits,
        max_batch,
        max_context,
        spec.context_length,
        source,
        prefix_cache_bytes,
        spec.adapter_bytes,
    )


def _largest(ok, limit: int) -> int:
    """The largest n in [1, limit] with ok(n) (ok monotone decreasing), 0 when none."""
    if not ok(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def measure_peak(
    package: str | os.PathLike, batch: int, context: int, threads: int | None = None, new_tokens: int = 8
) -> dict[str, int]:
    """Load ``package`` on the CPU and generate ``new_tokens`` after prompts of ``context -
    new_tokens`` tokens at ``batch``: the process's peak resident memory during generation, and
    over its whole life (loading included). Meant for a fresh process (``nextoken memory --measure``)."""
    import numpy as np

    from ..engine import Engine

    if context <= new_tokens:
        raise InvalidRequestError(f"context must be > {new_tokens} to measure")
    with Engine(package, device="cpu", threads=threads) as engine:
        rng = np.random.default_rng(0)
        vocab = engine.manifest.vocab_size
        prompts = [rng.integers(min(3, vocab - 1), vocab, size=context - new_tokens).tolist() for _ in range(batch)]
        lifetime_before = peak_rss_bytes() or 0
        reset_peak_rss()
        completion = engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        peak = peak_rss_bytes() or 0
    return {
        "peak_bytes": peak,
        "lifetime_peak_bytes": max(peak, lifetime_before),
        "batch": batch,
        "context": context,
        "kv_cache_bytes": completion[0].usage.kv_cache_bytes,
    }


#: The server's default prefix cache: this share of the memory left after the plan, at most the cap.
PREFIX_CACHE_SHARE, PREFIX_CACHE_CAP = 0.25, 4 << 30


def prefix_cache_budget(package: str | os.PathLike, batch: int, context: int, device: str = "cpu") -> tuple[int, str]:
    """The prefix cache a server gets when the operator sets none: a quarter of the memory free now
    (RAM available, or free on the GPU) after what :func:`plan_memory` says the server needs
    (weights, ``batch`` sequences of ``context`` tokens of KV cache, working memory), at most 4 GiB.
    Returns (bytes, why), 0 when nothing is left, the memory is unknown, or the package cannot
    use one (longrope)."""
    from ..manifest import Manifest

    if Manifest.load(Path(package)).rope_switch:
        return 0, "off: a longrope package switches its rotary factors, so prefixes cannot be shared"
    cuda = device.startswith("cuda")
    device_id = int(device[5:]) if device.startswith("cuda:") and device[5:].isdigit() else 0
    if cuda:
        gpu = gpu_memory(device_id)
        free = None if gpu is None else gpu.free
    else:
        free = meminfo_bytes("MemAvailable")
    if free is None:
        return 0, "off: the free memory is unknown here; set --prefix-cache-mb"
    try:
        plan = plan_memory(package, batch, context, device="cuda" if cuda else "cpu", capacity=free)
    except (ModelPackageError, InvalidRequestError) as exc:
        return 0, f"off: the memory planner cannot read this package ({exc}); set --prefix-cache-mb"
    left = free - plan.total_bytes
    if left <= 0:
        return (
            0,
            f"off: the plan ({plan.total_bytes / 2**30:.1f} GiB) leaves nothing of the {free / 2**30:.1f} GiB free",
        )
    budget = int(min(left * PREFIX_CACHE_SHARE, PREFIX_CACHE_CAP))
    return budget, f"a quarter of the {left / 2**30:.1f} GiB free after the plan, at most 4 GiB"
