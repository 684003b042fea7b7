"""Families as transformers configures them, not as the tests do: each model type's own default
config (its rope settings, layer types, soft-caps, biases, norms as transformers sets them), shrunk
to a tiny size only, random weights; then nextoken's default export and 16 greedy tokens against
transformers.

    python scripts/family_sweep.py [--families llama,qwen2_moe,...] [--json FILE]

One row a family: the route the export took (fused: nextoken's builder; optimum: the fallback, with
the builder's reason), the parity the export measured, whether the greedy tokens are transformers'
(and the smallest top-2 gap of transformers' own choices, so a mismatch at a near-tie reads as
one), or the error. Families the tests tune for and families they do not, side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nextoken.exporters.builder import ARCHITECTURES

#: the builder's families and, past them, families it does not cover
FAMILIES = ARCHITECTURES + (
    "qwen2_moe",
    "phimoe",
    "starcoder2",
    "cohere",
    "olmo",
    "stablelm",
    "gpt_neox",
    "falcon",
    "glm",
    "exaone4",
    "ernie4_5",
    "helium",
)

#: the size a family is shrunk to (only fields its config has are set)
SHRINK = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=259,
    max_position_embeddings=128,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=128,
    sliding_window=8,
)


def tiny(model_type: str, folder: Path) -> Path:
    """A checkpoint of ``model_type``'s default config, shrunk, with wide random weights and the
    byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from nextoken.exporters.tiny import BOS, EOS, PAD, make_byte_tokenizer

    default = AutoConfig.for_model(model_type)
    settable = lambda k: hasattr(default, k) and not isinstance(getattr(type(default), k, None), property)  # noqa: E731
    fields = {k: v for k, v in SHRINK.items() if settable(k)}
    if getattr(default, "layer_types", None):
        kinds = list(default.layer_types)
        fields["layer_types"] = (kinds * 2)[:2] if len(set(kinds)) == 1 else ["sliding_attention", "full_attention"]
    config = AutoConfig.for_model(
        model_type, **fields, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.25
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD).save_pretrained(folder)
    make_byte_tokenizer(folder, 128)
    return folder


def sweep(family: str, root: Path) -> dict:
    import numpy as np
    import torch

    from nextoken import Engine
    from nextoken.exporters import export
    from nextoken.exporters.builder import covers
    from nextoken.exporters.package import reference_model

    row: dict = {"family": family}
    start = time.perf_counter()
    try:
        ckpt = tiny(family, root / family / "ckpt")
        try:
            covers(json.loads((ckpt / "config.json").read_text()))
            row["route"] = "fused"
        except Exception as exc:  # the builder's reason, as the export's note gives it
            row["route"] = "optimum" + ("" if family not in ARCHITECTURES else f" ({exc})")
        report = export(ckpt, root / family / "pkg", progress=None)
        row["parity"] = report.max_abs_diff
        model = reference_model(str(ckpt))
        with Engine(report.output, device="cpu", plugins=False) as engine:
            ids = engine.encode("The quick brown fox jumps")
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=16,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            expected = out.sequences[0, len(ids) :].tolist()
            got = engine.generate(ids, max_new_tokens=16, ignore_eos=True).token_ids
        row["greedy"] = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), len(expected))
        row["min_gap"] = min(float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| family | route | parity max abs diff | greedy (of 16) identical | smallest top-2 gap |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('route', '-')} | {r['error'][:90]} | | |")
        else:
            lines.append(f"| {r['family']} | {r['route']} | {r['parity']:.1e} | {r['greedy']} | {r['min_gap']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nextoken-sweep-") as tmp:
        rows = []
        for family in args.families.split(","):
            rows.append(sweep(family, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
