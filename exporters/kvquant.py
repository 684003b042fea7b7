"""An int8 or int4 KV cache: per-channel scales calibrated at export, and what the cache costs in
accuracy.

GroupQueryAttention keeps the cache in int8 (or int4, two values a byte) when given each layer's
scales (``kv_cache_bit_width`` 8 or 4, ``PER_CHANNEL``: one scale per KV head and channel, for keys
as stored, after the rotary, and for values). The scales come from a calibration pass of the
fp32-cache graph over sample sequences: each channel's largest |value| times :data:`HEADROOM`
(by bits), over the largest level (127 for int8, 7 for int4). The accuracy is
measured as the cache is used, through it: greedy tokens against the fp32 cache's, and each decode
step's logits (teacher-forced) against the fp32 cache's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CALIBRATION_TEXTS", "HEADROOM", "LEVELS", "calibrate_kv", "kv_accuracy", "quantised_cache"]

#: Each channel's scale covers this much of the largest |value| calibration saw, by bits: int8
#: leaves room above it; int4's 16 levels are better spent clipping the rarest values (top-1
#: agreement over 256 steps, 1.25 against 0.8: stories260k 67.6% against 81.6%, the 135M config
#: with random weights 95.7% against 99.2%).
HEADROOM = {8: 1.25, 4: 0.8}
#: The largest level of a quantised cache, by its bits.
LEVELS = {8: 127.0, 4: 7.0}
#: The calibration's sample texts (with one sequence of random ids, for a model without a tokenizer too).
CALIBRATION_TEXTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
    "with her big red ball. One day, she saw a small dog sitting under a tree.",
    "The quarterly report shows revenue of $4.2 million, up 12% from last year, while operating "
    "costs fell to 1.9 million. Table 3: region, units, price; north, 1200, 9.99.",
    'def area(r):\n    """The area of a circle."""\n    return 3.14159 * r ** 2\n\nprint(area(2.5))',
    "Question: why is the sky blue? Answer: sunlight is scattered by the molecules of the air, and "
    "blue light, of shorter wavelength, is scattered more than red.",
)


def _sequences(engine: Any, tokens: int) -> list[list[int]]:
    window = min(tokens, engine.manifest.context_length)
    out = []
    if engine.tokenizer is not None:
        out += [engine.encode(t)[:window] for t in CALIBRATION_TEXTS]
    rng = np.random.default_rng(0)
    out.append([int(i) for i in rng.integers(0, engine.manifest.vocab_size, size=window)])
    return [s for s in out if s]


def calibrate_kv(
    package: str | Path, tokens: int = 512, bits: int = 8
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Each layer's (key scale, value scale), ``[kv_heads, head_dim]`` float32, for a cache of
    ``bits``, from the largest |value| each channel takes over the calibration sequences
    (:data:`CALIBRATION_TEXTS` and random ids, at most ``tokens`` each) in the fp32-cache package
    ``package``; and what the calibration was (for the manifest)."""
    from nextoken.adapters import no_adapter_feeds
    from nextoken.engine import Engine

    with Engine(package, device="cpu", plugins=False, verify=False) as engine:
        m = engine.manifest
        sequences = _sequences(engine, tokens)
        names = m.present_names()
        past_dtype = np.float16 if m.kv_dtype == "float16" else np.float32
        peaks = [np.zeros((m.num_kv_heads, m.head_dim), dtype=np.float32) for _ in names]
        for ids in sequences:
            feeds: dict[str, np.ndarray] = {
                "input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            }
            if "logits_to_keep" in m.inputs:
                feeds["logits_to_keep"] = np.asarray([1], dtype=np.int64)
            for name in m.past_names():
                feeds[name] = np.zeros((1, m.num_kv_heads, 0, m.head_dim), dtype=past_dtype)
            feeds.update(no_adapter_feeds(engine.session.get_inputs(), 1))
            for peak, value in zip(peaks, engine.session.run(names, feeds)):
                np.maximum(peak, np.abs(value.astype(np.float32)).max(axis=(0, 2)), out=peak)
    scales = [np.maximum(p * HEADROOM[bits] / LEVELS[bits], 1e-6).astype(np.float32) for p in peaks]
    note = {
        "sequences": len(sequences),
        "tokens": sum(len(s) for s in sequences),
        "headroom": HEADROOM[bits],
        "texts": "nextoken.exporters.kvquant.CALIBRATION_TEXTS and one sequence of random ids",
    }
    return [(scales[2 * i], scales[2 * i + 1]) for i in range(len(scales) // 2)], note


def kv_accuracy(fp32_package: str | Path, package: str | Path, prompt: str, tokens: int = 256):
    """How the quantised cache of ``package`` compares with the fp32 cache of ``fp32_package`` (the same
    weights): greedy tokens through each cache, and each decode step's logits when both read the
    fp32 cache's tokens (an :class:`~nextoken.exporters.quantize.Accuracy`)."""
    from nextoken.engine import Engine

    from .quantize import Accuracy, first_difference, greedy_sample

    with (
        Engine(fp32_package, device="cpu", plugins=False, verify=False) as ref,
        Engine(package, device="cpu", plugins=False, verify=False) as q,
    ):
        tokens = min(tokens, ref.manifest.context_length // 2)
        ids, expected = greedy_sample(ref, prompt, tokens)
        got = q.generate(ids, max_new_tokens=tokens, ignore_eos=True).token_ids
        same = first_difference(expected, got)
        steps = []
        for engine in (ref, q):
            run = engine.cached_forward()
            logits = [run.feed(ids)[-1]]
            logits += [run.feed([t])[-1] for t in expected[:-1]]
            steps.append(np.stack(logits))
        a, b = steps
        forced = float(np.mean(a.argmax(-1) == b.argmax(-1)))
        diff = np.abs(a - b)
    return Accuracy(len(expected), same, forced, float(diff.mean()), float(diff.max()))


def quantised_cache(
    folder: Path, package: Path, dtype: str = "fp32", untie_head: bool = False, say=lambda _m: None, bits: int = 8
):
    """Rebuild the checked fp32-cache builder package at ``package`` (from the checkpoint folder
    ``folder``) with an int8 (``bits`` 8) or int4 cache: calibrate on a copy, rebuild the graph
    with the scales, measure it against the copy. Returns the package's new manifest (``kv_dtype``
    int8 or int4, ``kv_quantization`` with the calibration and the accuracy)."""
    import dataclasses
    import shutil
    import tempfile

    from nextoken.manifest import Manifest

    from .builder import build
    from .package import PARITY_PROMPT

    manifest = Manifest.load(package)
    with tempfile.TemporaryDirectory(prefix="nextoken-kv-") as tmp:
        ref = Path(tmp) / "fp32-cache"
        shutil.copytree(package, ref)
        say(f"calibrating the int{bits} KV cache's scales ...")
        scales, calibration = calibrate_kv(ref, bits=bits)
        for p in package.glob("model.onnx*"):
            p.unlink()
        build(folder, package, dtype=dtype, untie_head=untie_head, kv_scales=scales, kv_bits=bits, lora=manifest.lora)
        kv = {"bits": bits, "granularity": "per layer, KV head and channel", "calibration": calibration}
        manifest = dataclasses.replace(manifest, kv_dtype=f"int{bits}", kv_quantization=kv).with_files(package)
        manifest.save(package)
        accuracy = kv_accuracy(ref, package, PARITY_PROMPT)
    say(f"int{bits} KV cache against the fp32 cache: {accuracy.line()}")
    manifest = dataclasses.replace(manifest, kv_quantization={**kv, "accuracy": accuracy.to_dict()})
    manifest.save(package)
    return manifest
