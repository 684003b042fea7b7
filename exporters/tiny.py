"""Tiny untrained checkpoints built from configs, for the offline demo and the tests.

Their weights are random: the text they produce is noise. They exist so the whole path (export,
package, engine, generation) runs on a machine that can reach no model hub. The initialisation is
wider than transformers' default so that the top logits are far apart and greedy choices do not
hinge on rounding (random tiny models otherwise have near-ties between the top two logits).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEMO_CONFIG", "TINY_CONFIGS", "make_byte_tokenizer", "make_random_checkpoint", "make_tiny_checkpoint"]

PAD, BOS, EOS = 0, 1, 2
VOCAB = 259  # <pad>, <s>, </s> and the 256 bytes

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)

#: One small config per supported architecture (transformers' field names).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128),
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),
    # multipliers away from 1, so that each is checked
    "granite": dict(
        _COMMON, embedding_multiplier=4.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.0
    ),
    "smollm3": dict(_COMMON, no_rope_layers=[1, 0]),
    "olmo2": dict(_COMMON),
    "phi3": dict(_COMMON),
    "gemma": dict(_COMMON, head_dim=16),
    # the second layer dense, and the top-k weights not renormalised (Qwen3's option): both paths
    "qwen3_moe": dict(
        _COMMON,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    # a window shorter than the tests' prompts; yarn acting within them; experts as wide as the dense
    # MLPs (narrower ones left greedy choices within 0.003 of a tie on the tests' prompts)
    "gpt_oss": dict(
        _COMMON,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
    ),
    # windows shorter than the tests' prompts; soft-caps low enough to bend the numbers; an untied
    # head: with a tied one the embedding (scaled by sqrt(hidden)) outweighs the blocks, whose every
    # output is normed, and greedy decoding repeats the last token, which tests nothing
    "gemma2": dict(
        _COMMON,
        head_dim=16,
        query_pre_attn_scalar=32,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        _COMMON,
        head_dim=16,
        query_pre_attn_scalar=32,
        sliding_window=8,
        rope_theta=1e6,
        rope_local_base_freq=10000.0,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    ),
}

#: The offline demo's model: an untrained Llama a little larger than the test ones.
DEMO_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=512,
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def make_byte_tokenizer(directory: str | Path, context_length: int = 128, special_tokens: Sequence[str] = ()) -> Path:
    """Write a byte-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) into ``directory``.

    Ids: 0 ``<pad>``, 1 ``<s>`` (added before every text), 2 ``</s>``, then byte b is id 3 + b,
    then ``special_tokens`` (ids 259 on; e.g. a chat format's markup). Any text encodes, any id
    sequence decodes: a real tokenizer that needs no training data.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = 3 + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", *special_tokens])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": context_length,
                "add_bos_token": True,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    return directory


def make_tiny_checkpoint(
    directory: str | Path,
    architecture: str = "llama",
    *,
    seed: int = 0,
    init_std: float = 0.25,
    special_tokens: Sequence[str] = (),
    **overrides: Any,
) -> Path:
    """Save a tiny random-weight transformers checkpoint (+ byte tokenizer) of ``architecture``.

    ``overrides`` change config fields (e.g. ``num_hidden_layers=4``); ``special_tokens`` are
    added to the tokenizer and the vocabulary after the bytes. Needs torch and transformers.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if architecture not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {architecture!r}; known: {', '.join(TINY_CONFIGS)}")
    fields = {**TINY_CONFIGS[architecture], **overrides}
    if special_tokens:
        fields["vocab_size"] = VOCAB + len(special_tokens)
    fields.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=init_std)
    config = AutoConfig.for_model(architecture, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD).save_pretrained(directory)
    ctx = fields.get("max_position_embeddings", fields.get("n_positions", 128))
    make_byte_tokenizer(directory, ctx, special_tokens)
    return directory


def make_random_checkpoint(
    directory: str | Path, config: str | Path | dict[str, Any], *, seed: int = 0, context_length: int | None = None
) -> Path:
    """Save a checkpoint of a real model's ``config`` (a config.json path or its dict) with random
    weights (transformers' own initialisation) and the byte tokenizer: the size and speed of that
    model without downloading it, for benchmarks and memory plans (speed does not depend on the
    values; the text is noise). ``context_length`` caps ``max_position_embeddings``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    fields = dict(config) if isinstance(config, dict) else json.loads(Path(config).read_text())
    fields.pop("torch_dtype", None)
    fields.pop("dtype", None)
    if context_length is not None:
        fields["max_position_embeddings"] = min(
            int(fields.get("max_position_embeddings", context_length)), context_length
        )
    model_type = fields.pop("model_type")
    fields.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD).save_pretrained(directory)
    make_byte_tokenizer(directory, int(fields.get("max_position_embeddings", 2048)))
    return directory
