"""nextoken's own graph builder: a checkpoint's safetensors written straight into an ONNX graph on
onnxruntime's fused operators, with no torch at all (numpy, onnx, and the checkpoint's files).

Covered: the :data:`ARCHITECTURES` (what each uses: :data:`FAMILIES`), in fp32 and fp16 (rotary
scaling and partial rotation: :func:`rotary`). Per layer:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual fused; gpt2:
    LayerNormalization / SkipLayerNormalization with the previous projection's bias fused)
    -> one QKV MatMul (+ bias: qwen2, gpt2) -> GroupQueryAttention (KV cache, causal; rotary
       inside, or gpt2's learned positions added to the embeddings; sliding window for mistral,
       mixtral and phi3, per layer for gemma2/3) -> MatMul -> Skip(Simplified)LayerNormalization
    -> gate and up MatMuls -> SiLU or GELU(gate) * up -> down MatMul (gpt2: MatMul -> FastGelu
       with its bias -> MatMul; qwen3_moe and mixtral: the router's MatMul -> MoE, the experts'
       gate/up interleaved, top-k of the softmax)

then the final norm, the last ``logits_to_keep`` positions only, and the LM head as a Gemm over
the embedding matrix when the checkpoint ties them (stored once). gemma's (1 + weight) norms are
folded into the weights, its embedding scale is one Mul; qwen3's per-head q/k norms run between
the QKV MatMul and attention; granite's multipliers are folded into the weights (residual, logits)
or are one Mul (embedding) and attention's scale; smollm3's layers without rotary leave it out of
their attention. Positions come from the attention
mask (padding on the right), as in onnxruntime-genai's graphs, so continuous batching can use the
fixed-slot KV backend. Anything else is :class:`BuilderUnavailable`; ``nextoken export --backend
nextoken`` then exports optimum's graph, saying so.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextoken.errors import ExportError

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "POOLINGS",
    "TASKS",
    "BuilderUnavailable",
    "build",
    "coverage_table",
    "covers",
    "embedding_spec",
    "local_folder",
    "read_safetensors",
    "rotary",
]

#: what a graph is built for: next-token logits over a KV cache, or one vector a sequence
TASKS = ("generate", "embed")
#: how an embedding graph makes one vector of a sequence's hidden states
POOLINGS = ("last", "mean", "cls")

ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "granite",
    "smollm3",
    "olmo2",
    "qwen3_moe",
    "mixtral",
    "gpt_oss",
    "gpt2",
)
#: what each family stands for and what of it the builder writes beyond the plain recipe (the
#: README's table is :func:`coverage_table`, tested to match)
FAMILIES = {
    "llama": ("Llama 2, Llama 3.1 / 3.2, SmolLM2", "llama3, linear, yarn, dynamic rope scaling"),
    "mistral": ("Mistral 7B", "sliding window"),
    "qwen2": ("Qwen2.5", "QKV bias"),
    "qwen3": ("Qwen3", "per-head q/k norms"),
    "phi3": (
        "Phi-3-mini, Phi-3.5-mini, Phi-3-128k, Phi-4-mini",
        "packed QKV and gate/up, longrope (run again at the switch), partial rotary, sliding window",
    ),
    "gemma": ("Gemma 1", "(1 + weight) norms, embedding scale"),
    "gemma2": ("Gemma 2", "four norms a layer, alternating windows, attention and final soft-caps"),
    "gemma3_text": ("Gemma 3 (270M, 1B, text)", "four norms, per-head q/k norms, local and global rotary bases"),
    "granite": ("Granite 3", "embedding, attention, residual and logit multipliers"),
    "smollm3": ("SmolLM3", "layers without rotary"),
    "olmo2": ("OLMo 2", "norms after attention and MLP, whole q/k norms"),
    "qwen3_moe": (
        "Qwen3-MoE (30B-A3B, 235B-A22B)",
        "per-head q/k norms, experts on MoE (int4/int8: QMoE), dense layers",
    ),
    "mixtral": ("Mixtral 8x7B, 8x22B", "experts on MoE (int4/int8: QMoE), sliding window"),
    "gpt_oss": (
        "gpt-oss (20B, 120B)",
        "attention sinks, alternating windows, clamped SwiGLU experts with biases, router and attention biases, yarn",
    ),
    "gpt2": ("GPT-2", "learned positions, LayerNorm, biases"),
}


def coverage_table() -> str:
    """The README's table: each family the builder writes, what it stands for, what it uses, and
    the precisions every test runs it in (all on the fused path)."""
    rows = [
        "| family | stands for | what the graph uses | fp32 | fp16 | int8 | int4 | route |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {arch} | {FAMILIES[arch][0]} | {FAMILIES[arch][1]} | yes | yes | yes | yes | fused |"
        for arch in ARCHITECTURES
    ]
    return "\n".join(rows)


#: families whose norms scale by (1 + weight) and whose embeddings are scaled by sqrt(hidden)
GEMMAS = ("gemma", "gemma2", "gemma3_text")
#: config fields that scale a family's activations (Granite's multipliers), by what they scale
MULTIPLIERS = {
    "granite": {
        "emb_scale": "embedding_multiplier",
        "attn_scale": "attention_multiplier",
        "residual_scale": "residual_multiplier",
        "logit_divisor": "logits_scaling",
    }
}
#: mixture-of-experts families: the config fields naming the expert count and an expert's width
#: (the router's top-k is ``num_experts_per_tok`` in both)
MOES = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "mixtral": ("num_local_experts", "intermediate_size"),
    "gpt_oss": ("num_local_experts", "intermediate_size"),
}
#: gpt-oss's expert activation: (up + 1) * gate * sigmoid(1.702 gate), gate clamped above at 7 and
#: up within +-7 (transformers' GptOssExperts), as MoE's swiglu (alpha, beta, limit)
GPT_OSS_SWIGLU = (1.702, 1.0, 7.0)
#: the router's MatMul of layer i is named ROUTER + i: quantisation leaves it in float (an int4
#: router's rounding changes which experts a token takes, a larger error than any expert's own)
ROUTER = "router"
#: The initializer of an LM head untied from the embedding for quantisation (``untie_head``).
TIED_HEAD = "tied_head"
DTYPES = ("fp32", "fp16")
#: the projections a LoRA adapter may target (PEFT's q_proj ... down_proj)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class BuilderUnavailable(ExportError):
    """nextoken's builder does not cover this model (architecture, head size, rotary scaling ...)."""


