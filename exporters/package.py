"""What every export route shares: the files a package carries, the report, the numbered stages,
the parity check against PyTorch and its record, and staging (a package is built beside its target
and moved into place only after its checks pass). The routes (:mod:`.builder`, :mod:`.hf`'s
optimum route, :mod:`.genai`) import this; it imports none of them."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextoken.errors import ExportError
from nextoken.manifest import Manifest

__all__ = [
    "DEFAULT_ATOL",
    "FP16_RTOL",
    "PACKAGE_FILES",
    "PARITY_PROMPT",
    "ExportReport",
    "Progress",
    "Stages",
    "checked_parity",
    "eos_ids",
    "export_versions",
    "parity_check",
    "parity_ids",
    "record_parity",
    "say",
    "staged",
]

Progress = Callable[[str], None]

#: Largest |ONNX logits - PyTorch logits| an fp32 export may show. fp32 graphs of the supported
#: architectures land near 1e-6 on small models; real models of ~100M parameters near 1e-5..1e-4.
DEFAULT_ATOL = 1e-3

#: An fp16 graph is checked against PyTorch in fp32: its logits may differ by this fraction of the
#: largest |logit| (at least of 1.0). fp16 keeps ~3 decimal digits; over a few layers the error of a
#: logit grows to a few parts in a thousand of the logits' range.
FP16_RTOL = 1e-2

PARITY_PROMPT = "Once upon a time, in a small town by the sea, there lived"

PACKAGE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
)


@dataclass
class ExportReport:
    """What an export made: the package directory, its manifest, and the parity check's result."""

    output: Path
    manifest: Manifest
    max_abs_diff: float
    atol: float
    parity_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    accuracy: Any = None  # quantize.Accuracy when the weights were quantised

    def summary(self) -> str:
        m = self.manifest
        what, over = ("embeddings", "rows") if m.embeds else ("logits", "positions")
        parity = (
            f"parity over {self.parity_tokens} {over}: max |Δ {what}| = {self.max_abs_diff:.2e} "
            f"(tolerance {self.atol:.1e})"
            if self.parity_tokens
            else "parity not checked (--no-check)"
        )
        features = f"{m.exported_by['features']}; " if m.exported_by.get("features") else ""
        if m.embeds and m.embedding:
            e = m.embedding
            features += f"embeddings of {e['dimensions']}, {e['pooling']} pooling{', normalised' if e.get('normalize') else ''}; "
        return (
            f"exported {m.architecture} ({m.num_layers} layers, {m.num_kv_heads} KV heads x {m.head_dim}, "
            f"context {m.context_length}; {features}{m.route}) to {self.output}; {parity}"
        )


def reference_model(source: str, offline: bool = False):
    """The checkpoint in transformers, fp32, as its authors run it: with the eager attention where
    the model soft-caps attention's logits (gemma2), which transformers' default (SDPA) leaves out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, local_files_only=offline)
    eager = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=offline, **eager).eval()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Stages:
    """An export's numbered stages, each said when it starts and ends, with its seconds."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total, self.n, self.progress = total, 0, progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.n += 1
        self.progress(f"[{self.n}/{self.total}] {name} ...")
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.seconds[name] = round(took, 3)
        self.progress(f"[{self.n}/{self.total}] {name}: done in {took:.1f} s")


