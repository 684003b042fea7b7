"""Embeddings: one vector a text from a package exported with ``--task embed``.

The graph (:func:`nextoken.exporters.builder.build` with ``task="embed"``) takes a batch of token
rows padded on the right and gives each row's pooled hidden state (``last``: the last token's, as
decoder embedding models such as Qwen3-Embedding are trained; ``mean``; ``cls``). What the package's
manifest says of it (``embedding``: pooling, normalize, dimensions, truncatable, prompts) comes from
the checkpoint's sentence-transformers configuration when it has one. Here the rows are batched by
length (little padding), and the vectors cut to ``dimensions`` (a model trained for it: Matryoshka)
and normalised to unit length when the model is.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InvalidRequestError

__all__ = ["EMBED_BATCH_TOKENS", "Embedder"]

#: Padded tokens in one run of the embedding graph (rows are grouped by length under this).
EMBED_BATCH_TOKENS = 8192


class Embedder:
    """Runs an embedding package's graph over token rows: :meth:`vectors` for their pooled,
    finished vectors. Thread-safe (one run at a time: a run already uses the session's threads)."""

    def __init__(self, session: Any, spec: Mapping[str, Any], pad_token_id: int, max_batch: int = 64) -> None:
        """
        Args:
            session: the package's ONNX Runtime session (``input_ids``, ``attention_mask`` in,
                ``embeddings`` out).
            spec: the manifest's ``embedding`` (pooling, normalize, dimensions, truncatable, prompts).
            pad_token_id: the id padding rows on the right (masked out; never read).
            max_batch: the most rows in one run.
        """
        self.session, self.spec, self.pad, self.max_batch = session, dict(spec), int(pad_token_id), max_batch
        #: the vector's full size
        self.dimensions = int(self.spec["dimensions"])
        self._lock = threading.Lock()

    def prompt_prefix(self, prompt: str | None) -> str:
        """The text put before each input for the named ``prompt`` (the package's
        ``default_prompt`` when None; "" when it has none); an error naming the known ones."""
        prompts: Mapping[str, str] = self.spec.get("prompts") or {}
        name = self.spec.get("default_prompt") if prompt is None else prompt
        if name is None:
            return ""
        if name not in prompts:
            known = ", ".join(sorted(prompts)) or "none"
            raise InvalidRequestError(f"prompt {name!r} is not one this embedding model names (it names: {known})")
        return prompts[name]

    def check_dimensions(self, dimensions: int | None) -> int:
        """The size vectors are cut to: ``dimensions`` when the model allows it, else an error."""
        if dimensions is None:
            return self.dimensions
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise InvalidRequestError(f"dimensions must be a positive integer, not {dimensions!r}")
        if dimensions > self.dimensions:
            raise InvalidRequestError(f"dimensions {dimensions} is more than this model's {self.dimensions}")
        if dimensions < self.dimensions and not self.spec.get("truncatable"):
            raise InvalidRequestError(
                f"this model's embeddings have {self.dimensions} dimensions and it is not marked as trained "
                "for shorter ones (Matryoshka); leave dimensions out, or export with --truncatable"
            )
        return dimensions

    def vectors(self, rows: Sequence[Sequence[int]], dimensions: int | None = None) -> np.ndarray:
        """``[len(rows), dimensions]`` float32 vectors of the token rows, in their order: pooled by
        the graph (:meth:`pooled`), then cut and normalised (:meth:`finish`)."""
        width = self.check_dimensions(dimensions)
        return self.finish(self.pooled(rows), width)

    def pooled(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """``[len(rows), self.dimensions]`` float32: each row's pooled hidden state, as the graph
        gives it, in the rows' order; the rows run in groups of similar length (little padding)."""
        out = np.empty((len(rows), self.dimensions), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        start = 0
        while start < len(order):
            end = start + 1  # rows sorted by length: a group's padded size is its last row's
            while (
                end < len(order)
                and end - start < self.max_batch
                and (end - start + 1) * len(rows[order[end]]) <= EMBED_BATCH_TOKENS
            ):
                end += 1
            group = order[start:end]
            longest = len(rows[group[-1]])
            ids = np.full((len(group), longest), self.pad, dtype=np.int64)
            mask = np.zeros((len(group), longest), dtype=np.int64)
            for r, i in enumerate(group):
                ids[r, : len(rows[i])] = rows[i]
                mask[r, : len(rows[i])] = 1
            with self._lock:
                (pooled,) = self.session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})
            out[group] = pooled.astype(np.float32, copy=False)
            start = end
        return out

    def finish(self, pooled: np.ndarray, width: int) -> np.ndarray:
        """Pooled vectors cut to their first ``width`` values (checked by :meth:`check_dimensions`),
        then made unit length when the model's are."""
        out = pooled[:, :width]
        if self.spec.get("normalize", True):
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)