class Tensors(Mapping):
    """The tensors of a checkpoint's ``*.safetensors`` files, read on access from memory maps: an
    fp32 tensor is a view of the file (no copy), a bf16/fp16 one is widened to fp32 when asked for,
    so building a graph holds one layer's weights at a time, not the checkpoint twice over. Names
    can be given a prefix to drop (hub gpt2 checkpoints lack ``transformer.``); ``overrides`` hold
    tensors set by the builder."""

    def __init__(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise BuilderUnavailable(f"{folder} has no .safetensors weights")
        self._where: dict[str, tuple[np.ndarray, str, int, int, list[int]]] = {}
        self.overrides: dict[str, np.ndarray] = {}
        for path in files:

            def bad(
                why: str, path: Path = path
            ) -> ExportError:  # a broken file is an error, not a case for another exporter
                return ExportError(
                    f"{path} is not a valid safetensors file ({why}); download or save the checkpoint again"
                )

            data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
            if len(data) < 8:
                raise bad("shorter than its 8-byte header length")
            (size,) = struct.unpack("<Q", bytes(data[:8]))
            if 8 + size > len(data):
                raise bad(f"its header claims {size} bytes, the file has {len(data) - 8}")
            try:
                header = json.loads(bytes(data[8 : 8 + size]))
                entries = [
                    (name, info["dtype"], *map(int, info["data_offsets"]), [int(d) for d in info["shape"]])
                    for name, info in header.items()
                    if name != "__metadata__"
                ]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise bad(f"unreadable header: {type(exc).__name__}: {exc}") from None
            for name, kind, start, end, shape in entries:
                if kind not in _DTYPES:
                    raise BuilderUnavailable(f"{path.name}: tensor {name} is {kind}, which the builder does not read")
                width = 2 if kind in ("F16", "BF16") else np.dtype(_DTYPES[kind]).itemsize
                if not 0 <= start <= end or end - start != width * int(np.prod(shape)) or 8 + size + end > len(data):
                    raise bad(
                        f"tensor {name}'s bytes [{start}, {end}) do not fit its shape {shape} or the file "
                        "(a truncated download?)"
                    )
                self._where[name] = (data, kind, 8 + size + start, 8 + size + end, shape)

    def drop_prefix(self, prefix: str) -> None:
        self._where = {k.removeprefix(prefix): v for k, v in self._where.items()}

    def add_prefix(self, prefix: str) -> None:
        self._where = {prefix + k: v for k, v in self._where.items()}

    def nbytes(self) -> int:
        """The tensors' size once widened to fp32."""
        return sum(4 * int(np.prod(shape)) for *_, shape in self._where.values())

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.overrides:
            return self.overrides[name]
        data, kind, start, end, shape = self._where[name]
        raw = data[start:end]
        if kind == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        array = raw.view(_DTYPES[kind]).reshape(shape)
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        self.overrides[name] = array

    def __iter__(self) -> Iterator[str]:
        return iter({**self._where, **self.overrides})

    def __len__(self) -> int:
        return len({**self._where, **self.overrides})


def read_safetensors(folder: Path) -> Tensors:
    """Every tensor of the checkpoint's ``*.safetensors`` files as float32 numpy arrays (bf16 and
    fp16 widened), read on access (see :class:`Tensors`)."""
    return Tensors(folder)


@dataclass
class _Shape:
    """A checkpoint's config in one vocabulary, whatever the architecture calls its fields."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head: int
    eps: float
    context: int
    theta: float | None  # None: no rotary (gpt2's learned positions)
    window: int | None
    norm: str  # "rms" or "layer"
    act: str  # "silu", "gelu_tanh" or "gelu" (erf)
    #: the rotary inverse frequencies (over the rotated dimensions: a prefix of each head when the
    #: rotation is partial) and the factor on cos and sin, as the checkpoint's rope scaling makes them
    inv_freq: np.ndarray | None = None
    rope_factor: float = 1.0
    #: what the graph uses beyond the family's plain recipe, for the export's summary
    features: tuple[str, ...] = ()
    #: the embedding's factor, attention's softmax scale (None: 1/sqrt(head)), the factor on what each
    #: block adds to the residual (folded into o_proj and down_proj), and the logits' divisor (folded
    #: into the final norm's weight)
    emb_scale: float = 1.0
    attn_scale: float | None = None
    residual_scale: float = 1.0
    logit_divisor: float = 1.0
    #: which layers rotate q and k (None: all; SmolLM3 leaves every fourth without)
    rope_layers: tuple[bool, ...] | None = None
    #: RMS norms of q and k before the rotation: over each head ("head": qwen3) or over all of q and
    #: of k ("all": olmo2); None: none
    qk_norm: str | None = None
    #: where the norms of a block are: before attention and the MLP ("pre"), on what they add to
    #: the residual instead ("post": olmo2), or both ("sandwich": gemma2, gemma3)
    norms: str = "pre"
    #: per layer: its sliding window (None: full attention), where layers differ (gemma2, gemma3)
    layer_windows: tuple[int | None, ...] | None = None
    #: the rotary inverse frequencies of the sliding layers, where they have their own base (gemma3)
    local_inv_freq: np.ndarray | None = None
    #: longrope: the long factors' frequencies, used by a row once it is longer than ``rope_switch``
    long_inv_freq: np.ndarray | None = None
    rope_switch: int = 0
    #: attention's logit soft-cap and the final logits' (0: none)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    #: mixture of experts: how many, how many a token takes, whether their weights are renormalised
    #: over those taken, and which layers have them (the others have a dense MLP)
    experts: int = 0
    top_k: int = 0
    renormalize: bool = True
    moe_layers: tuple[bool, ...] = ()
    #: the experts' SwiGLU as MoE takes it: (alpha, beta, limit or None): silu(gate) * up is (1, 0, None)
    swiglu: tuple[float, float, float | None] = (1.0, 0.0, None)
    #: attention sinks (gpt-oss): a learned logit per head that takes its share of the softmax
    sinks: bool = False

    @property
    def post_norms(self) -> bool:
        return self.norms in ("post", "sandwich")

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq) if self.inv_freq is not None else 0

    @property
    def stored_head(self) -> int:
        """The head size the graph runs: GroupQueryAttention needs a multiple of 16, so a smaller
        or odd head is padded with zero dimensions (they add nothing to q.k or to the output)."""
        return -(-self.head // 16) * 16


def checkpoint_shape(folder: Path) -> "_Shape":
    """The model's dimensions as the builder reads them from ``folder``'s config.json (a checkpoint
    or a package, which carries its checkpoint's config)."""
    return _shape(_config(folder))


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise BuilderUnavailable(f"{folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); download or save the checkpoint again") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} holds a {type(config).__name__}, not a config object")
    return config


def _shape(config: dict[str, Any]) -> _Shape:
    """What the builder needs from ``config``; :class:`BuilderUnavailable` for what it does not
    build, :class:`ExportError` for a config that lacks what its architecture needs."""
    try:
        return _read_shape(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        what = f"lacks {exc.args[0]}" if isinstance(exc, KeyError) else f"has a bad value ({exc})"
        raise ExportError(f"config.json {what}; is it a complete {config.get('model_type')} config?") from None


#: rotary scaling the builder writes (transformers' ``rope_type`` names); the rest is optimum's
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rotary(config: dict[str, Any], head: int) -> tuple[np.ndarray, float, tuple[str, ...]]:
    """(inverse frequencies, the factor on cos and sin, the features used) of ``config``'s rotary
    embedding, as transformers computes them (``modeling_rope_utils``): over ``partial_rotary_factor``
    of each head; ``linear`` divides the frequencies, ``llama3`` divides the long wavelengths and
    blends the middle ones, ``yarn`` blends interpolation and extrapolation by a ramp and scales cos
    and sin, ``dynamic`` is the plain rotation up to the model's window (the package's length)."""
    base = float(config.get("rope_theta", 10000.0))
    partial = float(config.get("partial_rotary_factor", 1.0))
    dim = int(head * partial)
    if dim < 2 or dim > head or dim % 2:
        raise ExportError(f"partial_rotary_factor {partial} rotates {dim} of {head} head dimensions")
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    features: tuple[str, ...] = (f"partial rotary {dim}/{head}",) if dim != head else ()
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise BuilderUnavailable(f"rotary scaling {kind!r} is not built yet")
    if kind == "default":
        return inv, 1.0, features
    if kind == "longrope":  # the short factors here; the long ones: longrope()
        short, _, attention, switch = longrope(config, head)
        return short, attention, features + (f"longrope (long factors past {switch})",)
    factor = float(scaling["factor"])
    features += (f"{kind} rope scaling",)
    if kind == "linear":
        return inv / factor, 1.0, features
    if kind == "dynamic":
        # transformers grows the base only past max_position_embeddings, the package's window
        return inv, 1.0, features
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0, features
    # yarn
    original = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    given = scaling.get("attention_factor")
    if given is not None:
        attention = float(given)
    else:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction(fast), correction(slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    blended = inv / factor * (1 - extrapolation) + inv * extrapolation
    return blended, float(attention), features


def longrope(config: dict[str, Any], head: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(short inverse frequencies, long ones, the factor on cos and sin, the length past which the
    long ones rotate) of a ``longrope`` config (Phi-3.5, Phi-3-128k, Phi-4-mini), as transformers
    computes them: the long factors once the sequence is longer than
    ``original_max_position_embeddings``."""
    scaling = config["rope_scaling"]
    base = float(config.get("rope_theta", 10000.0))
    dim = int(head * float(config.get("partial_rotary_factor", 1.0)))
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    short, long = (np.asarray(scaling[k], dtype=np.float64) for k in ("short_factor", "long_factor"))
    if short.shape != (dim // 2,) or long.shape != (dim // 2,):
        raise ExportError(f"longrope factors must hold {dim // 2} values each (rotary dimension {dim})")
    original = config.get("original_max_position_embeddings")
    factor = scaling.get("factor")
    if original:
        factor = config["max_position_embeddings"] / original
    else:
        original = config["max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0 / (short * base**exponents), 1.0 / (long * base**exponents), float(attention), int(original)


def _read_shape(config: dict[str, Any]) -> _Shape:
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise BuilderUnavailable(f"the builder covers {', '.join(ARCHITECTURES)}, not {arch!r}")
    quantized = config.get("quantization_config")
    if quantized:  # e.g. gpt-oss's MXFP4 experts, GPTQ, AWQ: other tensors than the float ones
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise BuilderUnavailable(
            f"the checkpoint's weights are quantised ({method}); the builder reads float "
            "checkpoints (fp32, fp16, bf16): export a dequantised copy (transformers can save "
            "one) and quantise with --quantize"
        )
    if arch == "gpt2":
        hidden, heads = config["n_embd"], config["n_head"]
        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise BuilderUnavailable(f"activation {config.get('activation_function')!r} is not built yet")
        if (
            config.get("scale_attn_by_inverse_layer_idx")
            or config.get("reorder_and_upcast_attn")
            or not config.get("scale_attn_weights", True)
        ):
            raise BuilderUnavailable("gpt2's attention scaling variants are not built yet")
        shape = _Shape(
            arch,
            hidden,
            config["n_layer"],
            heads,
            heads,
            hidden // heads,
            float(config.get("layer_norm_epsilon", 1e-5)),
            int(config.get("n_positions", 1024)),
            None,
            None,
            "layer",
            "gelu_tanh",
        )
    else:
        act = (config.get("hidden_activation") if arch in ("gemma2", "gemma3_text") else None) or config.get(
            "hidden_act", "silu"
        )  # what transformers runs
        acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
        if act not in acts:
            raise BuilderUnavailable(f"activation {act!r} is not built yet")
        heads = config["num_attention_heads"]
        window = (
            config.get("sliding_window")
            if arch in ("mistral", "phi3", "mixtral") or config.get("use_sliding_window")
            else None
        )
        head = config.get("head_dim") or config["hidden_size"] // heads
        if arch in ("qwen3", "qwen3_moe") and (head % 16 or config.get("use_sliding_window")):
            raise BuilderUnavailable(
                f"{arch} with heads that are not multiples of 16, or sliding windows, is not built yet"
            )
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0 and arch != "phi3":
            raise BuilderUnavailable(f"partial rotary embeddings are built for phi3, not {arch}")
        inv_freq, factor, features = rotary(config, head)
        qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmo2": "all", "gemma3_text": "head"}.get(arch)
        if qk_norm:
            features = (f"q/k norms ({'per head' if qk_norm == 'head' else 'whole'})",) + features
        if arch == "olmo2":
            features = ("norms after attention and MLP",) + features
        if 2 * len(inv_freq) != head and (head % 16 or len(inv_freq) % 8):
            # GroupQueryAttention rotates a prefix of the head whose half is a multiple of 8
            raise BuilderUnavailable(
                f"partial rotary of {2 * len(inv_freq)} of a head of {head} is not built yet "
                "(GroupQueryAttention rotates multiples of 16 in heads of multiples of 16)"
            )
        if arch == "smollm3" and config.get("use_sliding_window"):
            raise BuilderUnavailable("smollm3 with sliding windows is not built yet")
        if config.get("mlp_bias") or (config.get("attention_bias") and arch not in ("qwen2", "gpt_oss")):
            raise BuilderUnavailable(f"{arch} with attention or MLP biases is not built yet")
        scales: dict[str, Any] = {
            key: float(config.get(field, 1.0)) for key, field in MULTIPLIERS.get(arch, {}).items()
        }
        if scales:
            features = (f"{arch} multipliers",) + features
        layers = config["num_hidden_layers"]
        rope_layers = None
        if arch == "smollm3":
            rope_layers = tuple(bool(x) for x in config["no_rope_layers"][:layers])
            if len(rope_layers) != layers:
                raise ExportError(f"no_rope_layers names {len(rope_layers)} layers, the model has {layers}")
            if not all(rope_layers):
                features = (f"{rope_layers.count(False)}/{layers} layers without rotary",) + features
        moe: dict[str, Any] = _experts(config, arch, layers) if arch in MOES else {}
        if moe:
            features = (
                f"{moe['experts']} experts, top {moe['top_k']}"
                + (f", {sum(moe['moe_layers'])}/{layers} layers" if not all(moe["moe_layers"]) else ""),
            ) + features
        long: dict[str, Any] = {}
        kind = (config.get("rope_scaling") or {}).get("rope_type") or (config.get("rope_scaling") or {}).get("type")
        if kind == "longrope":
            _, long_inv, _, switch = longrope(config, head)
            long = {"long_inv_freq": long_inv, "rope_switch": switch}
        gemma: dict[str, Any] = {}
        if arch in GEMMAS:
            gemma["emb_scale"] = config["hidden_size"] ** 0.5
        if arch in ("gemma2", "gemma3_text", "gpt_oss"):
            kinds = list(config.get("layer_types") or [])
            if len(kinds) != layers or not set(kinds) <= {"sliding_attention", "full_attention"}:
                raise BuilderUnavailable(f"{arch} layer_types {kinds!r} are not built yet")
            slide = int(config["sliding_window"])
            gemma["layer_windows"] = tuple(slide if k == "sliding_attention" else None for k in kinds)
            window = None
            features = (f"{kinds.count('sliding_attention')}/{layers} layers in a {slide}-token window",) + features
        if arch == "gpt_oss":
            gemma.update(sinks=True, swiglu=GPT_OSS_SWIGLU)
            features = ("attention sinks", "clamped SwiGLU experts") + features
        if arch in ("gemma2", "gemma3_text"):
            gemma.update(
                norms="sandwich",
                attn_scale=float(config["query_pre_attn_scalar"]) ** -0.5,
                attn_softcap=float(config.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(config.get("final_logit_softcapping") or 0.0),
            )
            features = features[:1] + ("four norms a layer",) + features[1:]
            if gemma["attn_softcap"] or gemma["final_softcap"]:
                features += ("soft-capping",)
            if arch == "gemma3_text":
                local = dict(config, rope_theta=config.get("rope_local_base_freq", 10000.0), rope_scaling=None)
                gemma["local_inv_freq"] = rotary(local, head)[0]
                features += ("local rotary base",)
        shape = _Shape(
            arch,
            config["hidden_size"],
            layers,
            heads,
            config.get("num_key_value_heads") or heads,
            head,
            float(config.get("rms_norm_eps", 1e-6)),
            int(config.get("max_position_embeddings", 2048)),
            float(config.get("rope_theta", 10000.0)),
            int(window) if window else None,
            "rms",
            acts[act],
            inv_freq,
            factor,
            features,
            rope_layers=rope_layers,
            qk_norm=qk_norm,
            **(dict[str, Any](norms="post") if arch == "olmo2" else {}),
            **scales,
            **gemma,
            **long,
            **moe,
        )
    return shape


def _experts(config: dict[str, Any], arch: str, layers: int) -> dict[str, Any]:
    """The mixture of experts of a :data:`MOES` family: count, top-k, renormalisation, and which
    layers have experts (Qwen3-MoE: every ``decoder_sparse_step``-th, less ``mlp_only_layers``)."""
    count_field, _ = MOES[arch]
    experts, top_k = int(config[count_field]), int(config["num_experts_per_tok"])
    if not 0 < top_k <= experts:
        raise ExportError(f"num_experts_per_tok {top_k} is not between 1 and {count_field} {experts}")
    if arch in ("mixtral", "gpt_oss"):  # gpt-oss: a softmax over the top k's logits, the same thing
        return dict(experts=experts, top_k=top_k, renormalize=True, moe_layers=(True,) * layers)
    step, dense = int(config.get("decoder_sparse_step", 1)), set(config.get("mlp_only_layers") or ())
    return dict(
        experts=experts,
        top_k=top_k,
        renormalize=bool(config.get("norm_topk_prob", False)),
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
    )


def covers(config: dict[str, Any]) -> None:
    """Nothing when the builder writes the model of ``config`` (a config.json as a dict), else
    :class:`BuilderUnavailable` saying why."""
    _shape(config)


def pad_heads(w: np.ndarray, heads: int, head: int, stored: int) -> np.ndarray:
    """``w`` ``[heads * head, out]`` (the rows that read attention's output, head after head) with
    each head's rows padded with zeros to ``stored``: the padded dimensions add nothing."""
    if stored == head:
        return w
    padded = np.zeros((heads, stored, w.shape[1]), dtype=w.dtype)
    padded[:, :head] = w.reshape(heads, head, w.shape[1])
    return padded.reshape(heads * stored, w.shape[1])


def _layer(shape: _Shape, weights: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Layer ``i``'s weights under one set of names, oriented for ``x @ W``: ln1 (+ ln1_b), qkv
    (+ qkv_b), o (+ o_b), ln2 (+ ln2_b), then gate/up/down (gated MLP) or fc (+ fc_b)/proj (+ proj_b);
    o's input heads padded to the stored head size (the graph pads q, k and v after the rotary)."""
    out = _layer_weights(shape, weights, i)
    h, q, kv = shape.hidden, shape.heads * shape.head, shape.kv_heads * shape.head
    if "fc1" in out:  # experts: [E, 2 x inner (gate, up interleaved), h], [E, h, inner]
        e, inner = shape.experts, out["fc2"].shape[-1]
        mlp = {"router": (h, e), "fc1": (e, 2 * inner, h), "fc2": (e, h, inner)}
    elif "fc" in out:
        inner = out["fc"].shape[1]
        mlp = {"fc": (h, inner), "proj": (inner, h)}
    else:
        inner = out["gate"].shape[1]
        mlp = {"gate": (h, inner), "up": (h, inner), "down": (inner, h)}
    want = {"qkv": (h, q + 2 * kv), "o": (q, h), **mlp}
    for name, expected in want.items():
        if out[name].shape != expected:
            raise ExportError(
                f"the checkpoint's weights do not match its config.json: layer {i}'s {name} is "
                f"{list(out[name].shape)} (as x @ W), the config says {list(expected)} (hidden "
                f"{h}, {shape.heads} heads and {shape.kv_heads} KV heads of {shape.head})"
            )
    out["o"] = pad_heads(out["o"], shape.heads, shape.head, shape.stored_head)
    if shape.residual_scale != 1.0:  # what a block adds to the residual, scaled
        out["o"], out["down"] = out["o"] * shape.residual_scale, out["down"] * shape.residual_scale
    return out


def _layer_weights(shape: _Shape, weights: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    def w(name: str) -> np.ndarray:
        try:
            return weights[name]
        except KeyError:
            raise BuilderUnavailable(f"the checkpoint has no weight {name}") from None

    if shape.arch == "gpt2":
        p = f"h.{i}."
        return {
            "ln1": w(p + "ln_1.weight"),
            "ln1_b": w(p + "ln_1.bias"),
            "qkv": w(p + "attn.c_attn.weight"),
            "qkv_b": w(p + "attn.c_attn.bias"),
            "o": w(p + "attn.c_proj.weight"),
            "o_b": w(p + "attn.c_proj.bias"),
            "ln2": w(p + "ln_2.weight"),
            "ln2_b": w(p + "ln_2.bias"),
            "fc": w(p + "mlp.c_fc.weight"),
            "fc_b": w(p + "mlp.c_fc.bias"),
            "proj": w(p + "mlp.c_proj.weight"),
            "proj_b": w(p + "mlp.c_proj.bias"),
        }
    p = f"model.layers.{i}."
    shift = 1.0 if shape.arch in GEMMAS else 0.0  # gemma's norms scale by (1 + weight)
    if shape.norms == "post":  # olmo2: a norm on what each part adds
        out = {
            "attn_out_norm": w(p + "post_attention_layernorm.weight"),
            "mlp_out_norm": w(p + "post_feedforward_layernorm.weight"),
            "o": w(p + "self_attn.o_proj.weight").T,
        }
    elif shape.norms == "sandwich":  # gemma2/3: before and after each part
        out = {
            "ln1": w(p + "input_layernorm.weight") + shift,
            "attn_out_norm": w(p + "post_attention_layernorm.weight") + shift,
            "ln2": w(p + "pre_feedforward_layernorm.weight") + shift,
            "mlp_out_norm": w(p + "post_feedforward_layernorm.weight") + shift,
            "o": w(p + "self_attn.o_proj.weight").T,
        }
    else:
        out = {
            "ln1": w(p + "input_layernorm.weight") + shift,
            "o": w(p + "self_attn.o_proj.weight").T,
            "ln2": w(p + "post_attention_layernorm.weight") + shift,
        }
    if shape.arch == "gpt_oss":
        # one tensor for all experts, as x @ W: gate_up [E, h, 2 x inner] with gate and up already
        # interleaved (MoE's layout once turned), down [E, inner, h]; biases for both and the router
        out["router"], out["router_b"] = w(p + "mlp.router.weight").T, w(p + "mlp.router.bias")
        out["fc1"] = np.ascontiguousarray(w(p + "mlp.experts.gate_up_proj").transpose(0, 2, 1))
        out["fc1_b"] = w(p + "mlp.experts.gate_up_proj_bias")
        out["fc2"] = np.ascontiguousarray(w(p + "mlp.experts.down_proj").transpose(0, 2, 1))
        out["fc2_b"] = w(p + "mlp.experts.down_proj_bias")
        out["sinks"] = w(p + "self_attn.sinks")
        out["o_b"] = w(p + "self_attn.o_proj.bias")
    elif shape.moe_layers and shape.moe_layers[i]:
        # the router ([E, h] as x @ W.T) and the experts as MoE reads them: each expert's gate and
        # up rows interleaved in one [2 x inner, h] (the CPU kernel's only layout), down as [h, inner]
        moe, (gate, up, down) = (
            ("block_sparse_moe.", ("w1", "w3", "w2"))
            if shape.arch == "mixtral"
            else ("mlp.", ("gate_proj", "up_proj", "down_proj"))
        )
        experts = [p + f"{moe}experts.{e}." for e in range(shape.experts)]
        out["router"] = w(p + moe + "gate.weight").T
        out["fc1"] = np.stack(
            [
                np.stack([w(x + gate + ".weight"), w(x + up + ".weight")], axis=1).reshape(-1, shape.hidden)
                for x in experts
            ]
        )
        out["fc2"] = np.stack([w(x + down + ".weight") for x in experts])
    else:
        out["down"] = w(p + "mlp.down_proj.weight").T
    if shape.arch == "phi3":
        out["qkv"] = w(p + "self_attn.qkv_proj.weight").T
        gate_up = w(p + "mlp.gate_up_proj.weight")
        out["gate"], out["up"] = gate_up[: len(gate_up) // 2].T, gate_up[len(gate_up) // 2 :].T
    else:
        out["qkv"] = np.concatenate(
            [w(p + "self_attn.q_proj.weight"), w(p + "self_attn.k_proj.weight"), w(p + "self_attn.v_proj.weight")],
            axis=0,
        ).T
        if "fc1" not in out:
            out["gate"], out["up"] = w(p + "mlp.gate_proj.weight").T, w(p + "mlp.up_proj.weight").T
        if p + "self_attn.q_proj.bias" in weights:
            out["qkv_b"] = np.concatenate(
                [w(p + "self_attn.q_proj.bias"), w(p + "self_attn.k_proj.bias"), w(p + "self_attn.v_proj.bias")]
            )
    if shape.qk_norm:  # RMS norms of q and of k (per head or whole)
        out["q_norm"] = w(p + "self_attn.q_norm.weight") + shift
        out["k_norm"] = w(p + "self_attn.k_norm.weight") + shift
    return out


#: Weights over this many bytes go to ``model.onnx_data`` beside the graph, written as they are made
#: and page-aligned: on the 135M model (538 MB) the export took 0.8 s and 0.6 GB of memory instead
#: of 6.1 s and 3.1 GB through one protobuf, and the engine loads in 0.54 s instead of 1.23 s
#: (protobuf cannot hold over 2 GB at all).
EXTERNAL_ABOVE = 32 << 20


class _Graph:
    """The graph being written: its initializers (external data written as they are made) and nodes."""

    def __init__(self, shape: _Shape, dtype: str, data_file) -> None:
        from onnx import TensorProto

        self.shape, self.data_file = shape, data_file
        self.float_t = np.float16 if dtype == "fp16" else np.float32
        self.elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
        #: the KV cache's element type (int8 with per-layer scales, ``kv_scales``, else the graph's)
        self.kv_elem = self.elem
        self.kv_scales: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
        self.kv_bits = 8  # with kv_scales: 8 (int8) or 4 (int4, two values a uint8)
        self.inits: list = []
        self.nodes: list = []
        #: the cache each layer's attention reads: the graph's past inputs, or (an embedding graph,
        #: which keeps none) this empty tensor made in the graph
        self.no_past: str | None = None
        #: LoRA: {"adapters", "rank", "targets", "made" (shared nodes made)} when the graph takes
        #: adapters, and their inputs
        self.lora: dict[str, Any] | None = None
        self.lora_inputs: list = []

    def proj(self, layer: int, site: str, x: str, name: str, weight: np.ndarray, out: str) -> None:
        """``out = x @ weight`` (an initializer ``name``), plus each row's LoRA adapter's
        ``(x @ A) @ B`` for the targets at ``site`` (``qkv``: q, k and v, whose deltas are
        concatenated as the fused projection's output is; else the one of its name).

        The targets that read the same input (:data:`~nextoken.adapters.LORA_GROUPS`: q, k, v;
        gate, up) share one input of every adapter's A, turned and stacked (``lora.{layer}.{group}.a
        [targets x adapters x rank, in]``); each target has every adapter's B, turned, side by
        side (``lora.{layer}.{t}.b [out, adapters x rank]``). ``A^T x^T`` for all of them at once
        (one Gemm), each row's other adapters' rows zeroed by its ``lora_ids`` entry (0: all of
        them, no adapter), then each target's ``B^T`` times its part (one Gemm each), turned back.
        The adapters' weights are read once a step whatever the rows (gathering each row's pair
        copied them a row at a time: 7 ms of a 53 ms step at batch 8 on a 135M model), and as
        Gemm's first operand, which onnxruntime's CPU kernel reads in place (as MatMul's second, an
        input and not a weight it packs once at load, it is packed again every call: 265 against
        150 us for a 1.7 MB matrix)."""
        w = self.init(name, weight)
        shape = self.shape
        members = (
            [("q", shape.heads * shape.head), ("k", shape.kv_heads * shape.head), ("v", shape.kv_heads * shape.head)]
            if site == "qkv"
            else [(site, weight.shape[1])]
        )
        if self.lora is None or not any(t in self.lora["targets"] for t, _ in members):
            self.node("MatMul", [x, w], [out])
            return
        self.node("MatMul", [x, w], [f"{out}_base"])
        deltas = self._lora_deltas(layer, site, x, weight.shape[0], dict(members))
        parts = [deltas.get(t) or self._lora_zeros(size) for t, size in members]
        if len(parts) > 1:
            self.node("Concat", parts, [f"{out}_dT"], axis=0)
        else:
            self.node("Identity", parts, [f"{out}_dT"])
        self.node("Transpose", [f"{out}_dT"], [f"{out}_d2"], perm=[1, 0])
        self.node("Reshape", [f"{out}_d2", self._lora_out_shape(weight.shape[1])], [f"{out}_d"])
        self.node("Add", [f"{out}_base", f"{out}_d"], [out])

    def _lora_deltas(self, layer: int, site: str, x: str, size_in: int, sizes: dict[str, int]) -> dict[str, str]:
        """``{target: (x @ A) @ B turned, [out, rows x positions]}`` for the targets of the group
        ``site`` belongs to (made at the group's first projection: gate's, for up's too)."""
        from onnx import helper

        from nextoken.adapters import lora_groups

        lora = self._lora
        group, members = next((g, m) for g, m in lora_groups(lora["targets"]) if site in m or site == g)
        key = f"lora_deltas.{layer}.{group}"
        if key in lora["deltas"]:
            return lora["deltas"][key]
        columns = lora["adapters"] * lora["rank"]
        a = f"lora.{layer}.{group}.a"
        self.lora_inputs.append(helper.make_tensor_value_info(a, self.elem, [len(members) * columns, size_in]))
        flat = self._const(f"lora_flat_in{size_in}", np.array([-1, size_in], dtype=np.int64))
        self.node("Reshape", [x, flat], [f"{a}_x2"])
        self.node("Gemm", [a, f"{a}_x2"], [f"{a}_hT"], transB=1)  # [targets x adapters x rank, positions]
        self.node("Mul", [f"{a}_hT", self._lora_mask(len(members))], [f"{a}_mT"])
        parts = [f"{a}_mT{j}" for j in range(len(members))]
        if len(members) > 1:
            self.node("Split", [f"{a}_mT"], parts, axis=0)
        else:
            parts = [f"{a}_mT"]
        deltas = {}
        for target, part in zip(members, parts):
            b = f"lora.{layer}.{target}.b"
            size = sizes.get(target) or sizes[site]  # gate and up: the same width
            self.lora_inputs.append(helper.make_tensor_value_info(b, self.elem, [size, columns]))
            self.node("Gemm", [b, part], [f"{b}_dT"])  # [out, positions]
            deltas[target] = f"{b}_dT"
        lora["deltas"][key] = deltas
        return deltas

    @property
    def _lora(self) -> dict[str, Any]:
        """The LoRA state of a graph that takes adapters."""
        assert self.lora is not None
        return self.lora

    def _lora_mask(self, times: int = 1) -> str:
        """``[times x adapters x rank, rows x positions]``: 1 where an adapter's rank rows meet the
        positions of a row that takes it, else 0; ``times`` over (made once a graph, and once a
        ``times``)."""
        name, n, rank = "lora_mask", self._lora["adapters"], self._lora["rank"]
        if times > 1:
            tiled = f"lora_mask_x{times}"
            if tiled not in self._lora["made"]:
                self.node("Concat", [self._lora_mask()] * times, [tiled], axis=0)
                self._lora["made"].add(tiled)
            return tiled
        if name in self._lora["made"]:
            return name
        axis0 = self._const("lora_axis0", np.array([0], dtype=np.int64))
        self.node("Unsqueeze", ["lora_ids", axis0], ["lora_ids_row"])  # [1, batch]
        column = self._const("lora_adapter_ids", np.arange(1, n + 1, dtype=np.int64).reshape(n, 1))
        self.node("Equal", ["lora_ids_row", column], ["lora_hot_b"])  # [adapters, batch]
        self.node("Cast", ["lora_hot_b"], ["lora_hot2"], to=self.elem)
        self.node("Unsqueeze", ["lora_hot2", self._const("lora_axis1", np.array([1], dtype=np.int64))], ["lora_hot"])
        self.node(
            "Expand", ["lora_hot", self._const("lora_wide", np.array([1, rank, 1], dtype=np.int64))], ["lora_hot3"]
        )
        by_row = self._const("lora_by_row", np.array([n * rank, -1, 1], dtype=np.int64))
        self.node("Reshape", ["lora_hot3", by_row], ["lora_hot_rows"])  # [adapters x rank, batch, 1]
        self.node("Shape", ["input_ids"], ["lora_rows_positions"])  # [batch, positions]
        head = self._const("lora_rows", np.array([n * rank], dtype=np.int64))
        self.node("Concat", [head, "lora_rows_positions"], ["lora_mask_shape"], axis=0)
        self.node("Expand", ["lora_hot_rows", "lora_mask_shape"], ["lora_mask3"])
        self.node("Reshape", ["lora_mask3", self._const("lora_flat", np.array([n * rank, -1], dtype=np.int64))], [name])
        self._lora["made"].add(name)
        return name

    def _lora_zeros(self, size: int) -> str:
        """``[size, rows x positions]`` of zeros: the delta of a projection no adapter targets."""
        from onnx import helper

        name = f"lora_zeros{size}"
        if name not in self._lora["made"]:
            if "lora_positions" not in self._lora["made"]:
                self.node("ReduceProd", ["lora_rows_positions"], ["lora_positions"], keepdims=1)
                self._lora["made"].add("lora_positions")
            self.node(
                "Concat",
                [self._const(f"lora_size{size}", np.array([size], dtype=np.int64)), "lora_positions"],
                [f"{name}_shape"],
                axis=0,
            )
            zero = helper.make_tensor("zero", self.elem, [1], [0])
            self.node("ConstantOfShape", [f"{name}_shape"], [name], value=zero)
            self._lora["made"].add(name)
        return name

    def _lora_out_shape(self, size: int) -> str:
        """``[batch, positions, size]`` (made once a size)."""
        name = f"lora_out_shape{size}"
        if name not in self._lora["made"]:
            last = self._const(f"lora_last{size}", np.array([size], dtype=np.int64))
            self.node("Concat", ["lora_rows_positions", last], [name], axis=0)
            self._lora["made"].add(name)
        return name

    def _const(self, name: str, array: np.ndarray) -> str:
        """An integer constant the LoRA nodes share, made at its first use."""
        if name not in self._lora["made"]:
            self.init(name, array)
            self._lora["made"].add(name)
        return name

    def past(self, layer: int, kind: str) -> str:
        """The name of layer ``layer``'s past ``kind`` (key or value) that its attention reads."""
        return self.no_past or f"past_key_values.{layer}.{kind}"

    def init(self, name: str, array: np.ndarray, keep_dtype: bool = False) -> str:
        """An initializer (floats in the graph's precision, unless ``keep_dtype``); returns its name."""
        import onnx
        from onnx import helper, numpy_helper

        if array.dtype.kind == "f" and not keep_dtype:
            array = array.astype(self.float_t, copy=False)
        array = np.ascontiguousarray(array)
        if self.data_file is None or array.nbytes < 4096:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        data_file = self.data_file
        offset = -(-data_file.tell() // 4096) * 4096  # page-aligned, for memory mapping
        data_file.seek(offset)
        data_file.write(array.data.cast("B"))
        tensor = onnx.TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
            dims=array.shape,
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for key, value in (("location", "model.onnx_data"), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.inits.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", name: str = "", **attrs) -> None:
        from onnx import helper

        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=name or f"{op}_{len(self.nodes)}", domain=domain, **attrs)
        )

    def first_norm(self, x: str, gamma: np.ndarray, beta: np.ndarray | None, out: str, tag: str) -> None:
        eps = self.shape.eps
        if self.shape.norm == "rms":
            self.node("SimplifiedLayerNormalization", [x, self.init(tag, gamma)], [out], axis=-1, epsilon=eps)
        else:
            assert beta is not None  # a LayerNorm has its bias
            self.node(
                "LayerNormalization",
                [x, self.init(tag, gamma), self.init(tag + "_b", beta)],
                [out],
                axis=-1,
                epsilon=eps,
            )

    def skip_norm(
        self,
        x: str,
        skip: str,
        gamma: np.ndarray,
        beta: np.ndarray | None,
        bias: np.ndarray | None,
        out: str,
        tag: str,
        residual_out: str = "",
    ) -> None:
        """out = norm(x + skip (+ bias)); residual_out = the sum."""
        eps = self.shape.eps
        if self.shape.norm == "rms":
            bias_in = [self.init(tag + "_bias", bias)] if bias is not None else []
            self.node(
                "SkipSimplifiedLayerNormalization",
                [x, skip, self.init(tag, gamma), *bias_in],
                [out, "", "", residual_out],
                domain="com.microsoft",
                epsilon=eps,
            )
        else:
            assert beta is not None  # a LayerNorm has its bias
            ins = [x, skip, self.init(tag, gamma), self.init(tag + "_b", beta)] + (
                [self.init(tag + "_bias", bias)] if bias is not None else []
            )
            self.node("SkipLayerNormalization", ins, [out, "", "", residual_out], domain="com.microsoft", epsilon=eps)


def build(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "fp32",
    untie_head: bool = False,
    external_data: bool | None = None,
    task: str = "generate",
    pooling: str = "last",
    kv_scales: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    kv_bits: int = 8,
    lora: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``output``/model.onnx for the checkpoint folder ``checkpoint``; returns what the
    manifest needs (layers, heads, head size, context, vocabulary). ``task``: ``generate`` (logits
    and the KV cache out) or ``embed`` (a sequence's hidden state after the final norm, pooled as
    ``pooling`` says, out as ``embeddings [batch, hidden]``: :data:`POOLINGS`; no cache, no LM
    head; the input's padding on the right). ``kv_scales``: keep the KV cache in ``kv_bits`` (8:
    int8; 4: int4, two values a byte, so a head of D channels is D / 2 uint8), each layer's
    keys and values scaled by its ``(k_scale, v_scale)``, ``[kv_heads, head_dim]`` each (what
    :func:`calibrate_kv` measures; GroupQueryAttention quantises as it writes and dequantises as it
    reads). ``dtype``: ``fp32``, or ``fp16``
    weights, activations and KV cache (the CUDA precision; logits come out in fp16 and the engine
    samples from them in fp32). ``untie_head``: write a tied LM head as a MatMul of its own (for a
    package about to be quantised: the quantiser then writes it in int4/int8, at an eighth or a
    quarter of the embedding's size; at int4 the lookup then reads that copy too, see
    :func:`~nextoken.exporters.quantize.share_embedding`). ``external_data``: write the
    weights to ``model.onnx_data`` as they are made, one tensor at a time (None: when they are over
    :data:`EXTERNAL_ABOVE`), so a model larger than memory allows twice over still builds.
    ``lora``: ``{"adapters": N, "rank": R, "targets": [...]}``: the graph takes up to N LoRA adapters
    of rank up to R on ``targets`` (:data:`LORA_TARGETS`) as inputs, and each row's adapter by
    ``lora_ids [batch]`` (0: none; see :mod:`nextoken.adapters`)."""
    import onnx
    from onnx import helper

    if dtype not in DTYPES:
        raise BuilderUnavailable(f"the builder writes {' or '.join(DTYPES)} graphs, not {dtype}")
    if task not in TASKS:
        raise ExportError(f"the builder's tasks are {', '.join(TASKS)}, not {task!r}")
    if pooling not in POOLINGS:
        raise ExportError(f"pooling is one of {', '.join(POOLINGS)}, not {pooling!r}")
    folder, output = Path(checkpoint), Path(output)
    shape = _shape(_config(folder))
    weights = read_safetensors(folder)
    if shape.arch == "gpt2":  # hub gpt2 checkpoints name their tensors without the prefix
        weights.drop_prefix("transformer.")
    elif "model.embed_tokens.weight" not in weights and "embed_tokens.weight" in weights:
        weights.add_prefix("model.")  # a base model's checkpoint (an embedding model's, e.g. Qwen3-Embedding)
    emb = weights["wte.weight" if shape.arch == "gpt2" else "model.embed_tokens.weight"]
    head_init = "lm_head"
    if "lm_head.weight" not in weights and untie_head:
        weights["lm_head.weight"] = emb
        head_init = TIED_HEAD  # the quantiser's int4 copy of it then serves the lookup too
    float_t = np.float16 if dtype == "fp16" else np.float32
    external = (
        weights.nbytes() * np.dtype(float_t).itemsize // 4 > EXTERNAL_ABOVE if external_data is None else external_data
    )
    output.mkdir(parents=True, exist_ok=True)
    data_file = open(output / "model.onnx_data", "wb") if external else None  # noqa: SIM115 - closed in the finally below
    try:
        g = _Graph(shape, dtype, data_file)
        rotary, attrs, gqa_extra = _inputs_and_positions(g, shape, weights, emb)
        if task == "embed":
            g.no_past = _no_past(g, shape)
        if kv_scales is not None:
            from onnx import TensorProto

            if len(kv_scales) != shape.layers:
                raise ExportError(f"kv_scales gives {len(kv_scales)} layers' scales for a model of {shape.layers}")
            if kv_bits not in (8, 4):
                raise ExportError(f"kv_bits must be 8 or 4, not {kv_bits}")
            g.kv_elem, g.kv_scales, g.kv_bits = (
                (TensorProto.INT8 if kv_bits == 8 else TensorProto.UINT8),
                kv_scales,
                kv_bits,
            )
        if lora is not None:
            g.lora = _lora_spec(shape, lora, task)
        residual, pending, pending_bias = "h0", None, None  # pending: the last block's output, not yet added
        for i in range(shape.layers):
            residual, pending, pending_bias = _block(
                g, shape, _layer(shape, weights, i), i, residual, pending, pending_bias, rotary, attrs, gqa_extra
            )
        assert pending is not None  # every model has a layer
        vocab = emb.shape[0]
        if task == "embed":
            _pooled(g, shape, weights, residual, pending, pending_bias, pooling)
            inputs, outputs = _embed_io(g, shape)
        else:
            _lm_head(g, shape, weights, emb, head_init, residual, pending, pending_bias)
            inputs, outputs = _graph_io(g, shape, vocab)
        if g.lora is not None:
            from onnx import TensorProto

            inputs += [helper.make_tensor_value_info("lora_ids", TensorProto.INT64, ["batch_size"]), *g.lora_inputs]
        model = helper.make_model(
            helper.make_graph(g.nodes, f"nextoken-{shape.arch}", inputs, outputs, g.inits),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
            producer_name="nextoken",
        )
        model.ir_version = 9
    finally:
        if data_file is not None:
            data_file.close()
    onnx.save(model, str(output / "model.onnx"))
    return {
        "architecture": shape.arch,
        "num_layers": shape.layers,
        "num_kv_heads": shape.kv_heads,
        "head_dim": shape.stored_head,
        "vocab_size": vocab,
        "context_length": shape.context,
        "kv_dtype": f"int{kv_bits}" if kv_scales is not None else "float16" if dtype == "fp16" else "float32",
        "inputs": tuple(i.name for i in inputs),
        "outputs": tuple(o.name for o in outputs),
        "features": shape.features,
        "rope_switch": shape.rope_switch or None,
        "hidden_size": shape.hidden,
        "lora": None if g.lora is None else {k: g.lora[k] for k in ("adapters", "rank", "targets")},
    }


def _lora_spec(shape: _Shape, lora: Mapping[str, Any], task: str) -> dict[str, Any]:
    """``lora`` checked against the model: slots (adapters at once, plus slot 0: none), rank, targets."""
    slots, rank = int(lora.get("adapters", 0)), int(lora.get("rank", 0))
    targets = list(dict.fromkeys(lora.get("targets") or ("q", "k", "v", "o")))
    if slots < 1 or rank < 1:
        raise ExportError(f"LoRA needs at least one adapter slot and a rank of 1 or more, not {slots} and {rank}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ExportError(f"LoRA targets {', '.join(unknown)}: not among {', '.join(LORA_TARGETS)}")
    if task != "generate":
        raise ExportError("LoRA adapters are for generating packages (--task generate)")
    if shape.arch in ("gpt2", "phi3"):
        raise ExportError(
            f"{shape.arch} fuses its projections (c_attn, qkv_proj): LoRA inputs are built for models with "
            "separate q, k, v, o, gate, up and down projections"
        )
    if shape.experts and any(t in targets for t in ("gate", "up", "down")):
        raise ExportError("a mixture of experts takes LoRA on attention only (q, k, v, o), not on its experts")
    return {
        "adapters": slots,
        "rank": rank,
        "targets": [t for t in LORA_TARGETS if t in targets],
        "made": set(),
        "deltas": {},
    }


def _inputs_and_positions(g: _Graph, shape: _Shape, weights: Tensors, emb: np.ndarray):
    """Lengths from the mask, positions where the graph needs them, the embeddings (``h0``), and
    GroupQueryAttention's attributes. Returns (rotary caches, attributes, GQA's extra inputs)."""
    from onnx import TensorProto

    node, init = g.node, g.init
    heads, kv_heads, head = shape.heads, shape.kv_heads, shape.stored_head
    init("embed", emb)
    init("one", np.array(1, dtype=np.int64))
    init("axis1", np.array([1], dtype=np.int64))
    init("big", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    init("zero1", np.array([0], dtype=np.int64))
    # lengths from the mask (padding on the right): seqlens_k = tokens per row - 1, total = the mask's width
    node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0)
    node("Sub", ["mask_sum", "one"], ["mask_sum_1"])
    node("Cast", ["mask_sum_1"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", "one"], ["total64"])
    node("Cast", ["total64"], ["total_len"], to=TensorProto.INT32)
    node("Gather", ["embed", "input_ids"], ["tok_emb"])
    gqa_extra: list[str] = []
    rotary: list[str] = []
    attrs: dict[str, Any] = dict(num_heads=heads, kv_num_heads=kv_heads)
    padded = shape.stored_head != shape.head
    if shape.theta is not None and shape.inv_freq is not None:
        # rotary over the model's own head dimensions (their first rotary_dim when partial), with
        # the rope scaling's frequencies and its factor on cos and sin
        angles = np.outer(np.arange(shape.context, dtype=np.float64), shape.inv_freq)
        if shape.long_inv_freq is not None:
            # longrope: the long factors' rows after the short ones; a row longer than the switch
            # reads them (its positions offset by the window, below)
            angles = np.concatenate([angles, np.outer(np.arange(shape.context, dtype=np.float64), shape.long_inv_freq)])
        rotary = [
            init("cos_cache", np.cos(angles) * shape.rope_factor),
            init("sin_cache", np.sin(angles) * shape.rope_factor),
        ]
        if shape.local_inv_freq is not None:  # the sliding layers' own base (gemma3)
            local = np.outer(np.arange(shape.context, dtype=np.float64), shape.local_inv_freq)
            init("cos_local", np.cos(local))
            init("sin_local", np.sin(local))
        if not padded:  # inside GroupQueryAttention
            gqa_extra = rotary
            attrs.update(do_rotary=1, rotary_interleaved=0)
    if shape.window:
        attrs["local_window_size"] = shape.window
    if shape.attn_softcap:
        attrs["softcap"] = shape.attn_softcap
    if padded:
        attrs["scale"] = float(shape.head**-0.5)
    if shape.attn_scale is not None:
        attrs["scale"] = float(shape.attn_scale)
    longrope_rows = shape.long_inv_freq is not None
    if shape.theta is None or padded or longrope_rows:
        # positions as GroupQueryAttention counts them: 0.. for a first prompt, else the row's
        # length so far minus the new tokens
        node("Shape", ["input_ids"], ["ids_shape"])
        node("Gather", ["ids_shape", "one"], ["new64"])
        node("Equal", ["new64", "total64"], ["first_prompt"])
        node("Range", [init("zero", np.array(0, dtype=np.int64)), "new64", "one"], ["steps"])
        node("Sub", ["mask_sum", "new64"], ["before"])
        node("Unsqueeze", ["before", "axis1"], ["before2d"])
        node("Add", ["before2d", "steps"], ["later_raw"])
        node("Max", ["later_raw", "zero"], ["later"])
        node("Where", ["first_prompt", "steps", "later"], ["positions"])
    if longrope_rows:
        # as transformers switches: a row longer than original_max_position_embeddings rotates its
        # new tokens with the long factors (the keys it cached before keep theirs)
        node("Greater", ["mask_sum", init("rope_switch", np.array(shape.rope_switch, dtype=np.int64))], ["long_row"])
        node("Cast", ["long_row"], ["long_row64"], to=TensorProto.INT64)
        node("Mul", ["long_row64", init("rope_rows", np.array(shape.context, dtype=np.int64))], ["rope_offset"])
        node("Unsqueeze", ["rope_offset", "axis1"], ["rope_offset2d"])
        node("Add", ["positions", "rope_offset2d"], ["rope_positions"])
        if gqa_extra:
            gqa_extra = [*gqa_extra, "rope_positions"]
    if shape.emb_scale != 1.0:  # gemma's sqrt(hidden), granite's multiplier
        node("Mul", ["tok_emb", init("emb_scale", np.array(shape.emb_scale))], ["h0"])
    elif shape.arch == "gpt2":
        node("Gather", [init("wpe", weights["wpe.weight"][: shape.context]), "positions"], ["pos_emb"])
        node("Add", ["tok_emb", "pos_emb"], ["h0"])
    else:
        node("Identity", ["tok_emb"], ["h0"])
    if shape.qk_norm:  # the q/k norms' shapes
        init(
            "split_qkv_n", np.array([heads * shape.head, kv_heads * shape.head, kv_heads * shape.head], dtype=np.int64)
        )
        init("per_head", np.array([0, 0, -1, shape.head], dtype=np.int64))
        init("per_row", np.array([0, 0, -1], dtype=np.int64))
    if padded:
        init("split_qkv", np.array([heads * shape.head, kv_heads * shape.head, kv_heads * shape.head], dtype=np.int64))
        init("by_head", np.array([0, 0, -1, shape.head], dtype=np.int64))
        init("head_pad", np.array([0, 0, 0, 0, 0, 0, 0, head - shape.head], dtype=np.int64))
        init("by_row", np.array([0, 0, -1], dtype=np.int64))
    return rotary, attrs, gqa_extra


def _block(
    g: _Graph,
    shape: _Shape,
    lw: dict,
    i: int,
    residual: str,
    pending: str | None,
    pending_bias: np.ndarray | None,
    rotary: list[str],
    attrs: dict,
    gqa_extra: list[str],
):
    """Decoder block ``i``: norm, attention (GroupQueryAttention, KV in place), norm, MLP. Its output
    is added to the residual by the next norm. Returns (residual, output, output's pending bias)."""
    node, init = g.node, g.init
    heads, kv_heads = shape.heads, shape.kv_heads
    rotates = shape.rope_layers is None or shape.rope_layers[i]
    if not rotates:  # a layer without rotary (SmolLM3's every fourth)
        attrs = {k: v for k, v in attrs.items() if k not in ("do_rotary", "rotary_interleaved")}
        gqa_extra = []
    if shape.layer_windows is not None:  # gemma2/3: sliding and full layers
        window = shape.layer_windows[i]
        attrs = {
            **{k: v for k, v in attrs.items() if k != "local_window_size"},
            **({"local_window_size": window} if window else {}),
        }
        if window and shape.local_inv_freq is not None and gqa_extra:
            gqa_extra = rotary = ["cos_local", "sin_local"]
    if shape.norms == "post":  # no norm before attention: the residual itself
        if pending is not None:
            node("Add", [residual, pending], [f"res{i}a"])
            residual = f"res{i}a"
        x = residual
    elif pending is None:
        g.first_norm(residual, lw["ln1"], lw.get("ln1_b"), f"x{i}", f"ln_in{i}")
        x = f"x{i}"
    else:
        g.skip_norm(pending, residual, lw["ln1"], lw.get("ln1_b"), pending_bias, f"x{i}", f"ln_in{i}", f"res{i}a")
        residual, x = f"res{i}a", f"x{i}"
    g.proj(i, "qkv", x, f"wqkv{i}", lw["qkv"], f"qkv{i}")
    qkv_out = f"qkv{i}"
    if "qkv_b" in lw:
        node("Add", [qkv_out, init(f"bqkv{i}", lw["qkv_b"])], [f"qkvb{i}"])
        qkv_out = f"qkvb{i}"
    if shape.stored_head != shape.head:
        # GroupQueryAttention runs head sizes that are multiples of 16 (and rotary widths that
        # are multiples of 16): rotate q and k at the model's head size, then pad every head
        if shape.theta is not None and rotates:
            node("Split", [qkv_out, "split_qkv"], [f"q{i}", f"k{i}", f"v{i}"], axis=-1)
            positions = "rope_positions" if shape.long_inv_freq is not None else "positions"
            node(
                "RotaryEmbedding",
                [f"q{i}", positions, *rotary],
                [f"qr{i}"],
                domain="com.microsoft",
                num_heads=heads,
                interleaved=0,
            )
            node(
                "RotaryEmbedding",
                [f"k{i}", positions, *rotary],
                [f"kr{i}"],
                domain="com.microsoft",
                num_heads=kv_heads,
                interleaved=0,
            )
            node("Concat", [f"qr{i}", f"kr{i}", f"v{i}"], [f"qkvr{i}"], axis=-1)
            qkv_out = f"qkvr{i}"
        node("Reshape", [qkv_out, "by_head"], [f"qkvh{i}"])
        node("Pad", [f"qkvh{i}", "head_pad"], [f"qkvp{i}"])
        node("Reshape", [f"qkvp{i}", "by_row"], [f"qkvs{i}"])
        qkv_out = f"qkvs{i}"
    if shape.qk_norm:
        # RMS norms of q and k before the rotation (GroupQueryAttention's own q/k norm inputs have no
        # CPU kernel in onnxruntime 1.31): per head, each head a row of a norm over head_dim; or whole
        node("Split", [qkv_out, "split_qkv_n"], [f"qn_in{i}", f"kn_in{i}", f"vn{i}"], axis=-1)
        for part in ("q", "k"):
            weight = init(f"{part}_norm{i}", lw[f"{part}_norm"])
            if shape.qk_norm == "head":
                node("Reshape", [f"{part}n_in{i}", "per_head"], [f"{part}h{i}"])
                node(
                    "SimplifiedLayerNormalization",
                    [f"{part}h{i}", weight],
                    [f"{part}hn{i}"],
                    axis=-1,
                    epsilon=shape.eps,
                )
                node("Reshape", [f"{part}hn{i}", "per_row"], [f"{part}n{i}"])
            else:
                node(
                    "SimplifiedLayerNormalization",
                    [f"{part}n_in{i}", weight],
                    [f"{part}n{i}"],
                    axis=-1,
                    epsilon=shape.eps,
                )
        node("Concat", [f"qn{i}", f"kn{i}", f"vn{i}"], [f"qkvn{i}"], axis=-1)
        qkv_out = f"qkvn{i}"
    if "sinks" in lw:  # inputs 7-10 (rotary, positions, bias) as far as given
        gqa_extra = [*gqa_extra, *[""] * (4 - len(gqa_extra)), init(f"sinks{i}", lw["sinks"])]
    if g.kv_scales is not None:  # inputs 12, 13: the int8 cache's scales, per KV head and channel
        k_scale, v_scale = (np.asarray(a, dtype=np.float32).reshape(kv_heads, 1, -1) for a in g.kv_scales[i])
        gqa_extra = [
            *gqa_extra,
            *[""] * (5 - len(gqa_extra)),
            init(f"k_scale{i}", k_scale, keep_dtype=True),
            init(f"v_scale{i}", v_scale, keep_dtype=True),
        ]
        attrs = {**attrs, "kv_cache_bit_width": g.kv_bits, "k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL"}
    node(
        "GroupQueryAttention",
        [
            qkv_out,
            "",
            "",
            g.past(i, "key"),
            g.past(i, "value"),
            "seqlens_k",
            "total_len",
            *gqa_extra,
        ],
        [f"attn{i}", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        **attrs,
    )
    g.proj(i, "o", f"attn{i}", f"wo{i}", lw["o"], f"o{i}")
    if shape.post_norms:  # attention's output normed before the residual takes it
        node(
            "SimplifiedLayerNormalization",
            [f"o{i}", init(f"ln_attn_out{i}", lw["attn_out_norm"])],
            [f"on{i}"],
            axis=-1,
            epsilon=shape.eps,
        )
    if shape.norms == "post":  # the MLP reads the sum itself
        node("Add", [residual, f"on{i}"], [f"m{i}"])
        residual = f"m{i}"
    elif shape.norms == "sandwich":  # the sum, normed before the MLP
        g.skip_norm(f"on{i}", residual, lw["ln2"], None, None, f"m{i}", f"ln_post{i}", f"res{i}b")
        residual = f"res{i}b"
    else:
        g.skip_norm(f"o{i}", residual, lw["ln2"], lw.get("ln2_b"), lw.get("o_b"), f"m{i}", f"ln_post{i}", f"res{i}b")
        residual = f"res{i}b"
    pending_bias = None
    if "fc" in lw:  # gpt2: fc -> gelu(tanh) with its bias fused -> proj
        node("MatMul", [f"m{i}", init(f"wfc{i}", lw["fc"])], [f"fc{i}"])
        node("FastGelu", [f"fc{i}", init(f"bfc{i}", lw["fc_b"])], [f"act{i}"], domain="com.microsoft")
        node("MatMul", [f"act{i}", init(f"wd{i}", lw["proj"])], [f"d{i}"])
        pending_bias = lw["proj_b"]
    elif "fc1" in lw:  # experts: the router's logits pick top-k per token
        node("MatMul", [f"m{i}", init(f"wr{i}", lw["router"])], [f"r{i}"], name=f"{ROUTER}{i}")
        if "router_b" in lw:
            node("Add", [f"r{i}", init(f"br{i}", lw["router_b"])], [f"rb{i}"])
        node(
            "Reshape",
            [
                f"rb{i}" if "router_b" in lw else f"r{i}",
                init("by_expert", np.array([-1, shape.experts], dtype=np.int64)),
            ],
            [f"r2d{i}"],
        )
        # softmax over all experts, the top k, renormalised over them or not; SiLU(gate) * up, or
        # gpt-oss's clamped form
        alpha, beta, limit = shape.swiglu
        biases = [
            init(f"experts_fc1_b{i}", lw["fc1_b"]) if "fc1_b" in lw else "",
            init(f"experts_fc2_b{i}", lw["fc2_b"]) if "fc2_b" in lw else "",
        ]
        node(
            "MoE",
            [
                f"m{i}",
                f"r2d{i}",
                init(f"experts_fc1_{i}", lw["fc1"]),
                biases[0],
                init(f"experts_fc2_{i}", lw["fc2"]),
                biases[1],
            ],
            [f"moe{i}"],
            domain="com.microsoft",
            k=shape.top_k,
            activation_type="swiglu",
            swiglu_fusion=1,
            activation_alpha=alpha,
            activation_beta=beta,
            normalize_routing_weights=int(shape.renormalize),
            **(dict[str, Any](swiglu_limit=limit) if limit is not None else {}),
        )
        # onnxruntime 1.31's CPU MoE may write its output over its input (it declares it may) and
        # then reads zeros: measured, a layer's experts silently added nothing. A node that reads the
        # input after the MoE keeps that buffer the input's alone (a select that passes the output on)
        node("Where", [init("never", np.array(False)), f"m{i}", f"moe{i}"], [f"d{i}"])
    else:
        g.proj(i, "gate", f"m{i}", f"wg{i}", lw["gate"], f"g{i}")
        g.proj(i, "up", f"m{i}", f"wu{i}", lw["up"], f"u{i}")
        if shape.act == "silu":
            node("Sigmoid", [f"g{i}"], [f"gs{i}"])
            node("Mul", [f"g{i}", f"gs{i}"], [f"ga{i}"])
        else:
            node("FastGelu" if shape.act == "gelu_tanh" else "Gelu", [f"g{i}"], [f"ga{i}"], domain="com.microsoft")
        node("Mul", [f"ga{i}", f"u{i}"], [f"act{i}"])
        g.proj(i, "down", f"act{i}", f"wd{i}", lw["down"], f"d{i}")
    if shape.post_norms:  # the next block (or the final norm) adds it
        node(
            "SimplifiedLayerNormalization",
            [f"d{i}", init(f"ln_mlp_out{i}", lw["mlp_out_norm"])],
            [f"dn{i}"],
            axis=-1,
            epsilon=shape.eps,
        )
        return residual, f"dn{i}", None
    return residual, f"d{i}", pending_bias


def _lm_head(
    g: _Graph,
    shape: _Shape,
    weights: Tensors,
    emb: np.ndarray,
    head_init: str,
    residual: str,
    pending: str,
    pending_bias: np.ndarray | None,
) -> None:
    """The final norm and the LM head over the last ``logits_to_keep`` positions (a tied head reads
    the embedding; an untied one is ``head_init``)."""
    node, init = g.node, g.init
    vocab, hidden = emb.shape[0], shape.hidden
    head_name = "lm_head.weight"
    tied = head_name not in weights
    head_out = "logits_raw" if shape.final_softcap else "logits"
    if shape.arch == "gpt2":
        final_w, final_b = weights["ln_f.weight"], weights["ln_f.bias"]
    else:
        final_w, final_b = weights["model.norm.weight"] + (1.0 if shape.arch in GEMMAS else 0.0), None
        final_w = final_w / shape.logit_divisor  # logits = norm(x) @ head / divisor
    g.skip_norm(pending, residual, final_w, final_b, pending_bias, "final", "ln_final")
    # only the last logits_to_keep positions reach the LM head
    node("Neg", ["logits_to_keep"], ["keep_neg"])
    node("Slice", ["final", "keep_neg", "big", "axis1"], ["kept"])
    if tied:
        node("Shape", ["kept"], ["kept_shape"])
        node("Slice", ["kept_shape", "zero1", init("two1", np.array([2], dtype=np.int64))], ["bs"])
        node("Reshape", ["kept", init("flat", np.array([-1, hidden], dtype=np.int64))], ["kept2d"])
        node("Gemm", ["kept2d", "embed"], ["logits2d"], transB=1)
        node("Concat", ["bs", init("vocab1", np.array([vocab], dtype=np.int64))], ["logits_shape"], axis=0)
        node("Reshape", ["logits2d", "logits_shape"], [head_out])
    else:
        node("MatMul", ["kept", init(head_init, weights[head_name].T)], [head_out])
    if shape.final_softcap:  # cap * tanh(logits / cap)
        node("Div", [head_out, init("final_cap", np.array(shape.final_softcap))], ["logits_capped"])
        node("Tanh", ["logits_capped"], ["logits_tanh"])
        node("Mul", ["logits_tanh", "final_cap"], ["logits"])


def _no_past(g: _Graph, shape: _Shape) -> str:
    """An empty cache ``[batch, kv_heads, 0, head]`` made in the graph: what each layer's attention of
    an embedding graph reads as its past (every input is a whole first prompt)."""
    from onnx import helper

    node, init = g.node, g.init
    node("Slice", ["mask_shape", "zero1", init("one1", np.array([1], dtype=np.int64))], ["batch1"])
    dims = init("kv_dims", np.array([shape.kv_heads, 0, shape.stored_head], dtype=np.int64))
    node("Concat", ["batch1", dims], ["no_past_shape"], axis=0)
    zero = helper.make_tensor("no_past_value", g.elem, [1], [0])
    node("ConstantOfShape", ["no_past_shape"], ["no_past"], value=zero)
    return "no_past"


def _pooled(
    g: _Graph,
    shape: _Shape,
    weights: Tensors,
    residual: str,
    pending: str,
    pending_bias: np.ndarray | None,
    pooling: str,
) -> None:
    """The final norm, then one vector a row (``embeddings [batch, hidden]``): the last real
    token's hidden state (``last``: padding is on the right, so at the row's length - 1), the mean
    over the real tokens (``mean``), or the first token's (``cls``)."""
    node, init = g.node, g.init
    if shape.arch == "gpt2":
        final_w, final_b = weights["ln_f.weight"], weights["ln_f.bias"]
    else:
        final_w, final_b = weights["model.norm.weight"] + (1.0 if shape.arch in GEMMAS else 0.0), None
    g.skip_norm(pending, residual, final_w, final_b, pending_bias, "final", "ln_final")
    if pooling == "last":
        node("Unsqueeze", ["mask_sum_1", init("axes12", np.array([1, 2], dtype=np.int64))], ["last_index3"])
        row = init("row_shape", np.array([1, 1, shape.hidden], dtype=np.int64))
        node("Expand", ["last_index3", row], ["last_index_rows"])
        node("GatherElements", ["final", "last_index_rows"], ["last_rows"], axis=1)
        node("Squeeze", ["last_rows", "axis1"], ["embeddings"])
    elif pooling == "mean":
        node("Cast", ["attention_mask"], ["mask_f"], to=g.elem)
        node("Unsqueeze", ["mask_f", init("axis_last", np.array([-1], dtype=np.int64))], ["mask_f3"])
        node("Mul", ["final", "mask_f3"], ["final_masked"])
        node("ReduceSum", ["final_masked", "axis1"], ["final_sum"], keepdims=0)
        node("ReduceSum", ["mask_f", "axis1"], ["mask_count"], keepdims=1)
        node("Div", ["final_sum", "mask_count"], ["embeddings"])
    else:  # cls
        node("Gather", ["final", "zero1"], ["first_rows"], axis=1)
        node("Squeeze", ["first_rows", "axis1"], ["embeddings"])


def _embed_io(g: _Graph, shape: _Shape) -> tuple[list, list]:
    """An embedding graph's inputs and output: ids and mask in, ``embeddings [batch, hidden]`` out."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    return inputs, [helper.make_tensor_value_info("embeddings", g.elem, ["batch_size", shape.hidden])]


def _graph_io(g: _Graph, shape: _Shape, vocab: int) -> tuple[list, list]:
    """The graph's inputs and outputs: ids, mask, logits_to_keep, the cache in; logits, the cache out."""
    from onnx import TensorProto, helper

    kv_heads, head, elem, kv_elem = shape.kv_heads, shape.stored_head, g.elem, g.kv_elem
    if g.kv_scales is not None and g.kv_bits == 4:
        head //= 2  # two 4-bit values a byte
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch_size", "kept_length", vocab])]
    for i in range(shape.layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", kv_elem, ["batch_size", kv_heads, "past_sequence_length", head]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", kv_elem, ["batch_size", kv_heads, "total_sequence_length", head]
                )
            )
    return inputs, outputs


def embedding_spec(
    folder: Path, pooling: str | None = None, normalize: bool | None = None, truncatable: bool = False
) -> dict[str, Any]:
    """How an embedding model makes its vectors: ``pooling`` and ``normalize`` as given, else as the
    checkpoint's sentence-transformers files say (``modules.json``: its Pooling module's config and
    whether a Normalize module follows; ``config_sentence_transformers.json``: its named prompts),
    else last-token pooling, normalised (decoder embedding models' recipe). ``truncatable``: the
    model was trained so that a prefix of its vector is an embedding too (Matryoshka)."""
    st_pooling, st_normalize = None, None
    modules_path = folder / "modules.json"
    if modules_path.is_file():
        try:
            modules = json.loads(modules_path.read_text())
            st_normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
            pool = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
            if pool is not None:
                config = json.loads((folder / pool["path"] / "config.json").read_text())
                modes = {
                    "pooling_mode_lasttoken": "last",
                    "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_cls_token": "cls",
                }
                chosen = [name for key, name in modes.items() if config.get(key)]
                others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in modes]
                if others or len(chosen) > 1:
                    raise BuilderUnavailable(
                        f"its sentence-transformers pooling ({', '.join(others + chosen)}) is not one of "
                        f"{', '.join(POOLINGS)}; give --pooling to build it another way"
                    )
                st_pooling = chosen[0] if chosen else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ExportError(
                f"{modules_path} or its Pooling config is unreadable ({type(exc).__name__}: {exc})"
            ) from None
    spec: dict[str, Any] = {
        "pooling": pooling or st_pooling or "last",
        "normalize": normalize if normalize is not None else (st_normalize if st_normalize is not None else True),
        "truncatable": bool(truncatable),
    }
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        try:
            config = json.loads(st_config.read_text())
        except (OSError, ValueError) as exc:
            raise ExportError(f"{st_config} is unreadable ({exc})") from None
        prompts = config.get("prompts") or {}
        if isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values()):
            spec["prompts"] = {str(k): v for k, v in prompts.items()}
        if isinstance(config.get("default_prompt_name"), str) and config["default_prompt_name"] in spec.get(
            "prompts", {}
        ):
            spec["default_prompt"] = config["default_prompt_name"]
    return spec


def local_folder(source: str, offline: bool) -> Path:
    """The checkpoint's folder: ``source`` itself, or the hub snapshot of the id ``source``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"], local_files_only=offline
            )
        )
    except Exception as exc:
        raise BuilderUnavailable(
            f"cannot read {source!r} as a local checkpoint or a hub snapshot ({type(exc).__name__})"
        ) from None


def build_package(
    source: str,
    package: Path,
    *,
    output: Path | None = None,
    check: bool = True,
    atol: float | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    offline: bool = False,
    untie_head: bool = False,
    task: str = "generate",
    pooling: str | None = None,
    normalize: bool | None = None,
    truncatable: bool = False,
    lora: Mapping[str, Any] | None = None,
    say=lambda _m: None,
):
    """A whole package at ``package`` (the stage of ``output``) from ``source``: the builder's graph,
    the tokenizer and config files, the manifest, and (``check``) the parity check against PyTorch
    in fp32, with the package running on ``device``, recorded (``atol`` None: 1e-3 for fp32; for
    fp16, ``FP16_RTOL`` of the largest |logit|). ``task="embed"``: an embedding package
    (:func:`embedding_spec` says how it pools, from ``pooling``, ``normalize``, ``truncatable`` and
    the checkpoint's sentence-transformers files), checked against transformers' pooled hidden
    states."""
    import shutil
    from types import SimpleNamespace

    from nextoken.manifest import Manifest

    from .package import PACKAGE_FILES, ExportReport, Stages, checked_parity, eos_ids, export_versions

    folder = local_folder(source, offline)
    stages = Stages(3 if check else 2, say)
    spec = embedding_spec(folder, pooling, normalize, truncatable) if task == "embed" else None
    what = f"an embedding model, {spec['pooling']} pooling" if spec else "fused operators"
    with stages(f"building {folder.name} with nextoken's builder ({what}, {dtype})"):
        shape = build(
            folder,
            package,
            dtype=dtype,
            untie_head=untie_head,
            task=task,
            pooling=spec["pooling"] if spec else "last",
            lora=lora,
        )
    if spec is not None:
        spec["dimensions"] = shape["hidden_size"]
    with stages("writing the model package"):
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
            **{
                k: shape[k]
                for k in (
                    "architecture",
                    "num_layers",
                    "num_kv_heads",
                    "head_dim",
                    "vocab_size",
                    "context_length",
                    "kv_dtype",
                    "inputs",
                    "outputs",
                )
            },
            eos_token_ids=eos_ids(SimpleNamespace(**config), generation),
            bos_token_id=first("bos_token_id"),
            pad_token_id=first("pad_token_id"),
            precision=dtype,
            tokenizer_file="tokenizer.json" if (package / "tokenizer.json").is_file() else None,
            source=str(source),
            padding_side="right",
            rope_switch=shape["rope_switch"],
            task=task,
            embedding=spec,
            lora=shape["lora"],
            exported_by={
                **export_versions(),
                "builder": "nextoken",
                **({"features": ", ".join(shape["features"])} if shape["features"] else {}),
            },
        ).with_files(package)
        manifest.save(package)
    manifest, diff, tolerance, n = checked_parity(
        str(folder),
        package,
        manifest,
        stages,
        check=check,
        atol=atol,
        dtype=dtype,
        device=device,
        offline=offline,
        output=output or package,
    )
    return ExportReport(package, manifest, diff, tolerance, n, stages.seconds)