def export_versions() -> dict[str, str]:
    out = {}
    for dist in (
        "nextoken",
        "optimum-onnx",
        "optimum",
        "transformers",
        "torch",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def eos_ids(config, generation_config: dict) -> tuple[int, ...]:
    eos = generation_config.get("eos_token_id", getattr(config, "eos_token_id", None))
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


PARITY_RANDOM_IDS = 16


def parity_ids(engine, tokens: int = PARITY_RANDOM_IDS) -> list[int]:
    """The parity check's input: the sample prompt's ids, then ``tokens`` seeded ids from the whole vocabulary."""
    import numpy as np

    ids = engine.encode(PARITY_PROMPT) if engine.tokenizer is not None else []
    vocab = engine.manifest.vocab_size
    ids = ids + [int(i) for i in np.random.default_rng(0).integers(0, vocab, size=tokens)]
    return ids[: engine.manifest.context_length]


def _vacuous(expected) -> str | None:
    """Why reference logits ``[S, V]`` would make a parity check that proves nothing, or None."""
    import numpy as np

    if not np.isfinite(expected).all():
        return "PyTorch's own logits are not finite"
    spread = expected.max(axis=-1) - expected.min(axis=-1)
    if spread.max() < 1e-4:
        return (
            f"PyTorch's logits are (nearly) constant over the vocabulary at every position (spread "
            f"{spread.max():.1e}): the checkpoint's weights look empty, so agreeing with them proves nothing"
        )
    if np.abs(np.diff(expected, axis=0)).max() < 1e-6:
        return (
            "PyTorch's logits are identical at every position of the check's varied input: the model ignores "
            "its input (zero embeddings?), so agreeing with it proves nothing"
        )
    return None


def parity_check(
    source: str, package: Path, offline: bool = False, device: str = "cpu", half_above: float | None = None
) -> tuple[float, int, float, float | None]:
    """(max |Δ logits|, positions, max |logit|, PyTorch fp16's own max |Δ logits| or None) between
    PyTorch in fp32 and the package running on ``device``, over varied ids (:func:`parity_ids`) in
    one pass and one cached step. ``half_above``: when the difference is over this fraction of the
    largest |logit| (at least of 1.0), also run PyTorch in fp16 on the same ids, the yardstick of
    an fp16 graph. Reference logits that cannot tell a right graph from a wrong one are an
    :class:`ExportError`."""
    import numpy as np
    import torch

    from nextoken.engine import Engine

    engine = Engine(package, device=device, plugins=False, verify=False)
    try:
        ids = parity_ids(engine)
        model = reference_model(source, offline)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        problem = _vacuous(expected)
        if problem:
            raise ExportError(f"the parity check cannot judge this export: {problem}")
        full = engine.forward(ids)
        step = engine.forward(ids, cached=True)  # through the KV cache, as generation runs it
    finally:
        engine.close()
    diff = max(float(np.abs(full - expected).max()), float(np.abs(step[0] - expected[-1]).max()))
    if not np.isfinite(diff):
        diff = float("inf")
    half_diff, scale = None, float(np.abs(expected).max())
    if half_above is not None and diff > half_above * max(1.0, scale):
        with torch.no_grad():
            own = model.to(torch.float16)(torch.tensor([ids])).logits[0].float().numpy()
        half_diff = float(np.abs(own - expected).max())
    return diff, len(ids), scale, half_diff


def embedding_parity_check(
    source: str, package: Path, offline: bool = False, device: str = "cpu", half_above: float | None = None
) -> tuple[float, int, float, float | None]:
    """(max |Δ|, rows, max |value|, PyTorch fp16's own max |Δ| or None) between transformers' base
    model's pooled last hidden states (fp32, padding on the right, pooled as the manifest says,
    before any normalisation) and the package's, over three rows of different lengths and first tokens in
    one batch (so the padding is tested too)."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from nextoken.engine import Engine

    engine = Engine(package, device=device, plugins=False, verify=False)
    try:
        ids = parity_ids(engine)
        # three lengths from three starts: rows that shared their first token would pool to the same
        # vector under "cls" on a causal model, and only rounding noise would tell them apart
        half = max(2, len(ids) // 2)
        rows = [ids, ids[len(ids) - half :], ids[1:4]]
        spec = engine.manifest.embedding or {}
        got = engine.need_embedder().pooled(rows)  # as the graph gives them, before normalising
    finally:
        engine.close()
    model = AutoModel.from_pretrained(source, dtype=torch.float32, local_files_only=offline).eval()

    def pooled(m) -> np.ndarray:
        out = []
        for row in rows:  # one row at a time: no padding in the reference
            with torch.no_grad():
                hidden = m(torch.tensor([row])).last_hidden_state[0].float().numpy()
            out.append({"last": hidden[-1], "mean": hidden.mean(axis=0), "cls": hidden[0]}[spec["pooling"]])
        return np.stack(out)

    expected = pooled(model)
    if not np.isfinite(expected).all() or np.abs(np.diff(expected, axis=0)).max() < 1e-6:
        raise ExportError(
            "the parity check cannot judge this export: PyTorch's embeddings are not finite or ignore the input"
        )
    diff = float(np.abs(got - expected).max())
    if not np.isfinite(diff):
        diff = float("inf")
    half_diff, scale = None, float(np.abs(expected).max())
    if half_above is not None and diff > half_above * max(1.0, scale):
        half_diff = float(np.abs(pooled(model.to(torch.float16)) - expected).max())
    return diff, len(rows), scale, half_diff


def checked_parity(
    source: str,
    package: Path,
    manifest: Manifest,
    stages: "Stages",
    *,
    check: bool,
    atol: float | None,
    dtype: str,
    device: str,
    offline: bool,
    output: Path,
) -> tuple[Manifest, float, float, int]:
    """The parity check of a staged ``package`` as one of ``stages`` (when ``check``): over the
    tolerance (``atol``; None: :data:`DEFAULT_ATOL` for fp32; for fp16, :data:`FP16_RTOL` of the
    largest |logit|, or twice what PyTorch's own fp16 run of the same weights is off by, when that
    is more: a mixture of experts' router can tip to another expert in fp16 on a near-tie, in
    PyTorch as in the graph) an :class:`ExportError` (nothing is moved into ``output``), else
    recorded in the manifest. Returns (manifest, max |Δ logits|, tolerance, positions)."""
    tolerance = DEFAULT_ATOL if atol is None else atol
    if not check:
        return manifest, float("nan"), tolerance, 0
    yardstick = atol is None and dtype == "fp16"
    what, check_fn = ("embeddings", embedding_parity_check) if manifest.embeds else ("logits", parity_check)
    with stages(f"checking ONNX {what} against PyTorch (on {device})"):
        diff, n, scale, half_diff = check_fn(
            source, package, offline, device, half_above=FP16_RTOL if yardstick else None
        )
    if yardstick:
        tolerance = max(FP16_RTOL * max(1.0, scale), 2 * (half_diff or 0.0))
    if not diff <= tolerance:
        where = f"{output} keeps the package it had" if output.exists() else f"nothing was written to {output}"
        raise ExportError(
            f"parity check failed: max |Δ {what}| between ONNX ({dtype}) and PyTorch (fp32) is "
            f"{diff:.3e}, over the tolerance {tolerance:.1e}; the export is not trustworthy, and {where}"
        )
    return record_parity(package, manifest, diff, tolerance, n, device), diff, tolerance, n


def record_parity(
    package: Path, manifest: Manifest, diff: float, tolerance: float, positions: int, device: str
) -> Manifest:
    """Write the parity result into the package's manifest (before the package is moved into place)."""
    import dataclasses

    manifest = dataclasses.replace(
        manifest,
        parity={
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "positions": positions,
            "device": device,
            "reference": "transformers fp32",
        },
    )
    manifest.save(package)
    return manifest


# -- atomic export: build beside the target, move into place only after the checks pass -----------

_STAGE = ".nextoken-staging-"


def _stage_prefix(output: Path) -> str:
    return f".{output.name}{_STAGE}"


def _clean_stale_stages(output: Path) -> None:
    """Remove what an export of ``output`` that was killed left beside it (its process is gone)."""
    prefix = _stage_prefix(output)
    for stale in output.parent.glob(prefix + "*"):
        try:
            pid = int(stale.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A directory beside ``output`` to build a package in; when the block ends without an error, the
    package replaces ``output`` (two renames on one file system: a kill leaves the old package, or
    none, never a half-written one); otherwise ``output`` is untouched. The stage is always removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_stages(output)
    stage = Path(tempfile.mkdtemp(prefix=f"{_stage_prefix(output)}{os.getpid()}-", dir=output.parent))
    try:
        package = stage / "package"
        yield package
        if output.exists():
            os.rename(output, stage / "previous")
        os.rename(package, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
